use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{
    parse_fixed_header, Error, FixedHeader, Packet, PacketType, Publish, KEPT_OF_OVERSIZED,
};

/// MQTT v4 codec
#[derive(Debug, Clone)]
pub struct Codec {
    /// Maximum packet size allowed by client
    pub max_incoming_size: usize,
    /// Maximum packet size allowed by broker
    pub max_outgoing_size: usize,
    /// routemq-bridge patch (PATCHED.md, Change 5): bytes of an oversized PUBLISH still to
    /// come from the socket, dropped as they arrive.
    pub(crate) discard: usize,
    /// routemq-bridge patch (PATCHED.md, Change 7): bytes taken from the read buffer so
    /// far (packets decoded and bytes skipped), a sign of life while a big packet arrives.
    pub(crate) consumed: u64,
}

impl Codec {
    /// routemq-bridge patch (PATCHED.md, Change 5): a constructor, so the skipping state
    /// above starts empty.
    pub fn new(max_incoming_size: usize, max_outgoing_size: usize) -> Codec {
        Codec {
            max_incoming_size,
            max_outgoing_size,
            discard: 0,
            consumed: 0,
        }
    }

    /// routemq-bridge patch (PATCHED.md, Change 5): a PUBLISH longer than
    /// `max_incoming_size` becomes a publish marked `oversized` as soon as its head (fixed
    /// and variable header, first [`KEPT_OF_OVERSIZED`] bytes of payload) is in `src`; the
    /// rest is then dropped as it arrives (`discard`), never buffered. Any other packet
    /// that large is still refused (`size`) as upstream does.
    fn read_oversized(&mut self, src: &mut BytesMut, size: usize) -> Result<Packet, Error> {
        let header = parse_fixed_header(src.iter())?;
        if header.packet_type()? != PacketType::Publish {
            return Err(Error::PayloadSizeLimitExceeded(size));
        }
        let head = oversized_head(&header, src)?;
        let mut publish = Publish::read(header, src.split_to(head).freeze())?;
        let rest = header.frame_length() - head;
        publish.oversized = Some(publish.payload.len() + rest);
        self.discard = rest;
        Ok(Packet::Publish(publish))
    }
}

/// routemq-bridge patch (PATCHED.md, Change 5): how many bytes of an oversized PUBLISH to
/// keep (from its first byte), or how many more `stream` needs for them. A topic may be
/// up to 64 KiB, so this stays bounded too.
fn oversized_head(header: &FixedHeader, stream: &[u8]) -> Result<usize, Error> {
    let start = header.fixed_header_len;
    let topic_len = match stream.get(start..start + 2) {
        Some(len) => usize::from(u16::from_be_bytes([len[0], len[1]])),
        None => return Err(Error::InsufficientBytes(start + 2 - stream.len())),
    };
    let pkid_len = if header.byte1 & 0b0110 == 0 { 0 } else { 2 };
    let variable = 2 + topic_len + pkid_len;
    if variable > header.remaining_len {
        return Err(Error::BoundaryCrossed(topic_len));
    }
    let head = start + variable + (header.remaining_len - variable).min(KEPT_OF_OVERSIZED);
    match head.checked_sub(stream.len()) {
        Some(missing) if missing > 0 => Err(Error::InsufficientBytes(missing)),
        _ => Ok(head),
    }
}

impl Decoder for Codec {
    type Item = Packet;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        // routemq-bridge patch (PATCHED.md, Change 7): count what this call takes.
        let before = src.len();
        let decoded = self.decode_counted(src);
        self.consumed += (before - src.len()) as u64;
        decoded
    }
}

impl Codec {
    fn decode_counted(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, Error> {
        // routemq-bridge patch (PATCHED.md, Change 5): the rest of an oversized PUBLISH.
        if self.discard > 0 {
            let dropped = self.discard.min(src.len());
            src.advance(dropped);
            self.discard -= dropped;
            if self.discard > 0 {
                return Ok(None);
            }
        }
        let read = match Packet::read(src, self.max_incoming_size) {
            Err(Error::PayloadSizeLimitExceeded(size)) => self.read_oversized(src, size),
            other => other,
        };
        match read {
            Ok(packet) => Ok(Some(packet)),
            Err(Error::InsufficientBytes(b)) => {
                // Get more packets to construct the incomplete packet
                src.reserve(b);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Encoder<Packet> for Codec {
    type Error = Error;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.write(dst, self.max_outgoing_size)?;

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;

    use super::Codec;
    use crate::{mqttbytes::Error, Packet, Publish, QoS};

    #[test]
    fn outgoing_max_packet_size_check() {
        let mut buf = BytesMut::new();
        let mut codec = Codec::new(100, 200);

        let mut small_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 100]);
        small_publish.pkid = 1;
        codec
            .encode(Packet::Publish(small_publish), &mut buf)
            .unwrap();

        let large_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 265]);
        match codec.encode(Packet::Publish(large_publish), &mut buf) {
            Err(Error::OutgoingPacketTooLarge {
                pkt_size: 281,
                max: 200,
            }) => {}
            _ => unreachable!(),
        }
    }
}
