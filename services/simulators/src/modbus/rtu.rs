//! Modbus RTU: the bus on a serial line, framed by hand; and the same frames over TCP
//! connections ([`serve_rtu_over_tcp`], a transparent RS485-to-Ethernet gateway).
//!
//! Hand-rolled rather than tokio-modbus's RTU server because a bus of meters must stay silent
//! for ids it does not have and for switched-off meters, serve several ids on one port, keep
//! a PTY master usable while its host end is closed, and optionally take as long as a real
//! RS485 line would.
//!
//! Framing: a server knows the length of every request it understands (FC01–06: 8 bytes;
//! FC15/16: 9 + byte count), so frames are cut by length as they arrive; a request of another
//! function code ends at the first silence of 3.5 character times (the RTU rule) and is
//! answered `IllegalFunction` if addressed. A frame with a bad CRC is dropped with everything
//! received with it (a real slave resynchronises on the next silence), and an incomplete frame
//! is dropped when the line goes quiet.
//!
//! Pacing: over a PTY every frame is instant. With [`RtuOptions::pace`] the server answers as
//! late as the line would let it: the request is taken to start when it arrived (or when the
//! line became free, if later), to last `len × bits_per_char / baud`, then 3.5 characters of
//! silence, the slave's response delay, and the response's own transmission time; the response
//! is written whole at the instant its last byte would have arrived. After it, the line is
//! busy for another 3.5 characters. Requests nobody answers still occupy the line.

use std::io;
use std::time::Duration;

use runtime::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_modbus::ExceptionCode;

use super::bus::{Dispatch, MeterBus, Op, Reply};
use crate::serial::{DriverError, OpenPort, Port};

/// The longest RTU frame (Modbus over serial line, 2.5.1.1): 256 bytes.
const MAX_FRAME: usize = 256;

/// How a serial line spends time: `baud` bits per second, `bits_per_char` per byte (start +
/// 8 data + parity + stop = 11 for 8E1 and 8N2, 10 for 8N1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    pub baud: u32,
    pub bits_per_char: u32,
}

impl LineTiming {
    /// 9600 baud 8E1, the ORNO default in mbmd's README (the vendor PDF says 8N1).
    pub const RS485_9600_8E1: Self = Self {
        baud: 9600,
        bits_per_char: 11,
    };

    /// Time on the line for `n` bytes.
    pub fn bytes(&self, n: usize) -> Duration {
        let bits = n as u64 * u64::from(self.bits_per_char);
        Duration::from_nanos(bits * 1_000_000_000 / u64::from(self.baud.max(1)))
    }

    /// The silence that ends a frame: 3.5 characters, fixed at 1.75 ms above 19200 baud
    /// (Modbus over serial line, 2.5.1.1).
    pub fn frame_gap(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            self.bytes(7) / 2
        }
    }
}

/// How [`serve_rtu`] behaves on the line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtuOptions {
    /// Take as long as a real line of this timing (see the module doc); `None` answers at
    /// once. Each slave's processing time is set on its handle
    /// ([`SlaveHandle::set_response_delay`](super::SlaveHandle::set_response_delay)).
    pub pace: Option<LineTiming>,
}

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF). On the wire the low byte goes first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Serve `bus` on `port` until shutdown. Ends with an error only when the port goes away
/// (a path or stream that fails); the device end of a PTY pair waits for its host instead.
pub async fn serve_rtu(
    port: impl Into<Port>,
    options: RtuOptions,
    bus: MeterBus,
    shutdown: Shutdown,
) -> Result<(), DriverError> {
    let line = Line {
        wire: Wire::Serial(OpenPort::open(port.into())?),
        pace: options.pace,
        bus,
        free_at: Instant::now(),
    };
    serve_line(line, options, &shutdown).await
}

