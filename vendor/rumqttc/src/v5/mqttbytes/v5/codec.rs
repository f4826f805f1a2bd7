use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{
    length, parse_fixed_header, read_mqtt_bytes, read_u16, Error, FixedHeader, Packet, PacketType,
    Publish, KEPT_OF_OVERSIZED, KEPT_PROPERTIES_OF_OVERSIZED,
};

/// MQTT v4 codec
#[derive(Debug, Clone)]
pub struct Codec {
    /// Maximum packet size allowed by client
    pub max_incoming_size: Option<u32>,
    /// Maximum packet size allowed by broker
    pub max_outgoing_size: Option<u32>,
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
    pub fn new(max_incoming_size: Option<u32>, max_outgoing_size: Option<u32>) -> Codec {
        Codec {
            max_incoming_size,
            max_outgoing_size,
            discard: 0,
            consumed: 0,
        }
    }

    /// routemq-bridge patch (PATCHED.md, Change 5): a PUBLISH longer than
    /// `max_incoming_size` becomes a publish marked `oversized` as soon as its head (fixed
    /// and variable header with the properties, first [`KEPT_OF_OVERSIZED`] bytes of
    /// payload) is in `src`; the rest is then dropped as it arrives (`discard`), never
    /// buffered. Properties over [`KEPT_PROPERTIES_OF_OVERSIZED`] are dropped too, with
    /// the whole payload (`properties` `None`, `payload` empty). Any other packet that
    /// large is still refused as upstream does.
    fn read_oversized(&mut self, src: &mut BytesMut, refusal: Error) -> Result<Packet, Error> {
        let header = parse_fixed_header(src.iter())?;
        if header.packet_type()? != PacketType::Publish {
            return Err(refusal);
        }
        let head = oversized_head(&header, src)?;
        let mut publish = if head.properties_kept {
            Publish::read(header, src.split_to(head.len).freeze())?
        } else {
            publish_without_properties(header, src.split_to(head.len).freeze())?
        };
        let rest = header.frame_length() - head.len;
        publish.oversized = Some(head.payload_len);
        self.discard = rest;
        Ok(Packet::Publish(publish))
    }

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
            Err(refusal @ Error::PayloadSizeLimitExceeded { .. }) => {
                self.read_oversized(src, refusal)
            }
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

/// routemq-bridge patch (PATCHED.md, Change 5): what to keep of an oversized PUBLISH.
struct OversizedHead {
    /// Bytes kept from its first byte.
    len: usize,
    /// Whether `len` includes the properties (else it ends after the packet id).
    properties_kept: bool,
    /// The real length of its payload.
    payload_len: usize,
}

/// routemq-bridge patch (PATCHED.md, Change 5): how many bytes of an oversized PUBLISH to
/// keep (from its first byte), or how many more `stream` needs for them. Unlike 3.1.1, a v5
/// PUBLISH has properties between the packet id and the payload: kept up to
/// [`KEPT_PROPERTIES_OF_OVERSIZED`] bytes, so the head stays bounded (a topic is at most
/// 64 KiB too).
fn oversized_head(header: &FixedHeader, stream: &[u8]) -> Result<OversizedHead, Error> {
    let start = header.fixed_header_len;
    let topic_len = match stream.get(start..start + 2) {
        Some(len) => usize::from(u16::from_be_bytes([len[0], len[1]])),
        None => return Err(Error::InsufficientBytes(start + 2 - stream.len())),
    };
    let pkid_len = if header.byte1 & 0b0110 == 0 { 0 } else { 2 };
    let properties_at = start + 2 + topic_len + pkid_len;
    if properties_at >= start + header.remaining_len {
        // No room even for the properties' length.
        return Err(Error::BoundaryCrossed(topic_len));
    }
    let Some(rest) = stream.get(properties_at..) else {
        return Err(Error::InsufficientBytes(properties_at + 1 - stream.len()));
    };
    let (len_len, properties_len) = length(rest.iter())?;
    let variable = 2 + topic_len + pkid_len + len_len + properties_len;
    if variable > header.remaining_len {
        return Err(Error::BoundaryCrossed(properties_len));
    }
    let payload_len = header.remaining_len - variable;
    let (len, properties_kept) = if properties_len > KEPT_PROPERTIES_OF_OVERSIZED {
        (properties_at, false)
    } else {
        (start + variable + payload_len.min(KEPT_OF_OVERSIZED), true)
    };
    match len.checked_sub(stream.len()) {
        Some(missing) if missing > 0 => Err(Error::InsufficientBytes(missing)),
        _ => Ok(OversizedHead {
            len,
            properties_kept,
            payload_len,
        }),
    }
}

/// routemq-bridge patch (PATCHED.md, Change 5): the publish of an oversized PUBLISH whose
/// properties were too long to keep: `head` ends after its packet id.
fn publish_without_properties(header: FixedHeader, mut head: Bytes) -> Result<Publish, Error> {
    let qos_num = (header.byte1 & 0b0110) >> 1;
    let qos = super::qos(qos_num).ok_or(Error::InvalidQoS(qos_num))?;
    head.advance(header.fixed_header_len);
    let topic = read_mqtt_bytes(&mut head)?;
    let pkid = match qos {
        super::QoS::AtMostOnce => 0,
        _ => read_u16(&mut head)?,
    };
    if qos != super::QoS::AtMostOnce && pkid == 0 {
        return Err(Error::PacketIdZero);
    }
    let mut publish = Publish {
        dup: (header.byte1 & 0b1000) != 0,
        qos,
        retain: (header.byte1 & 0b0001) != 0,
        pkid,
        ..Default::default()
    };
    publish.set_received_topic(topic);
    Ok(publish)
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
    use crate::v5::{
        mqttbytes::{Error, QoS},
        Packet, Publish,
    };

    #[test]
    fn outgoing_max_packet_size_check() {
        let mut buf = BytesMut::new();
        let mut codec = Codec::new(Some(100), Some(200));

        let mut small_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 100], None);
        small_publish.pkid = 1;
        codec
            .encode(Packet::Publish(small_publish), &mut buf)
            .unwrap();

