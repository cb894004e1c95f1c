//! Drivers: a device model on a serial port, until shutdown.
//!
//! Each driver returns `Ok(())` on shutdown and an error when its port goes away (end of
//! file or an I/O error on a port opened by path or handed in open); never panics. See the
//! module doc of `serial` for the PTY master's "host not listening" state.

use std::io;
use std::time::Duration;

use runtime::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

use super::{PowMon, Prime, Sensor};

/// EIO: what Linux (and macOS, the BSDs) return on a PTY master whose slave nobody holds open.
/// A named constant rather than a `libc` dependency for one number.
const EIO: i32 = 5;

/// How often a driver looks again for a host that is not listening.
const PEER_POLL: Duration = Duration::from_millis(50);

/// A request line longer than this is discarded up to its `\n`, as the sketch's bounded
/// buffer does.
const MAX_REQUEST_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot open serial port {path}")]
    Open {
        path: String,
        #[source]
        source: tokio_serial::Error,
    },
    #[error("serial port {port} went away (end of file)")]
    Gone { port: String },
    #[error("serial port {port} failed")]
    Io {
        port: String,
        #[source]
        source: io::Error,
    },
}

/// Where a simulated device is attached.
#[derive(Debug)]
pub enum Port {
    /// Open this path at this baud rate (a socat PTY end, a USB adapter).
    Path { path: String, baud: u32 },
    /// An already open port; end of file or EIO on it ends the driver.
    Stream(SerialStream),
    /// The device end of [`pty_pair`]; EIO means the host has the other end closed.
    Pty(PtyDevice),
}

impl From<SerialStream> for Port {
    fn from(s: SerialStream) -> Self {
        Self::Stream(s)
    }
}

impl From<PtyDevice> for Port {
    fn from(p: PtyDevice) -> Self {
        Self::Pty(p)
    }
}

/// The master side of an in-process PTY pair: the device's end of the cable.
///
/// A type of its own rather than a bare [`SerialStream`] because the drivers must know that
/// EIO here means "the service has not opened its end yet" (or is reopening it), not "gone".
#[derive(Debug)]
pub struct PtyDevice(SerialStream);

impl PtyDevice {
    pub fn into_inner(self) -> SerialStream {
        self.0
    }
}

/// A PTY pair: the device end, and the path of the other end for the service to open.
///
/// `SerialStream::pair()` (serialport's `TTYPort::pair`) opens the slave itself, in raw mode,
/// and its `SerialPort::name()` is the slave's `/dev/pts/N`; the master has no name. The slave
/// descriptor is closed here so the service's open (which sets `TIOCEXCL`) is the only one and
/// its close looks to the device like the host going away. The raw mode outlives the close (it
/// belongs to the terminal, not the descriptor). Needs a tokio runtime (the ends are `AsyncFd`s).
pub fn pty_pair() -> io::Result<(PtyDevice, String)> {
    let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
    let path = slave
        .name()
        .ok_or_else(|| io::Error::other("the PTY pair's slave end has no path"))?;
    drop(slave);
    Ok((PtyDevice(master), path))
}

/// Answer `read` requests with the model until shutdown.
pub async fn run_powmon(
    mut model: PowMon,
    port: impl Into<Port>,
    shutdown: Shutdown,
) -> Result<(), DriverError> {
    let mut link = Link::open(port.into())?;
    let mut lines = LineBuf::default();
    let mut buf = [0u8; 256];
    loop {
        let read = tokio::select! {
            () = shutdown.wait() => return Ok(()),
            r = link.read(&mut buf) => r?,
        };
        let Some(n) = read else {
            // Host not listening: whatever half line we had is from a previous session.
            lines.clear();
            continue;
        };
        let mut answers = String::new();
        lines.push(&buf[..n], |line| {
            if let Some(a) = model.answer(line, proto::now_ms()) {
                answers.push_str(&a);
            }
        });
        if !answers.is_empty() {
            tokio::select! {
                () = shutdown.wait() => return Ok(()),
                r = link.write_all(answers.as_bytes()) => r?,
            }
        }
    }
}

/// Stream the model's lines, paced at its sample rate, until shutdown.
///
/// Lines are due by elapsed time since start, not by ticks: a late tick sends every line due
/// (several per tick), so the stream never drifts from the sample clock. If the host stops
/// reading for over a second, the backlog beyond one second is dropped as lost lines (the seq
/// jumps), as a real USB serial bridge drops what its host does not take.
pub async fn run_prime(
    mut model: Prime,
    port: impl Into<Port>,
    shutdown: Shutdown,
) -> Result<(), DriverError> {
    let mut link = Link::open(port.into())?;
    let lines_per_s =
        f64::from(model.config().sample_rate_hz) / model.config().samples_per_line as f64;
    let max_backlog = (lines_per_s.ceil() as u64).max(1);
    let banner = model.banner();
    tokio::select! {
        () = shutdown.wait() => return Ok(()),
        r = link.write_all(banner.as_bytes()) => r?,
    }
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(model.line_period().max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            _ = tick.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * lines_per_s) as u64;
        let behind = due.saturating_sub(sent);
        if behind == 0 {
            continue;
        }
        sent = due;
        if !link.host_listening()? {
            model.skip_lines(behind);
            continue;
        }
        if behind > max_backlog {
            model.skip_lines(behind - max_backlog);
        }
        let mut out = String::new();
        for _ in 0..behind.min(max_backlog) {
            out.push_str(&model.next_line());
        }
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            r = link.write_all(out.as_bytes()) => r?,
        }
    }
}

