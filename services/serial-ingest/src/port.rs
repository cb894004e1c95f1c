//! One serial port: open, read, parse, publish; on any trouble close and reopen with backoff.
//!
//! Each port runs as its own task with its own publisher task behind a bounded channel, so
//! that neither a slow journal write nor another port's trouble delays the reads (a
//! USB-serial chip's buffer holds well under a second of a 2 kHz stream).
//!
//! A port is a local serial device or, with a path of `tcp://host:port`, one behind a serial
//! device server (ser2net in raw mode, an ESP-Link, an RS485-to-Ethernet box); the rest is
//! the same for both.
//!
//! A port's life: open → session → close → backoff → open … A session ends on shutdown, on a
//! read or write error or end of file (a USB device unplugged; on a PTY whose other end
//! closed, reads give EIO or end of file), or when the device stays silent too long. The
//! backoff doubles from `reopen_min_ms` to `reopen_max_ms` with jitter and starts over once a
//! session has read a good line.

use std::time::Duration;

use proto::{Measurement, Quality, RawChannel, RawFrame, ReadingId, Segment};
use runtime::Shutdown;
use runtime::backoff::Retries;
use runtime::delivery::Producer;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

use crate::config::{LineChannel, Parity, PlanKind, PortPlan, PowMonChannel, StreamChannel};
use crate::events::PortEvents;
use crate::frame::{Block, FrameAssembler};
use crate::line::{Framed, LineFramer};
use crate::protocol::{self, LineKind};

/// The poll, byte for byte: `r e a d SP LF`, as the original PowMon sent it.
pub const POLL: &[u8] = b"read \n";

/// A write that takes longer than this means the port is wedged.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Readings waiting for the publisher, per port.
const QUEUE: usize = 1024;

/// What a port hands its publisher; each goes out on the topic of the identity it names.
#[derive(Debug)]
enum Output {
    Meas(Measurement),
    Raw(RawFrame),
}

/// Why a session ended.
enum End {
    Shutdown,
    /// Read or write failed, or end of file.
    Gone(String),
    /// Open, but the device says nothing.
    Silent(String),
}

/// Run one port until shutdown. Never returns an error: a port's trouble is logged, counted
/// and retried, and never reaches the other ports.
pub async fn run(
    plan: PortPlan,
    site: Segment,
    meas: Producer,
    raw: Option<Producer>,
    shutdown: Shutdown,
) {
    let events = PortEvents::new(&plan.path, plan.device.as_str());
    let (tx, rx) = mpsc::channel(QUEUE);
    let publisher = tokio::spawn(publish(rx, meas, raw, events.clone()));
    let mut port = Port {
        site,
        tx,
        events,
        plan,
        shutdown,
        last_line_ms: 0,
    };
    port.run().await;
    drop(port);
    if let Err(e) = publisher.await {
        tracing::error!(error = %runtime::telemetry::chain(&e), "A serial publisher task ended abnormally.");
    }
}

async fn publish(
    mut rx: mpsc::Receiver<Output>,
    meas: Producer,
    raw: Option<Producer>,
    events: PortEvents,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Output::Meas(m) => match meas.send(&m.topic(), m).await {
                Ok(_) => events.reading(),
                Err(e) => events.send_failed(&e),
            },
            Output::Raw(f) => {
                let Some(raw) = &raw else { continue };
                match raw.send(&f.topic(), f).await {
                    Ok(_) => events.frame(),
                    Err(e) => events.send_failed(&e),
                }
            }
        }
    }
}

struct Port {
    plan: PortPlan,
    site: Segment,
    tx: mpsc::Sender<Output>,
    events: PortEvents,
    shutdown: Shutdown,
    /// The time given to the last line read, so that no two lines share one.
    last_line_ms: i64,
}

/// How long a connection to a serial device server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most input a poll discards before it is written (see [`Link::clear_input`]).
const CLEAR_MAX: usize = 64 * 1024;

/// What a path of `tcp://host:port` names: a serial device server (ser2net in raw mode, an
/// ESP-Link, an RS232/RS485-to-Ethernet box) that passes the port's bytes over TCP as they
/// are. The line settings (baud, parity) are the server's, and refused in the config.
pub fn tcp_address(path: &str) -> Option<&str> {
    path.strip_prefix("tcp://")
}

/// An open port: a local serial device, or one behind a serial device server.
enum Link {
    Serial(SerialStream),
    Tcp(TcpStream),
}