        let large_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 265], None);
        match codec.encode(Packet::Publish(large_publish), &mut buf) {
            Err(Error::OutgoingPacketTooLarge {
                pkt_size: 282,
                max: 200,
            }) => {}
            _ => unreachable!(),
        }
    }
}

/// routemq-bridge patch (PATCHED.md, Changes 5 to 7): the skipping decoder.
#[cfg(test)]
mod skip_tests {
    use bytes::{BufMut, BytesMut};
    use tokio_util::codec::Decoder;

    use super::{Codec, KEPT_OF_OVERSIZED, KEPT_PROPERTIES_OF_OVERSIZED};
    use crate::v5::mqttbytes::v5::{Packet, Publish, PublishProperties, SubAck};
    use crate::v5::mqttbytes::{Error, QoS};

    fn properties() -> PublishProperties {
        PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("device".into(), "d-1".into())],
            message_expiry_interval: Some(60),
            ..Default::default()
        }
    }

    fn encoded(
        topic: &str,
        qos: QoS,
        pkid: u16,
        payload: Vec<u8>,
        props: Option<PublishProperties>,
    ) -> Vec<u8> {
        let mut publish = Publish::new(topic, qos, payload, props);
        publish.pkid = pkid;
        let mut out = BytesMut::new();
        publish.write(&mut out).expect("encode");
        out.to_vec()
    }

    /// What the decoder makes of `stream` arriving `chunk` bytes at a time, and the most it
    /// ever buffered.
    fn decode_in_chunks(stream: &[u8], chunk: usize, limit: u32) -> (Vec<Publish>, usize) {
        let mut codec = Codec::new(Some(limit), None);
        let mut buffer = BytesMut::new();
        let mut publishes = Vec::new();
        let mut most = 0;
        for piece in stream.chunks(chunk) {
            buffer.extend_from_slice(piece);
            most = most.max(buffer.len());
            while let Some(packet) = codec.decode(&mut buffer).expect("decodes") {
                match packet {
                    Packet::Publish(publish) => publishes.push(publish),
                    other => panic!("not a publish: {other:?}"),
                }
            }
        }
        assert!(buffer.is_empty(), "{} bytes left undecoded", buffer.len());
        assert_eq!(codec.consumed, stream.len() as u64, "every byte counted");
        (publishes, most)
    }

    /// The decoder keeps the head of a publish over its limit (with its properties) and
    /// drops the rest as it comes, whatever sizes the socket reads happen to have (the next
    /// packet may start mid-read). Upstream failed with `PayloadSizeLimitExceeded`.
    #[test]
    fn an_oversized_publish_is_skipped_whatever_the_read_sizes() {
        const LIMIT: u32 = 4096;
        let mut big = vec![b'y'; 200_000];
        big[0] = b'<';
        let mut stream = encoded("t/before", QoS::AtLeastOnce, 1, b"a".to_vec(), None);
        stream.extend(encoded(
            "t/big",
            QoS::ExactlyOnce,
            2,
            big,
            Some(properties()),
        ));
        stream.extend(encoded("t/after", QoS::AtMostOnce, 0, b"c".to_vec(), None));
        for chunk in [1, 2, 3, 7, 64, 1000, 1027, 4096, 65_536] {
            let (publishes, most) = decode_in_chunks(&stream, chunk, LIMIT);
            let seen: Vec<(&[u8], u16, Option<usize>, usize)> = publishes
                .iter()
                .map(|p| (&p.topic[..], p.pkid, p.oversized, p.payload.len()))
                .collect();
            assert_eq!(
                seen,
                [
                    (&b"t/before"[..], 1, None, 1),
                    (&b"t/big"[..], 2, Some(200_000), KEPT_OF_OVERSIZED),
                    (&b"t/after"[..], 0, None, 1)
                ],
                "reads of {chunk} bytes"
            );
            assert_eq!(publishes[1].qos, QoS::ExactlyOnce);
            assert_eq!(publishes[1].properties, Some(properties()));
            assert!(publishes[1].payload.starts_with(b"<yyy"));
            assert!(
                most <= chunk + 2048,
                "reads of {chunk} bytes buffered {most} bytes"
            );
        }
    }

    /// Properties too long to keep are skipped with the payload: the head stays bounded.
    #[test]
    fn an_oversized_publish_with_huge_properties_keeps_only_its_topic_and_id() {
        let huge = PublishProperties {
            // Two, as one string is at most 64 KiB.
            user_properties: vec![
                ("k".into(), "v".repeat(KEPT_PROPERTIES_OF_OVERSIZED / 2)),
                ("l".into(), "w".repeat(KEPT_PROPERTIES_OF_OVERSIZED / 2)),
            ],
            ..Default::default()
        };
        let mut stream = encoded("t/huge", QoS::AtLeastOnce, 7, vec![1; 5000], Some(huge));
        stream.extend(encoded("t/after", QoS::AtLeastOnce, 8, b"c".to_vec(), None));
        for chunk in [1, 1000, 70_000, 200_000] {
            let (publishes, most) = decode_in_chunks(&stream, chunk, 1024);
            assert_eq!(publishes.len(), 2, "reads of {chunk} bytes");
            let skipped = &publishes[0];
            assert_eq!(&skipped.topic[..], b"t/huge");
            assert_eq!(skipped.pkid, 7);
            assert_eq!(skipped.oversized, Some(5000));
            assert_eq!(skipped.properties, None);
            assert!(skipped.payload.is_empty());
            assert_eq!(&publishes[1].topic[..], b"t/after");
            assert!(
                most <= chunk + 1024,
                "reads of {chunk} bytes buffered {most}"
            );
        }
    }

    /// Only a PUBLISH is skipped; any other packet over the limit is refused as upstream
    /// does.
    #[test]
    fn another_oversized_packet_is_still_refused() {
        let suback = SubAck {
            pkid: 1,
            return_codes: vec![
                crate::v5::mqttbytes::v5::SubscribeReasonCode::Success(
                    QoS::AtLeastOnce,
                );
                300
            ],
            properties: None,
        };
        let mut buffer = BytesMut::new();
        suback.write(&mut buffer).expect("encode");
        let mut codec = Codec::new(Some(100), None);
        match codec.decode(&mut buffer) {
            Err(Error::PayloadSizeLimitExceeded { max: 100, .. }) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A topic that is not UTF-8 is delivered with its lossy form in `topic` and the bytes
    /// as received in `raw_topic` (Change 6); upstream's v5 `topic` held the raw bytes.
    #[test]
    fn a_topic_that_is_not_utf8_is_delivered_lossily_with_its_bytes() {
        let raw: &[u8] = b"a/\xff\xfe/b";
        let mut body = BytesMut::new();
        body.put_u16(raw.len() as u16);
        body.put_slice(raw);
        body.put_u16(3); // packet id
        body.put_u8(0); // no properties
        body.put_slice(b"payload");
        let mut stream = BytesMut::new();
        stream.put_u8(0x32);
        stream.put_u8(body.len() as u8);
        stream.put_slice(&body);
        let mut codec = Codec::new(Some(1024), None);
        match codec.decode(&mut stream) {
            Ok(Some(Packet::Publish(publish))) => {
                assert_eq!(&publish.topic[..], "a/\u{fffd}\u{fffd}/b".as_bytes());
                assert_eq!(publish.raw_topic.as_deref(), Some(raw));
                assert_eq!(publish.pkid, 3);
                assert_eq!(&publish.payload[..], b"payload");
            }
            other => panic!("expected a publish, got {other:?}"),
        }
        // A UTF-8 topic has no raw copy.
        let mut stream = BytesMut::from(&encoded("a/é", QoS::AtLeastOnce, 4, vec![], None)[..]);
        match codec.decode(&mut stream) {
            Ok(Some(Packet::Publish(publish))) => {
                assert_eq!(&publish.topic[..], "a/é".as_bytes());
                assert_eq!(publish.raw_topic, None);
            }
            other => panic!("expected a publish, got {other:?}"),
        }
    }
    /// A string property that is not UTF-8 is decoded lossily (Change 6); upstream failed
    /// the packet with `TopicNotUtf8`, which ended the connection.
    #[test]
    fn a_property_that_is_not_utf8_is_delivered_lossily() {
        let mut properties = BytesMut::new();
        properties.put_u8(0x26); // user property
        properties.put_u16(3);
        properties.put_slice(b"k\xffy");
        properties.put_u16(1);
        properties.put_slice(b"v");
        properties.put_u8(0x03); // content type
        properties.put_u16(2);
        properties.put_slice(b"\xc3(");
        let mut body = BytesMut::new();
        body.put_u16(1);
        body.put_slice(b"t");
        body.put_u16(3); // packet id
        body.put_u8(properties.len() as u8);
        body.put_slice(&properties);
        body.put_slice(b"payload");
        let mut stream = BytesMut::new();
        stream.put_u8(0x32);
        stream.put_u8(body.len() as u8);
        stream.put_slice(&body);
        let mut codec = Codec::new(Some(1024), None);
        match codec.decode(&mut stream) {
            Ok(Some(Packet::Publish(publish))) => {
                let properties = publish.properties.expect("properties");
                assert_eq!(
                    properties.user_properties,
                    [("k\u{fffd}y".to_string(), "v".to_string())]
                );
                assert_eq!(properties.content_type.as_deref(), Some("\u{fffd}("));
                assert_eq!(&publish.payload[..], b"payload");
            }
            other => panic!("expected a publish, got {other:?}"),
        }
    }
}
