//! Drivers: a device model on a serial port, until shutdown.
//!
//! Each driver returns `Ok(())` on shutdown and an error when its port goes away (end of
//! file or an I/O error on a port opened by path or handed in open); never panics. See the
//! module doc of `serial` for the PTY master's "host not listening" state.
//!
//! Every driver sleeps in the reactor between its own events (a request arriving, its next
//! line being due): none retries a read that would block. That matters on the PTY master of
//! [`pty_pair`], where tokio's readiness cannot be trusted across a host's close: the close
//! raises EPOLLHUP, tokio records it as "read closed" and keeps that bit for the life of the
//! registration (closed is final for a socket), so every later wait for readability returns
//! at once and every read fails with EAGAIN — a busy loop of ~100,000 reads a second per
//! device once the host has reopened its end. [`PtyMaster`] therefore drops its registration
//! whenever the host goes away and registers afresh once the host is back. Linux raises no
//! event on the master when the slave is opened again, so while the host is away (and only
//! then) the master is looked at every [`PEER_POLL`].

use std::io::{self, Read as _, Write as _};
use std::time::Duration;

use runtime::Shutdown;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

use super::{PowMon, Prime, Sensor};

/// EIO: what Linux (and macOS, the BSDs) return on a PTY master whose slave nobody holds open.
/// A named constant rather than a `libc` dependency for one number.
const EIO: i32 = 5;

/// How often a PTY master whose host has its end closed looks again for the host (see the
/// module doc: no event announces it).
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
    /// A TCP connection from a host, as a serial device server (ser2net, an ESP-Link, an
    /// RS485-to-Ethernet box) hands the port's bytes over: end of file is the host gone.
    Tcp(tokio::net::TcpStream),
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

impl From<tokio::net::TcpStream> for Port {
    fn from(s: tokio::net::TcpStream) -> Self {
        Self::Tcp(s)
    }
}

/// The master side of an in-process PTY pair: the device's end of the cable.
///
/// A type of its own because the drivers must know that EIO here means "the service has not
/// opened its end yet" (or is reopening it), not "gone"; and because its readiness has to be
/// handled apart from tokio-serial's (see the module doc). Not registered with the reactor
/// until a driver runs it.
#[derive(Debug)]
pub struct PtyDevice(mio_serial::SerialStream);