/// Print a sensor line every `interval` until shutdown (none while the host is not listening,
/// as a sketch's prints are lost then).
pub async fn run_sensor(
    mut model: Sensor,
    interval: Duration,
    port: impl Into<Port>,
    shutdown: Shutdown,
) -> Result<(), DriverError> {
    let mut link = Link::open(port.into())?;
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            _ = tick.tick() => {}
        }
        if !link.host_listening()? {
            continue;
        }
        let line = model.line(proto::now_ms());
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            r = link.write_all(line.as_bytes()) => r?,
        }
    }
}

/// An open port and what its errors mean (shared with the Modbus RTU server).
pub(crate) struct Link {
    stream: SerialStream,
    /// A PTY master: EIO is the host's end being closed, not the port going away.
    pty_master: bool,
    /// For error messages.
    name: String,
}

impl Link {
    pub(crate) fn open(port: Port) -> Result<Self, DriverError> {
        match port {
            Port::Path { path, baud } => {
                let stream =
                    tokio_serial::new(&path, baud)
                        .open_native_async()
                        .map_err(|source| DriverError::Open {
                            path: path.clone(),
                            source,
                        })?;
                Ok(Self {
                    stream,
                    pty_master: false,
                    name: path,
                })
            }
            Port::Stream(stream) => Ok(Self {
                name: stream.name().unwrap_or_else(|| "(unnamed)".into()),
                stream,
                pty_master: false,
            }),
            Port::Pty(PtyDevice(stream)) => Ok(Self {
                stream,
                pty_master: true,
                name: "(PTY master)".into(),
            }),
        }
    }

    fn io_error(&self, source: io::Error) -> DriverError {
        DriverError::Io {
            port: self.name.clone(),
            source,
        }
    }

    fn gone(&self) -> DriverError {
        DriverError::Gone {
            port: self.name.clone(),
        }
    }

    /// Some bytes, or `None` after waiting a moment if the host is not listening.
    /// Cancel safe: the read is, and the wait holds nothing.
    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, DriverError> {
        match self.stream.read(buf).await {
            Ok(0) if self.pty_master => {}
            Ok(0) => return Err(self.gone()),
            Ok(n) => return Ok(Some(n)),
            Err(e) if self.pty_master && e.raw_os_error() == Some(EIO) => {}
            Err(e) if e.raw_os_error() == Some(EIO) => return Err(self.gone()),
            Err(e) => return Err(self.io_error(e)),
        }
        tokio::time::sleep(PEER_POLL).await;
        Ok(None)
    }

    /// Whether anyone has the other end open, without waiting; input is read and dropped (a
    /// streaming sketch never reads its serial port). On a port opened by path, end of file
    /// or EIO is the port gone.
    fn host_listening(&mut self) -> Result<bool, DriverError> {
        let mut scratch = [0u8; 256];
        loop {
            match self.stream.try_read(&mut scratch) {
                Ok(0) if self.pty_master => return Ok(false),
                Ok(0) => return Err(self.gone()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(EIO) => {
                    return if self.pty_master {
                        Ok(false)
                    } else {
                        Err(self.gone())
                    };
                }
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), DriverError> {
        match self.stream.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(EIO) => Err(self.gone()),
            Err(e) => Err(self.io_error(e)),
        }
    }
}

/// Splits received bytes into lines (without `\n`), bounded: a line longer than
/// [`MAX_REQUEST_BYTES`] is dropped up to its `\n`, never half-handled.
#[derive(Default)]
struct LineBuf {
    line: Vec<u8>,
    overlong: bool,
}

impl LineBuf {
    fn push(&mut self, bytes: &[u8], mut on_line: impl FnMut(&[u8])) {
        for &b in bytes {
            if b == b'\n' {
                if !self.overlong {
                    on_line(&self.line);
                }
                self.clear();
            } else if self.line.len() < MAX_REQUEST_BYTES {
                self.line.push(b);
            } else {
                self.overlong = true;
            }
        }
    }

    fn clear(&mut self) {
        self.line.clear();
        self.overlong = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_lines_are_dropped_whole_and_the_next_is_read() {
        let mut b = LineBuf::default();
        let mut got = Vec::new();
        let mut long = vec![b'x'; MAX_REQUEST_BYTES + 10];
        long.extend_from_slice(b"read \n");
        b.push(&long, |l| got.push(l.to_vec()));
        b.push(b"re", |l| got.push(l.to_vec()));
        b.push(b"ad \nxy\n", |l| got.push(l.to_vec()));
        assert_eq!(got, [b"read ".to_vec(), b"xy".to_vec()]);
    }
}
