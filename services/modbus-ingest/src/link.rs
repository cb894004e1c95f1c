//! How a bus is reached: one [`Link`] and one [`open`] for the service's bus tasks and for the
//! `wattbus modbus …` tools, so the two cannot disagree on how a port is set up (8 data bits,
//! no flow control, no Nagle delay on TCP) or on what a transport means.
//!
//! What differs between them is policy, and stays with the caller: how long a TCP connect may
//! take, and what to do when opening fails (the service retries with backoff, a tool gives up
//! with a sentence for the person at the bus).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_modbus::Slave;
use tokio_modbus::client::Context;

/// Serial parity (one type for every service that opens a serial port).
pub use runtime::config::Parity;

/// Where a bus's frames go and how they are framed. Modbus RTU always uses 8 data bits, so
/// there is no setting for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Modbus RTU on a local serial port (an RS485 USB adapter).
    Rtu {
        /// `/dev/ttyUSB0`, or a stable `/dev/serial/by-id/...` link.
        path: String,
        baud: u32,
        parity: Parity,
        /// 1 or 2 (checked where the link is configured).
        stop_bits: u8,
    },
    /// Modbus TCP (MBAP header, unit id = slave id).
    Tcp { host: String, port: u16 },
    /// RTU frames (with CRC) through a TCP connection: what transparent RS485-to-Ethernet
    /// gateways speak. The serial side's settings live in the gateway.
    RtuOverTcp { host: String, port: u16 },
}

impl Link {
    /// Whether an RS485 line is behind the link (directly or through a gateway): a slave that
    /// stays silent then points at the wiring, baud and parity rather than at an address.
    pub const fn is_serial_line(&self) -> bool {
        matches!(self, Link::Rtu { .. } | Link::RtuOverTcp { .. })
    }

    /// The link as logs and metrics name it: the port's path, `tcp://host:port` or
    /// `rtu-over-tcp://host:port`.
    pub fn address(&self) -> String {
        match self {
            Link::Rtu { path, .. } => path.clone(),
            Link::Tcp { host, port } => format!("tcp://{}", host_port(host, *port)),
            Link::RtuOverTcp { host, port } => {
                format!("rtu-over-tcp://{}", host_port(host, *port))
            }
        }
    }
}

/// For a person: `/dev/ttyUSB0 at 9600 8N1`, `Modbus TCP 192.168.1.50:502`,
/// `RTU over TCP 192.168.1.50:502`.
impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Rtu {
                path,
                baud,
                parity,
                stop_bits,
            } => write!(f, "{path} at {baud} 8{}{stop_bits}", parity.letter()),
            Link::Tcp { host, port } => write!(f, "Modbus TCP {}", host_port(host, *port)),
            Link::RtuOverTcp { host, port } => {
                write!(f, "RTU over TCP {}", host_port(host, *port))
            }
        }
    }
}

/// `host:port`, with an IPv6 address in brackets as a socket address is written.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Opens `link` and attaches a Modbus client to it (set the slave before each request).
///
/// A TCP connect is bounded by `connect_timeout`: to an unreachable host it can otherwise hang
/// for minutes. Every byte read from the link is added to `received`, so a caller can tell
/// "nothing came back" (the meter is off) from "something came back that did not decode"
/// (garbage, a short frame, a wrong CRC: tokio-modbus's RTU decoder skips such bytes and keeps
/// waiting, so both end in a timeout).
pub async fn open(
    link: &Link,
    connect_timeout: Duration,
    received: Arc<AtomicU64>,
) -> io::Result<Context> {
    let first = Slave(1);
    match link {
        Link::Rtu {
            path,
            baud,
            parity,
            stop_bits,
        } => {
            use tokio_serial::SerialPortBuilderExt as _;
            let port = tokio_serial::new(path.as_str(), *baud)
                .data_bits(tokio_serial::DataBits::Eight)
                .parity(match parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .stop_bits(if *stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                })
                .flow_control(tokio_serial::FlowControl::None)
                .open_native_async()
                .map_err(io::Error::from)?;
            let tap = Tap {
                inner: port,
                received,
            };
            Ok(tokio_modbus::client::rtu::attach_slave(tap, first))
        }
        Link::Tcp { host, port } | Link::RtuOverTcp { host, port } => {
            let stream = tokio::time::timeout(
                connect_timeout,
                tokio::net::TcpStream::connect((host.as_str(), *port)),
            )
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no TCP connection within {} ms",
                        connect_timeout.as_millis()
                    ),
                )
            })??;
            // Modbus is request/response in small segments: no Nagle delay per request.
            stream.set_nodelay(true)?;
            let tap = Tap {
                inner: stream,
                received,
            };
            Ok(if matches!(link, Link::Tcp { .. }) {
                tokio_modbus::client::tcp::attach_slave(tap, first)
            } else {
                tokio_modbus::client::rtu::attach_slave(tap, first)
            })
        }
    }
}

/// A transport that counts the bytes it reads (see [`open`]).
#[derive(Debug)]
struct Tap<T> {
    inner: T,
    received: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_reads_as_a_person_and_a_log_name_it() {
        let rtu = Link::Rtu {
            path: "/dev/ttyUSB0".into(),
            baud: 9600,
            parity: Parity::Even,
            stop_bits: 1,
        };
        assert_eq!(rtu.to_string(), "/dev/ttyUSB0 at 9600 8E1");
        assert_eq!(rtu.address(), "/dev/ttyUSB0");
        let tcp = Link::Tcp {
            host: "192.168.1.50".into(),
            port: 502,
        };
        assert_eq!(tcp.to_string(), "Modbus TCP 192.168.1.50:502");
        assert_eq!(tcp.address(), "tcp://192.168.1.50:502");
        let gateway = Link::RtuOverTcp {
            host: "::1".into(),
            port: 4001,
        };
        assert_eq!(gateway.to_string(), "RTU over TCP [::1]:4001");
        assert_eq!(gateway.address(), "rtu-over-tcp://[::1]:4001");
        assert!(rtu.is_serial_line() && gateway.is_serial_line() && !tcp.is_serial_line());
    }
}