/// Serve `bus` as a transparent RS485-to-Ethernet gateway does ("RTU over TCP"): every
/// accepted connection carries RTU frames, CRC included, with no MBAP header, as if it were
/// the serial line itself. Frames are cut exactly as [`serve_rtu`] cuts them; connections are
/// served concurrently (a real gateway would interleave them on its one line; the tests use
/// one). Runs until shutdown, which drops every connection; a failed accept is logged and
/// tried again.
pub async fn serve_rtu_over_tcp(
    listener: TcpListener,
    options: RtuOptions,
    bus: MeterBus,
    shutdown: Shutdown,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    // Accept failures in a row: the first is a WARN, the rest of the episode DEBUG.
    let mut failing = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.wait() => break,
            // Reap finished connections so the set does not grow with every reconnect.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    failing = 0;
                    a
                }
                // Out of descriptors (a flood of connections), a connection aborted before it
                // was taken: the gateway goes on serving the others and accepting.
                Err(e) => {
                    if failing == 0 {
                        tracing::warn!(error = %runtime::telemetry::chain(&e), "The RTU-over-TCP gateway cannot accept a connection; trying again.");
                    } else {
                        tracing::debug!(error = %runtime::telemetry::chain(&e), failing, "Still cannot accept a connection.");
                    }
                    failing += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %runtime::telemetry::chain(&e), "Cannot set TCP_NODELAY.");
        }
        tracing::debug!(%peer, "RTU-over-TCP client connected.");
        let line = Line {
            wire: Wire::Tcp {
                stream,
                peer: peer.to_string(),
            },
            pace: options.pace,
            bus: bus.clone(),
            free_at: Instant::now(),
        };
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            match serve_line(line, options, &shutdown).await {
                Ok(()) => tracing::debug!(%peer, "RTU-over-TCP connection ended."),
                Err(e) => tracing::debug!(%peer, error = %runtime::telemetry::chain(&e), "RTU-over-TCP connection ended."),
            }
        });
    }
    connections.shutdown().await;
    Ok(())
}