impl Link {
    /// Drop whatever input is waiting (a late answer, noise) before a poll.
    fn clear_input(&mut self) -> std::io::Result<()> {
        match self {
            Link::Serial(s) => s
                .clear(tokio_serial::ClearBuffer::Input)
                .map_err(std::io::Error::from),
            Link::Tcp(s) => {
                // tokio's `try_read` reads only when the reactor has already reported the
                // socket readable, so a late answer that arrived since would stay and be taken
                // for the next poll's. Ask the kernel itself, through a duplicate of the
                // (non-blocking) socket, and for at most CLEAR_MAX bytes: a server that floods
                // must not hold the port here.
                let dup = std::net::TcpStream::from(s.as_fd().try_clone_to_owned()?);
                let mut scratch = [0u8; 4096];
                let mut drained = 0;
                while drained < CLEAR_MAX {
                    match (&dup).read(&mut scratch) {
                        // End of file shows up at the next read, as a lost port.
                        Ok(0) => return Ok(()),
                        Ok(n) => drained += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Serial(s) => Pin::new(s).poll_read(cx, buf),
            Link::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Serial(s) => Pin::new(s).poll_write(cx, buf),
            Link::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Serial(s) => Pin::new(s).poll_flush(cx),
            Link::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Serial(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

async fn open(plan: &PortPlan) -> Result<Link, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(addr) = tcp_address(&plan.path) {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("no connection to {addr} within {CONNECT_TIMEOUT:?}"))??;
        // Small polls and answers: do not hold them back to fill a segment.
        stream.set_nodelay(true)?;
        return Ok(Link::Tcp(stream));
    }
    let s = plan.serial;
    let data_bits = match s.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match s.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let stop_bits = if s.stop_bits == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    };
    Ok(Link::Serial(
        tokio_serial::new(plan.path.as_str(), s.baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()?,
    ))
}

impl Port {
    async fn run(&mut self) {
        let mut reopen = Retries::new(self.plan.reopen);
        let mut opened_before = false;
        // Opens that failed in a row, for logging the first one loudly.
        let mut open_failures = 0u32;
        loop {
            if self.shutdown.is_requested() {
                break;
            }
            let delay;
            // A connection to a server that does not answer may take CONNECT_TIMEOUT: not
            // out of the grace period of a stop.
            let opened = tokio::select! {
                () = self.shutdown.wait() => break,
                r = open(&self.plan) => r,
            };
            match opened {
                Ok(mut stream) => {
                    self.events.opened(opened_before);
                    opened_before = true;
                    open_failures = 0;
                    let (end, heard) = self.session(&mut stream).await;
                    drop(stream);
                    // A device that goes away while we are stopping anyway (a test or the demo
                    // stopping its simulated devices, a machine shutting down) is no news.
                    if self.shutdown.is_requested() {
                        break;
                    }
                    match end {
                        End::Shutdown => break,
                        End::Gone(why) => self.events.port_gone(&why),
                        End::Silent(why) => self.events.silent(&why),
                    }
                    // A session that read a good line was a success; one that heard
                    // nothing backs off like a failed open.
                    if heard {
                        reopen.succeeded();
                    }
                    delay = reopen.failed();
                }
                Err(e) => {
                    delay = reopen.failed();
                    self.events.open_failed(&*e, delay, open_failures == 0);
                    open_failures += 1;
                }
            }
            tokio::select! {
                () = self.shutdown.wait() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One open port until it ends. Returns also whether a good line was read.
    async fn session(&mut self, stream: &mut Link) -> (End, bool) {
        match self.plan.kind.clone() {
            PlanKind::RequestResponse {
                poll_interval_ms,
                response_timeout_ms,
                max_silent_polls,
                channels,
            } => {
                self.request_response(
                    stream,
                    Duration::from_millis(poll_interval_ms),
                    Duration::from_millis(response_timeout_ms),
                    max_silent_polls,
                    &channels,
                )
                .await
            }
            PlanKind::Stream {
                silence_timeout_ms,
                sample_rate_hz,
                frame_ms,
                channels,
            } => {
                let frame_len = (sample_rate_hz * frame_ms as f64 / 1000.0).round() as usize;
                let mut s = StreamState {
                    asm: FrameAssembler::new(channels.len(), sample_rate_hz, frame_len),
                    rate_hz: sample_rate_hz,
                    channels,
                };
                let r = self
                    .listen(
                        stream,
                        Duration::from_millis(silence_timeout_ms),
                        // The stream's samples are stamped from when their bytes were read,
                        // not from the line's distinct time: a burst of lines read at once is
                        // a burst, and 1 ms more per line would put its samples later.
                        |p, line, _, read_ms| p.stream_line(&mut s, line, read_ms),
                    )
                    .await;
                // The samples of the frame in progress are good: publish them short.
                if let Some(b) = s.asm.reset() {
                    let out = self.raw_frame(&s, b);
                    self.emit(out).await;
                }
                r
            }
            PlanKind::Lines {
                silence_timeout_ms,
                channels,
            } => {
                self.listen(
                    stream,
                    Duration::from_millis(silence_timeout_ms),
                    |p, line, line_ms, _| p.sensor_line(&channels, line, line_ms),
                )
                .await
            }
        }
    }

    /// The baud rate this port's line runs at, for logs; `None` behind a serial device server
    /// (`tcp://`), whose own setting is what counts.
    fn line_baud(&self) -> Option<u32> {
        tcp_address(&self.plan.path)
            .is_none()
            .then_some(self.plan.serial.baud)
    }

    /// Hand an output to the publisher. `false` once the publisher is gone (shutdown).
    async fn emit(&self, out: Output) -> bool {
        self.tx.send(out).await.is_ok()
    }

    async fn request_response(
        &mut self,
        stream: &mut Link,
        poll: Duration,
        response_timeout: Duration,
        max_silent_polls: u32,
        channels: &[PowMonChannel],
    ) -> (End, bool) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut framer = LineFramer::new(self.plan.max_line_bytes);
        let mut buf = vec![0u8; 4096];
        let mut lines = Vec::new();
        let adc: Vec<u32> = channels.iter().map(|c| c.calibration.adc_counts).collect();
        let mut deadline: Option<Instant> = None;
        let mut silent = 0u32;
        let mut heard = false;
        let baud = self.line_baud();
        loop {
            let wake = deadline.unwrap_or_else(|| Instant::now() + poll);
            tokio::select! {
                // An answer that is there is read before its deadline is judged: a service
                // whose thread was held up (an fsync on a slow card) finds both ready at once,
                // and must not call an answer that came in time a timeout.
                biased;
                () = self.shutdown.wait() => return (End::Shutdown, heard),
                _ = tick.tick(), if deadline.is_none() => {
                    // Whatever came before the poll is not its answer (a late answer to the
                    // last one, noise): drop it, in the kernel's buffer and ours.
                    if let Err(e) = stream.clear_input() {
                        self.events.flush_failed(&e);
                    }
                    framer.clear();
                    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(POLL)).await {
                        Ok(Ok(())) => deadline = Some(Instant::now() + response_timeout),
                        Ok(Err(e)) => return (End::Gone(format!("write failed: {e}")), heard),
                        Err(_) => return (End::Silent("the poll could not be written for 2 s".into()), heard),
                    }
                }
                r = stream.read(&mut buf) => {
                    let n = match r {
                        Ok(0) => return (End::Gone("end of file".into()), heard),
                        Ok(n) => n,
                        Err(e) => return (End::Gone(format!("read failed: {e}")), heard),
                    };
                    let read_ms = proto::now_ms();
                    if deadline.is_none() {
                        // No poll outstanding: these bytes answer nothing.
                        if !framer.is_empty() {
                            framer.clear();
                        }
                        self.events.unsolicited();
                        continue;
                    }
                    framer.push(&buf[..n], &mut lines);
                    for framed in lines.drain(..) {
                        if deadline.is_none() {
                            self.events.unsolicited();
                            continue;
                        }
                        let line = match framed {
                            Framed::Line(l) => l,
                            Framed::Overlong => {
                                self.events.overlong(self.plan.max_line_bytes);
                                (deadline, silent) = (None, 0);
                                continue;
                            }
                            Framed::NotUtf8 => {
                                self.events.line();
                                self.events.not_utf8(baud);
                                (deadline, silent) = (None, 0);
                                continue;
                            }
                        };
                        self.events.line();
                        let LineKind::Data(data) = protocol::classify(&line) else {
                            continue;
                        };
                        // Answered, well or badly: the device is there.
                        (deadline, silent) = (None, 0);
                        match protocol::parse_response(data, channels.len(), &adc) {
                            Ok(raws) => {
                                heard = true;
                                for (ch, raw) in channels.iter().zip(raws) {
                                    let out = self.powmon_reading(ch, raw, read_ms);
                                    if !self.emit(out).await {
                                        return (End::Shutdown, heard);
                                    }
                                }
                            }
                            Err(e) => self.events.garbled(&e, data, baud),
                        }
                    }
                }
                () = tokio::time::sleep_until(wake), if deadline.is_some() => {
                    deadline = None;
                    silent += 1;
                    self.events.timeout(silent, max_silent_polls);
                    if silent >= max_silent_polls {
                        return (End::Silent(format!("{silent} polls in a row unanswered")), heard);
                    }
                }
            }
        }
    }

    /// Read lines until silence, error or shutdown, handing each to `handle` with its own
    /// time (the read time, at least 1 ms after the previous line's) and the read time;
    /// `handle` returns whether the line was good.
    async fn listen<F>(
        &mut self,
        stream: &mut Link,
        silence: Duration,
        mut handle: F,
    ) -> (End, bool)
    where
        F: FnMut(&mut Port, &str, i64, i64) -> Vec<Output>,
    {
        let mut framer = LineFramer::new(self.plan.max_line_bytes);
        let mut buf = vec![0u8; 8192];
        let mut lines = Vec::new();
        let mut heard = false;
        let baud = self.line_baud();
        loop {
            let r = tokio::select! {
                () = self.shutdown.wait() => return (End::Shutdown, heard),
                r = tokio::time::timeout(silence, stream.read(&mut buf)) => r,
            };
            let n = match r {
                Err(_) => {
                    return (
                        End::Silent(format!("no byte for {} ms", silence.as_millis())),
                        heard,
                    );
                }
                Ok(Ok(0)) => return (End::Gone("end of file".into()), heard),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return (End::Gone(format!("read failed: {e}")), heard),
            };
            let read_ms = proto::now_ms();
            framer.push(&buf[..n], &mut lines);
            for framed in lines.drain(..) {
                let line = match framed {
                    Framed::Line(l) => l,
                    Framed::Overlong => {
                        self.events.overlong(self.plan.max_line_bytes);
                        continue;
                    }
                    Framed::NotUtf8 => {
                        self.events.line();
                        self.events.not_utf8(baud);
                        continue;
                    }
                };
                self.events.line();
                // Lines that came in one read would share its time, and a sink keys a reading
                // by series and time: InfluxDB kept one of ten lines read together. Each line
                // is stamped at least 1 ms after the previous one of this port.
                let line_ms = read_ms.max(self.last_line_ms.saturating_add(1));
                self.last_line_ms = line_ms;
                let outs = handle(self, &line, line_ms, read_ms);
                if !outs.is_empty() {
                    heard = true;
                }
                for out in outs {
                    if !self.emit(out).await {
                        return (End::Shutdown, heard);
                    }
                }
            }
        }
    }

    fn powmon_reading(&self, ch: &PowMonChannel, raw: u32, read_ms: i64) -> Output {
        let r = ch.calibration.convert(raw);
        if r.out_of_range {
            self.events.out_of_range();
        }
        Output::Meas(Measurement::new(
            self.reading_id(&ch.name),
            seg("current"),
            read_ms,
            if r.out_of_range {
                Quality::OutOfRange
            } else {
                Quality::Good
            },
            [
                ("current_a".to_string(), r.current_a),
                ("power_w".to_string(), r.power_w),
                ("sensor_v".to_string(), r.sensor_v),
                ("adc_counts".to_string(), f64::from(r.adc_counts)),
            ]
            .into(),
        ))
    }

    /// The identity of this port's readings of `channel`: the port's device on this site.
    fn reading_id(&self, channel: &Segment) -> ReadingId {
        ReadingId::new(self.site.clone(), self.plan.device.clone(), channel.clone())
    }

    fn stream_line(&mut self, s: &mut StreamState, line: &str, read_ms: i64) -> Vec<Output> {
        let baud = self.line_baud();
        let data = match protocol::classify(line) {
            LineKind::Data(d) => d,
            LineKind::Blank => return Vec::new(),
            LineKind::Comment(c) => {
                let mut out = Vec::new();
                if let Some(b) = protocol::parse_banner(c) {
                    // The device restarted: its numbering starts over.
                    if let Some(block) = s.asm.reset() {
                        out.push(self.raw_frame(s, block));
                    }
                    if let Some(rate) = b.rate_hz
                        && rate != s.rate_hz
                    {
                        self.events.banner_mismatch("rate", rate, s.rate_hz);
                    }
                    if let Some(n) = b.channels
                        && n != s.channels.len()
                    {
                        self.events
                            .banner_mismatch("channels", n as f64, s.channels.len() as f64);
                    }
                }
                return out;
            }
        };
        match protocol::parse_stream(data, s.channels.len()) {
            Ok(l) => {
                let pushed = s.asm.push(l.seq, &l.values, read_ms);
                if pushed.lost_lines > 0 {
                    self.events.lost_lines(pushed.lost_lines);
                }
                if pushed.resynced {
                    self.events.resynced();
                }
                if pushed.dropped_lines > 0 {
                    self.events.dropped_lines(pushed.dropped_lines);
                }
                pushed
                    .frames
                    .into_iter()
                    .map(|b| self.raw_frame(s, b))
                    .collect()
            }
            Err(e) => {
                self.events.garbled(&e, data, baud);
                Vec::new()
            }
        }
    }

    fn raw_frame(&self, s: &StreamState, block: Block) -> Output {
        let channels = s
            .channels
            .iter()
            .zip(block.samples)
            .map(|(c, samples)| RawChannel {
                channel: c.name.clone(),
                unit: seg(c.unit.as_str()),
                samples: samples
                    .into_iter()
                    .map(|v| (f64::from(v) * c.scale) as f32)
                    .collect(),
            })
            .collect();
        Output::Raw(RawFrame {
            origin: None,
            site: self.site.clone(),
            device: self.plan.device.clone(),
            start_ts_us: block.start_ts_us,
            sample_rate_hz: s.rate_hz,
            continues: block.continues,
            channels,
        })
    }

    fn sensor_line(&mut self, channels: &[LineChannel], line: &str, read_ms: i64) -> Vec<Output> {
        let LineKind::Data(data) = protocol::classify(line) else {
            return Vec::new();
        };
        let pairs = match protocol::parse_pairs(data) {
            Ok(p) => p,
            Err(e) => {
                self.events.garbled(&e, data, self.line_baud());
                return Vec::new();
            }
        };
        let mut mapped: Vec<(Segment, Segment, String, f64, Quality)> = Vec::new();
        for (key, value) in pairs {
            if channels.is_empty() {
                let Ok(channel) = Segment::new(key) else {
                    // The parser admits only the segment charset; nothing to publish under.
                    self.events.unknown_key(key);
                    continue;
                };
                mapped.push((channel, seg("sensor"), "value".into(), value, Quality::Good));
                continue;
            }
            let Some(c) = channels.iter().find(|c| c.key == key) else {
                self.events.unknown_key(key);
                continue;
            };
            let v = value * c.scale + c.offset;
            if !v.is_finite() {
                let e = protocol::ParseError::NotNumber(format!("{key}={value} scaled"));
                self.events.garbled(&e, data, self.line_baud());
                return Vec::new();
            }
            let out = c.min.is_some_and(|lo| v < lo) || c.max.is_some_and(|hi| v > hi);
            let q = if out {
                Quality::OutOfRange
            } else {
                Quality::Good
            };
            mapped.push((
                c.channel.clone(),
                c.measurement.clone(),
                c.field.clone(),
                v,
                q,
            ));
        }
        mapped
            .into_iter()
            .map(|(channel, measurement, field, v, quality)| {
                if quality == Quality::OutOfRange {
                    self.events.out_of_range();
                }
                Output::Meas(Measurement::new(
                    self.reading_id(&channel),
                    measurement,
                    read_ms,
                    quality,
                    [(field, v)].into(),
                ))
            })
            .collect()
    }
}

struct StreamState {
    asm: FrameAssembler,
    rate_hz: f64,
    channels: Vec<StreamChannel>,
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A late answer that reached the kernel while the port's task was busy elsewhere (the
    /// reactor never told it) is still dropped before the next poll.
    #[test]
    fn clearing_a_tcp_port_drops_what_the_kernel_holds_though_the_reactor_has_not_said_so() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            client.set_nonblocking(true).unwrap();
            let mut link = Link::Tcp(TcpStream::from_std(client).unwrap());
            let Link::Tcp(socket) = &link else {
                unreachable!()
            };
            let peek = std::net::TcpStream::from(socket.as_fd().try_clone_to_owned().unwrap());
            std::io::Write::write_all(&mut server, b"600\r\n").unwrap();
            // Wait (without yielding to the reactor) until the kernel holds the answer.
            let mut b = [0u8; 8];
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while peek.peek(&mut b).map_or(true, |n| n < 5) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the answer never arrived"
                );
                std::thread::yield_now();
            }
            link.clear_input().unwrap();
            let left = peek.peek(&mut b);
            assert!(
                left.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
                "left to be read as the next poll's answer: {left:?}"
            );
        });
    }
}