/// A PTY pair: the device end, and the path of the other end for the service to open.
///
/// serialport's `TTYPort::pair` opens the slave itself, in raw mode, and its
/// `SerialPort::name()` is the slave's `/dev/pts/N`; the master has no name. The slave
/// descriptor is closed here so the service's open (which sets `TIOCEXCL`) is the only one and
/// its close looks to the device like the host going away. The raw mode outlives the close (it
/// belongs to the terminal, not the descriptor).
pub fn pty_pair() -> io::Result<(PtyDevice, String)> {
    let (master, slave) = mio_serial::SerialStream::pair().map_err(io::Error::from)?;
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
    let mut link = OpenPort::open(port.into())?;
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
    let mut link = OpenPort::open(port.into())?;
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
    let mut scratch = [0u8; 256];
    loop {
        if !link.next_tick(&mut tick, &mut scratch, &shutdown).await? {
            return Ok(());
        }
        let due = (start.elapsed().as_secs_f64() * lines_per_s) as u64;
        let behind = due.saturating_sub(sent);
        if behind == 0 {
            continue;
        }
        sent = due;
        if !link.host_listening() {
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
    let mut link = OpenPort::open(port.into())?;
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut scratch = [0u8; 256];
    loop {
        if !link.next_tick(&mut tick, &mut scratch, &shutdown).await? {
            return Ok(());
        }
        if !link.host_listening() {
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
pub(crate) struct OpenPort {
    wire: Wire,
    /// For error messages.
    name: String,
}

enum Wire {
    /// A port opened by path or handed in: end of file or EIO is the port gone.
    Port(SerialStream),
    /// A host's TCP connection: end of file or a reset is the host gone.
    Tcp(tokio::net::TcpStream),
    /// A PTY master: EIO is the host's end being closed, not the port going away.
    Pty(PtyMaster),
}

impl OpenPort {
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
                    wire: Wire::Port(stream),
                    name: path,
                })
            }
            Port::Stream(stream) => Ok(Self {
                name: stream.name().unwrap_or_else(|| "(unnamed)".into()),
                wire: Wire::Port(stream),
            }),
            Port::Pty(PtyDevice(master)) => Ok(Self {
                wire: Wire::Pty(PtyMaster::new(master)),
                name: "(PTY master)".into(),
            }),
            Port::Tcp(stream) => Ok(Self {
                name: stream
                    .peer_addr()
                    .map_or_else(|_| "(TCP)".into(), |a| format!("TCP {a}")),
                wire: Wire::Tcp(stream),
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

    /// Some bytes, or `None` while the host is not listening (a PTY master only; then at most
    /// once per [`PEER_POLL`]). Cancel safe.
    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, DriverError> {
        let result = match &mut self.wire {
            Wire::Pty(master) => return master.read(buf).await.map_err(|e| self.io_error(e)),
            Wire::Port(stream) => AsyncReadExt::read(stream, buf).await,
            Wire::Tcp(stream) => AsyncReadExt::read(stream, buf).await,
        };
        match result {
            Ok(0) => Err(self.gone()),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.raw_os_error() == Some(EIO) => Err(self.gone()),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionReset
                    && matches!(self.wire, Wire::Tcp(_)) =>
            {
                Err(self.gone())
            }
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Wait for the next tick of a device that only writes, dropping whatever the host sends
    /// meanwhile (a streaming sketch never reads its serial port) and noticing a port that goes
    /// away. `false` on shutdown.
    async fn next_tick(
        &mut self,
        tick: &mut tokio::time::Interval,
        scratch: &mut [u8],
        shutdown: &Shutdown,
    ) -> Result<bool, DriverError> {
        loop {
            tokio::select! {
                () = shutdown.wait() => return Ok(false),
                _ = tick.tick() => return Ok(true),
                r = self.read(scratch) => { r?; }
            }
        }
    }

    /// Whether anyone has the other end open, as far as the link knows: always on a port
    /// opened by path (its loss is an error of [`OpenPort::read`]); on a PTY master, whether the
    /// host was there when last looked at. No system call.
    fn host_listening(&self) -> bool {
        match &self.wire {
            Wire::Port(_) | Wire::Tcp(_) => true,
            Wire::Pty(master) => master.listening(),
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), DriverError> {
        let result = match &mut self.wire {
            Wire::Pty(master) => {
                return master.write_all(bytes).await.map_err(|e| self.io_error(e));
            }
            Wire::Port(stream) => AsyncWriteExt::write_all(stream, bytes).await,
            Wire::Tcp(stream) => AsyncWriteExt::write_all(stream, bytes).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(EIO) => Err(self.gone()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) && matches!(self.wire, Wire::Tcp(_)) =>
            {
                Err(self.gone())
            }
            Err(e) => Err(self.io_error(e)),
        }
    }
}

/// A PTY master and whether its host is there (see the module doc for why this is not just
/// a tokio-serial stream).
struct PtyMaster {
    /// Always `Some` between calls; `None` only inside a state change.
    state: Option<Master>,
    /// While the host is away: when to look for it next.
    next_probe: Instant,
}

enum Master {
    /// The host had its end open when last seen: the reactor says when bytes can move.
    Listening(AsyncFd<mio_serial::SerialStream>),
    /// The host has its end closed. Not registered: a registration would report the hangup
    /// at once and for good. Looked at every [`PEER_POLL`].
    Away(mio_serial::SerialStream),
}

/// What one attempt on the master found.
enum Step<T> {
    Done(T),
    /// The host has closed its end.
    HostGone,
    /// Nothing to do yet; wait for readiness again.
    Again,
}

impl PtyMaster {
    fn new(master: mio_serial::SerialStream) -> Self {
        Self {
            state: Some(Master::Away(master)),
            next_probe: Instant::now(),
        }
    }

    fn listening(&self) -> bool {
        matches!(self.state, Some(Master::Listening(_)))
    }

    /// The host closed its end: drop the registration (and its sticky hangup).
    fn host_gone(&mut self) {
        if let Some(Master::Listening(fd)) = self.state.take() {
            self.state = Some(Master::Away(fd.into_inner()));
        }
        self.next_probe = Instant::now() + PEER_POLL;
    }

    /// The host has its end open: register afresh. On failure the master stays away (and the
    /// error is the caller's).
    fn host_back(&mut self) -> io::Result<()> {
        match self.state.take() {
            // Deprecated in tokio 1.54 for want of I/O safety (tokio PR #8587): its contract
            // is that the descriptor stays open and the same while registered. It does: the
            // `SerialStream` owns it, never replaces it, and closes it only when dropped, which
            // `into_inner` hands back first. (The `unsafe` successor is closed to this crate;
            // tokio-serial registers its ports the same way.)
            #[allow(deprecated)]
            Some(Master::Away(stream)) => match AsyncFd::try_new(stream) {
                Ok(fd) => {
                    self.state = Some(Master::Listening(fd));
                    Ok(())
                }
                Err(e) => {
                    let (stream, error) = e.into_parts();
                    self.state = Some(Master::Away(stream));
                    Err(error)
                }
            },
            other => {
                self.state = other;
                Ok(())
            }
        }
    }

    /// Some bytes, or `None` if the host is away (then at most once per [`PEER_POLL`]).
    /// Cancel safe: every await is a readiness wait or a sleep to a stored deadline.
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let step = match &self.state {
                Some(Master::Listening(fd)) => {
                    let mut guard = fd.readable().await?;
                    let hung_up = guard.ready().is_read_closed();
                    match guard.try_io(|fd| {
                        let mut stream = fd.get_ref();
                        stream.read(buf)
                    }) {
                        Ok(Ok(0)) => Step::HostGone,
                        Ok(Ok(n)) => Step::Done(n),
                        Ok(Err(e)) if e.raw_os_error() == Some(EIO) => Step::HostGone,
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Step::Again,
                        Ok(Err(e)) => return Err(e),
                        // A hangup seen since registering, and yet nothing to read: the host
                        // closed and reopened its end. The registration is stale for good.
                        Err(_would_block) if hung_up => Step::HostGone,
                        Err(_would_block) => Step::Again,
                    }
                }
                Some(Master::Away(stream)) => {
                    tokio::time::sleep_until(self.next_probe).await;
                    self.next_probe = Instant::now() + PEER_POLL;
                    let mut stream = stream;
                    match stream.read(buf) {
                        Ok(0) => return Ok(None),
                        Ok(n) => {
                            self.host_back()?;
                            return Ok(Some(n));
                        }
                        Err(e) if e.raw_os_error() == Some(EIO) => return Ok(None),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.host_back()?;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                None => return Err(io::Error::other("PTY master lost in a state change")),
            };
            match step {
                Step::Done(n) => return Ok(Some(n)),
                Step::HostGone => {
                    self.host_gone();
                    return Ok(None);
                }
                Step::Again => {}
            }
        }
    }

    /// Write everything. While the host is away, the kernel buffers what fits (a banner
    /// written before anyone listens waits in the PTY, as on a real port) and the rest is lost,
    /// as a sketch's prints are.
    async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let step = match &self.state {
                Some(Master::Listening(fd)) => {
                    let mut guard = fd.writable().await?;
                    let hung_up = guard.ready().is_write_closed();
                    match guard.try_io(|fd| {
                        let mut stream = fd.get_ref();
                        stream.write(bytes)
                    }) {
                        Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(Ok(n)) => Step::Done(n),
                        Ok(Err(e)) if e.raw_os_error() == Some(EIO) => Step::HostGone,
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Step::Again,
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) if hung_up => Step::HostGone,
                        Err(_would_block) => Step::Again,
                    }
                }
                Some(Master::Away(stream)) => {
                    let mut stream = stream;
                    match stream.write(bytes) {
                        Ok(0) => return Ok(()),
                        Ok(n) => Step::Done(n),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Again,
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.raw_os_error() == Some(EIO) =>
                        {
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    }
                }
                None => return Err(io::Error::other("PTY master lost in a state change")),
            };
            match step {
                Step::Done(n) => bytes = &bytes[n..],
                Step::HostGone => {
                    self.host_gone();
                    return Ok(());
                }
                Step::Again => {}
            }
        }
        Ok(())
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
