use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::mqttbytes::{self, v4::*};
use crate::{Incoming, MqttState, StateError};

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network {
    /// Frame MQTT packets from network connection
    framed: Framed<Box<dyn AsyncReadWrite>, Codec>,
    /// Maximum readv count
    max_readb_count: usize,
    /// routemq-bridge patch (PATCHED.md, Change 7): the TCP socket underneath, if any.
    socket: SocketProbe,
}

/// routemq-bridge patch (PATCHED.md, Change 7): asks the kernel about the TCP socket under a
/// network (what waits unread, how big the receive buffer is); shared by the 3.1.1 and the
/// v5 `Network`. Empty (every answer `None`) without a TCP socket or off Unix.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SocketProbe {
    #[cfg(unix)]
    fd: Option<std::os::fd::RawFd>,
}

impl SocketProbe {
    /// A probe of `fd`, which must stay open as long as the probe is used (the network
    /// holding the probe owns the socket).
    #[cfg(unix)]
    pub(crate) fn new(fd: Option<std::os::fd::RawFd>) -> SocketProbe {
        SocketProbe { fd }
    }

    /// Bytes received by the kernel and not read yet (FIONREAD).
    pub(crate) fn unread_bytes(&self) -> Option<usize> {
        #[cfg(unix)]
        if let Some(fd) = self.fd {
            let mut n: libc::c_int = 0;
            // SAFETY: `fd` is the socket the network owns, open for as long as the network
            // holding this probe lives; FIONREAD writes one c_int.
            if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } == 0 {
                return usize::try_from(n).ok();
            }
        }
        None
    }

    /// The socket's receive buffer (SO_RCVBUF, as the kernel reports it).
    pub(crate) fn recv_buffer_size(&self) -> Option<usize> {
        #[cfg(unix)]
        if let Some(fd) = self.fd {
            // SAFETY: as in `unread_bytes`; the fd is open while the network lives.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            return socket2::SockRef::from(&fd).recv_buffer_size().ok();
        }
        None
    }
}

impl Network {
    pub fn new(
        socket: impl AsyncReadWrite + 'static,
        max_incoming_size: usize,
        max_outgoing_size: usize,
    ) -> Network {
        let socket = Box::new(socket) as Box<dyn AsyncReadWrite>;
        // routemq-bridge patch (PATCHED.md, Change 5): the codec now keeps state.
        let codec = Codec::new(max_incoming_size, max_outgoing_size);
        let framed = Framed::new(socket, codec);

        Network {
            framed,
            max_readb_count: 10,
            socket: SocketProbe::default(),
        }
    }

    /// routemq-bridge patch (PATCHED.md, Change 7): the TCP socket this network reads.
    pub(crate) fn set_socket(&mut self, socket: SocketProbe) {
        self.socket = socket;
    }

    /// routemq-bridge patch (PATCHED.md, Change 7): bytes received by the kernel and not
    /// read yet (FIONREAD); `None` without a TCP socket.
    pub(crate) fn unread_bytes(&self) -> Option<usize> {
        self.socket.unread_bytes()
    }

    /// routemq-bridge patch (PATCHED.md, Change 7): bytes received from the broker so far
    /// (decoded, skipped, or buffered for a packet still arriving): it grows while the
    /// broker sends anything at all.
    pub(crate) fn received(&self) -> u64 {
        self.framed.codec().consumed + self.framed.read_buffer().len() as u64
    }

    /// routemq-bridge patch (PATCHED.md, Change 7): the socket's receive buffer (SO_RCVBUF,
    /// as the kernel reports it); `None` without a TCP socket.
    pub(crate) fn recv_buffer_size(&self) -> Option<usize> {
        self.socket.recv_buffer_size()
    }

    /// Reads and returns a single packet from network
    pub async fn read(&mut self) -> Result<Incoming, StateError> {
        match self.framed.next().await {
            Some(Ok(packet)) => Ok(packet),
            Some(Err(mqttbytes::Error::InsufficientBytes(_))) => unreachable!(),
            Some(Err(e)) => Err(StateError::Deserialization(e)),
            None => Err(StateError::ConnectionAborted),
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub async fn readb(&mut self, state: &mut MqttState) -> Result<(), StateError> {
        // wait for the first read
        let mut res = self.framed.next().await;
        let mut count = 1;
        loop {
            match res {
                Some(Ok(packet)) => {
                    if let Some(outgoing) = state.handle_incoming_packet(packet)? {
                        self.write(outgoing).await?;
                    }

                    count += 1;
                    if count >= self.max_readb_count {
                        break;
                    }
                }
                Some(Err(mqttbytes::Error::InsufficientBytes(_))) => unreachable!(),
                Some(Err(e)) => return Err(StateError::Deserialization(e)),
                None => return Err(StateError::ConnectionAborted),
            }
            // do not wait for subsequent reads
            match self.framed.next().now_or_never() {
                Some(r) => res = r,
                _ => break,
            };
        }

        Ok(())
    }

    /// Serializes packet into write buffer
    pub async fn write(&mut self, packet: Packet) -> Result<(), StateError> {
        self.framed
            .feed(packet)
            .await
            .map_err(StateError::Deserialization)
    }

    /// routemq-bridge patch: bytes written and not yet flushed.
    pub fn buffered(&self) -> usize {
        self.framed.write_buffer().len()
    }

    pub async fn flush(&mut self) -> Result<(), crate::state::StateError> {
        self.framed
            .flush()
            .await
            .map_err(StateError::Deserialization)
    }
}

pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T> AsyncReadWrite for T where T: AsyncRead + AsyncWrite + Send + Unpin {}