/// The RTU server loop on one line (a serial port or one TCP connection).
async fn serve_line(
    mut line: Line,
    options: RtuOptions,
    shutdown: &Shutdown,
) -> Result<(), DriverError> {
    // Unpaced, silence still ends frames of unknown length; use the usual 9600-baud gap.
    let gap = options
        .pace
        .unwrap_or(LineTiming::RS485_9600_8E1)
        .frame_gap();
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_FRAME);
    let mut chunk = [0u8; MAX_FRAME];
    loop {
        // Some(n): bytes; Some(None): host not listening; None: the line went quiet.
        let read = if buf.is_empty() {
            tokio::select! {
                () = shutdown.wait() => return Ok(()),
                r = line.wire.read(&mut chunk) => Some(r?),
            }
        } else {
            tokio::select! {
                () = shutdown.wait() => return Ok(()),
                r = timeout(gap, line.wire.read(&mut chunk)) => r.ok().transpose()?,
            }
        };
        match read {
            None => {
                if framing(&buf) == Framing::BySilence {
                    let frame = std::mem::take(&mut buf);
                    line.serve(&frame, shutdown).await?;
                } else {
                    tracing::debug!(bytes = buf.len(), "Dropped an incomplete RTU frame.");
                    buf.clear();
                }
            }
            Some(None) => buf.clear(),
            Some(Some(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                while let Framing::Complete(len) = framing(&buf) {
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    if !line.serve(&frame, shutdown).await? {
                        buf.clear();
                    }
                }
                if buf.len() > MAX_FRAME {
                    tracing::debug!(bytes = buf.len(), "Dropped an overlong RTU frame.");
                    buf.clear();
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Incomplete,
    Complete(usize),
    /// A function code whose request length this server does not know.
    BySilence,
}

/// Where the request at the start of `buf` ends, if the server can tell.
fn framing(buf: &[u8]) -> Framing {
    let Some(&fc) = buf.get(1) else {
        return Framing::Incomplete;
    };
    let len = match fc {
        1..=6 => 8,
        15 | 16 => match buf.get(6) {
            Some(&n) => 9 + usize::from(n),
            None => return Framing::Incomplete,
        },
        _ => return Framing::BySilence,
    };
    if buf.len() >= len {
        Framing::Complete(len)
    } else {
        Framing::Incomplete
    }
}

/// The request in a PDU (function code and data, no address, no CRC).
fn parse_op(pdu: &[u8]) -> Op {
    let word = |i: usize| match (pdu.get(i), pdu.get(i + 1)) {
        (Some(&h), Some(&l)) => Some(u16::from_be_bytes([h, l])),
        _ => None,
    };
    let fc = pdu.first().copied().unwrap_or(0);
    let two = || Some((word(1)?, word(3)?)).filter(|_| pdu.len() == 5);
    match (fc, two()) {
        (3, Some((addr, count))) => Op::ReadHolding { addr, count },
        (4, Some((addr, count))) => Op::ReadInput { addr, count },
        (6, Some((addr, value))) => Op::WriteSingle { addr, value },
        (16, _) => {
            let (Some(addr), Some(count), Some(&n)) = (word(1), word(3), pdu.get(5)) else {
                return Op::Other(fc);
            };
            let values: Vec<u16> = pdu[6..]
                .chunks_exact(2)
                .map(|w| u16::from_be_bytes([w[0], w[1]]))
                .collect();
            // A count that disagrees with the byte count is the client's error: an empty
            // write, which every model answers with IllegalDataValue (as the spec asks).
            let consistent =
                usize::from(n) == 2 * usize::from(count) && values.len() == count as usize;
            Op::WriteMultiple {
                addr,
                values: if consistent { values } else { Vec::new() },
            }
        }
        _ => Op::Other(fc),
    }
}

/// The response frame for `unit`, CRC included.
fn encode(unit: u8, fc: u8, reply: &Result<Reply, ExceptionCode>) -> Vec<u8> {
    let mut out = vec![unit];
    match reply {
        Ok(Reply::Registers(words)) => {
            out.push(fc);
            // At most 125 registers (the models refuse more), so 250 bytes fit in a u8.
            out.push((words.len() * 2) as u8);
            out.extend(words.iter().flat_map(|w| w.to_be_bytes()));
        }
        Ok(Reply::WroteSingle(a, b) | Reply::WroteMultiple(a, b)) => {
            out.push(fc);
            out.extend(a.to_be_bytes());
            out.extend(b.to_be_bytes());
        }
        Err(code) => {
            out.push(fc | 0x80);
            out.push(u8::from(*code));
        }
    }
    let crc = crc16(&out);
    out.extend(crc.to_le_bytes());
    out
}

/// Where the frames travel.
enum Wire {
    Serial(OpenPort),
    /// One connection to an RTU-over-TCP gateway; its end is the end of this line.
    Tcp {
        stream: TcpStream,
        peer: String,
    },
}

impl Wire {
    /// As [`OpenPort::read`]: some bytes, or `None` while a PTY's host is not listening.
    /// Cancel safe.
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, DriverError> {
        match self {
            Wire::Serial(link) => link.read(buf).await,
            Wire::Tcp { stream, peer } => match stream.read(buf).await {
                Ok(0) => Err(DriverError::Gone { port: peer.clone() }),
                Ok(n) => Ok(Some(n)),
                Err(source) => Err(DriverError::Io {
                    port: peer.clone(),
                    source,
                }),
            },
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), DriverError> {
        match self {
            Wire::Serial(link) => link.write_all(bytes).await,
            Wire::Tcp { stream, peer } => {
                stream
                    .write_all(bytes)
                    .await
                    .map_err(|source| DriverError::Io {
                        port: peer.clone(),
                        source,
                    })
            }
        }
    }
}

/// The port, the bus, and when the line is next free.
struct Line {
    wire: Wire,
    pace: Option<LineTiming>,
    bus: MeterBus,
    /// With pacing: the end of the last frame's trailing silence.
    free_at: Instant,
}

impl Line {
    /// Serve one frame; `false` if its CRC was bad (the caller resynchronises).
    async fn serve(&mut self, frame: &[u8], shutdown: &Shutdown) -> Result<bool, DriverError> {
        let arrived = Instant::now();
        let Some((body, crc)) = frame.split_last_chunk::<2>().filter(|(b, _)| b.len() >= 2) else {
            return Ok(false);
        };
        if crc16(body) != u16::from_le_bytes(*crc) {
            tracing::debug!(frame = ?frame, "Dropped an RTU frame with a bad CRC.");
            return Ok(false);
        }
        let unit = body[0];
        let op = parse_op(&body[1..]);
        let dispatch = self.bus.dispatch(unit, &op);
        // When the request's last byte would have left the line, and the silence after it.
        let heard = match self.pace {
            Some(p) => arrived.max(self.free_at) + p.bytes(frame.len()) + p.frame_gap(),
            None => arrived,
        };
        let Dispatch::Answer { reply, delay } = dispatch else {
            self.free_at = heard;
            return Ok(true);
        };
        let response = encode(unit, op.function_code(), &reply);
        let done = heard
            + delay
            + self
                .pace
                .map_or(Duration::ZERO, |p| p.bytes(response.len()));
        tokio::select! {
            () = shutdown.wait() => return Ok(true),
            () = tokio::time::sleep_until(done) => {}
        }
        self.wire.write_all(&response).await?;
        self.free_at = done + self.pace.map_or(Duration::ZERO, |p| p.frame_gap());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_well_known_read_request() {
        // "01 03 00 00 00 0A C5 CD": read 10 holding registers from slave 1, as printed in
        // countless Modbus RTU examples; the CRC is 0xCDC5, sent low byte first.
        let frame = [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A];
        assert_eq!(crc16(&frame), 0xCDC5);
        assert_eq!(crc16(&frame).to_le_bytes(), [0xC5, 0xCD]);
        // A frame with its CRC appended checks to zero.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]), 0);
    }

    #[test]
    fn requests_are_cut_by_length_and_unknown_codes_by_silence() {
        assert_eq!(framing(&[1]), Framing::Incomplete);
        assert_eq!(framing(&[1, 3, 0, 0, 0]), Framing::Incomplete);
        assert_eq!(
            framing(&[1, 3, 0, 0, 0, 10, 0xC5, 0xCD, 1]),
            Framing::Complete(8)
        );
        assert_eq!(framing(&[1, 16, 1, 16, 0, 2, 4, 0, 7]), Framing::Incomplete);
        assert_eq!(
            framing(&[1, 16, 1, 16, 0, 2, 4, 0, 7, 0, 3, 0, 0]),
            Framing::Complete(13)
        );
        assert_eq!(framing(&[1, 0x2B, 0x0E, 1, 0]), Framing::BySilence);
    }

    #[test]
    fn write_multiple_with_a_wrong_byte_count_becomes_an_empty_write() {
        assert_eq!(
            parse_op(&[16, 1, 16, 0, 2, 4, 0, 7, 0, 3]),
            Op::WriteMultiple {
                addr: 0x0110,
                values: vec![7, 3]
            }
        );
        assert_eq!(
            parse_op(&[16, 1, 16, 0, 3, 4, 0, 7, 0, 3]),
            Op::WriteMultiple {
                addr: 0x0110,
                values: vec![]
            }
        );
        assert_eq!(parse_op(&[3, 1, 0x30, 0]), Op::Other(3));
    }

    #[test]
    fn responses_carry_data_or_the_exception_bit() {
        let r = encode(1, 3, &Ok(Reply::Registers(vec![0x1388, 0xFFFF])));
        assert_eq!(&r[..7], [1, 3, 4, 0x13, 0x88, 0xFF, 0xFF]);
        assert_eq!(crc16(&r), 0);
        let e = encode(2, 4, &Err(ExceptionCode::IllegalFunction));
        assert_eq!(&e[..3], [2, 0x84, 1]);
        assert_eq!(crc16(&e), 0);
    }

    #[test]
    fn a_44_register_read_takes_its_bytes_and_a_gap_at_9600_8e1() {
        let t = LineTiming::RS485_9600_8E1;
        // (8 + 93) bytes × 11 bits / 9600 baud = 115.73 ms; the gap is 3.5 × 1.146 ms.
        assert_eq!(t.bytes(8 + 93), Duration::from_nanos(115_729_166));
        assert_eq!(t.frame_gap(), Duration::from_nanos(4_010_416));
        let fast = LineTiming {
            baud: 115_200,
            bits_per_char: 10,
        };
        assert_eq!(fast.frame_gap(), Duration::from_micros(1750));
    }
}
