//! One task per physical bus: it owns the link and the [`Scheduler`] of every device on it.
//!
//! Invariants:
//! - **One request in flight per bus.** The task sends a request, waits for its answer or its
//!   timeout, and only then sends the next; every device of the bus goes through this one
//!   loop, so two meters on one RS485 pair can never talk over each other.
//! - **Inter-frame silence** on RTU: a request is sent no earlier than `silence` after the end
//!   of the previous exchange (answer, timeout or garbage), so a meter sees frame boundaries.
//! - **A garbled exchange resyncs the link.** After a timeout, a CRC or framing error or an
//!   answer from the wrong slave, bytes of a late or foreign answer may still arrive and would
//!   be taken for the next answer; the link is closed and opened again (serial reopen, TCP
//!   reconnect) before the next request. Simple, and it cannot misattribute a value.
//! - **No invented values.** A value is published only if it came in a valid answer to the
//!   request that asked for it and decoded to a finite number. Registers of one measurement
//!   (measurement, channel, tags) read in one poll form one [`Measurement`] stamped with the
//!   arrival time of the answer; if some of its registers could not be read (a failed request,
//!   NaN) the rest is published with quality `error`; if none could, nothing is published.
//! - A link that cannot be opened is retried with doubling backoff (`reconnect_min_ms` to
//!   `reconnect_max_ms`); devices are not degraded for it, and their polls wait.
//! - A failing device is backed off by the scheduler; a poll whose first request got no byte
//!   back at all stops there, so a meter that is off costs one request (plus retries) per
//!   backoff, not one per register block.
//!
//! Each call into tokio-modbus runs in its own short task that owns the client while it runs:
//! tokio-modbus asserts (in debug builds) that an answer holds as many registers as asked, and a
//! hostile peer must not be able to take the bus task down with it. A panicked or timed-out
//! call loses the client, which is what a resync needs anyway.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proto::{Measurement, Quality, ReadingId, Segment};
use runtime::Shutdown;
use runtime::backoff::Retries;
use runtime::delivery::Producer;
use runtime::telemetry::chain;
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::BusSpec;
use crate::decode::decode_response;
use crate::events::{BusEvents, MeterEvents};
use crate::link::Link;
use crate::plan::Request;
use crate::profile::Function;
use crate::scheduler::{Millis, Poll, Scheduler, Transition};

/// How one attempt of one request ended.
#[derive(Debug)]
enum Attempt {
    Words(Vec<u16>),
    Exception(u8),
    /// No byte came back in time.
    Timeout,
    /// Bytes came back that were not a valid answer.
    Garbled(String),
    WrongSlave(String),
    /// The link itself failed (port gone, connection reset): not the device's fault.
    LinkLost(io::Error),
}

/// How one request of a poll ended, after retries.
#[derive(Debug)]
enum Outcome {
    Words {
        words: Vec<u16>,
        ts_ms: i64,
    },
    Exception,
    /// No usable answer; `silent` when not a single byte came back on any attempt.
    Failed {
        silent: bool,
    },
    LinkLost,
}

/// Per-interval figures for the `modbus_bus` health measurement.
#[derive(Debug, Default)]
struct Window {
    latency_sum_ms: f64,
    answered: u64,
    requests: u64,
    errors: u64,
    /// Seconds the line was busy: frame times on RTU, time in flight on TCP.
    busy_s: f64,
}

/// Opens the bus's link. A connect may take longer than a request (a gateway's ARP, a slow
/// handshake), so it gets the request timeout but at least a second.
async fn open(link: &Link, received: Arc<AtomicU64>, timeout: Duration) -> io::Result<Context> {
    crate::link::open(link, timeout.max(Duration::from_secs(1)), received).await
}

/// The bus task's state.
struct BusRunner {
    spec: BusSpec,
    site: Segment,
    producer: Producer,
    events: BusEvents,
    devices: Vec<MeterEvents>,
    scheduler: Scheduler,
    link: String,
    conn: Option<Context>,
    received: Arc<AtomicU64>,
    /// When the last exchange ended, for the inter-frame silence.
    last_frame: Instant,
    /// The scheduler's clock starts here.
    epoch: Instant,
    /// Failed opens in a row (for the reconnect backoff and to log an outage once).
    reopen: Retries,
    opened_before: bool,
    window: Window,
    window_start: Instant,
}

/// Runs one bus until shutdown. A reading the journal refuses does not stop it: the producer
/// logs, counts and reports the outage, tries the journal again with the next reading, and the
/// bus goes on being polled ([`runtime::events::reading_not_sent`]).
pub async fn run(
    spec: BusSpec,
    site: Segment,
    producer: Producer,
    health_interval: Duration,
    shutdown: Shutdown,
) {
    let epoch = Instant::now();
    let scheduler = Scheduler::new(spec.devices.clone(), spec.device_backoff, 0);
    let reopen = Retries::new(spec.reconnect);
    let bus_name = spec.name.as_str().to_string();
    let mut runner = BusRunner {
        events: BusEvents::new(&bus_name),
        devices: spec
            .devices
            .iter()
            .map(|d| MeterEvents::new(&bus_name, d.name.as_str()))
            .collect(),
        link: spec.link.address(),
        scheduler,
        spec,
        site,
        producer,
        conn: None,
        received: Arc::new(AtomicU64::new(0)),
        last_frame: epoch,
        epoch,
        reopen,
        opened_before: false,
        window: Window::default(),
        window_start: epoch,
    };
    let mut health = tokio::time::interval_at(epoch + health_interval, health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if runner.conn.is_none() && !runner.reconnect(&shutdown, &mut health).await {
            break;
        }
        let wake = match runner.scheduler.next_due() {
            Some(due) => runner.epoch + Duration::from_millis(due),
            None => Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            // Shutdown first: a poll started after it was asked for would find the link
            // closing and report its device as not answering.
            biased;
            () = shutdown.wait() => break,
            _ = health.tick() => runner.publish_health().await,
            () = tokio::time::sleep_until(wake) => {
                let now = runner.now_ms();
                match runner.scheduler.take_due(now) {
                    Ok(Some(poll)) => runner.poll(poll, &shutdown).await,
                    Ok(None) => {}
                    Err(e) => {
                        runner.events.cannot_plan(&e);
                        break;
                    }
                }
            }
        }
    }
}

impl BusRunner {
    fn now_ms(&self) -> Millis {
        Instant::now().duration_since(self.epoch).as_millis() as Millis
    }

    /// Opens the link, retrying with backoff; health keeps being published meanwhile.
    /// `false` on shutdown.
    async fn reconnect(&mut self, shutdown: &Shutdown, health: &mut tokio::time::Interval) -> bool {
        loop {
            if shutdown.is_requested() {
                return false;
            }
            match open(&self.spec.link, self.received.clone(), self.spec.timeout).await {
                Ok(ctx) => {
                    self.conn = Some(ctx);
                    self.events.connected(!self.opened_before, &self.link);
                    if self.reopen.failures() > 0 {
                        self.events.link_restored(&self.link);
                    }
                    self.opened_before = true;
                    self.reopen.succeeded();
                    self.last_frame = Instant::now();
                    return true;
                }
                Err(e) => {
                    let first = self.reopen.failures() == 0;
                    let wait = self.reopen.failed();
                    self.events.link_failed(
                        &e,
                        &self.link,
                        first,
                        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    );
                    let until = Instant::now() + wait;
                    loop {
                        tokio::select! {
                            biased;
                            () = shutdown.wait() => return false,
                            _ = health.tick() => self.publish_health().await,
                            () = tokio::time::sleep_until(until) => break,
                        }
                    }
                }
            }
        }
    }

    /// Executes one poll of one device and publishes what it read.
    async fn poll(&mut self, poll: Poll, shutdown: &Shutdown) {
        let d = poll.device;
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(poll.requests.len());
        for request in &poll.requests {
            if shutdown.is_requested() {
                break;
            }
            let outcome = self.request(d, request).await;
            let stop = matches!(
                outcome,
                Outcome::LinkLost | Outcome::Failed { silent: true }
            );
            outcomes.push(outcome);
            if stop {
                break;
            }
        }
        if outcomes.iter().any(|o| matches!(o, Outcome::LinkLost)) {
            // Not the device's fault: no verdict on it, publish what was read before.
            self.publish(&poll, &outcomes).await;
            return;
        }
        let answered = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Words { .. } | Outcome::Exception));
        if !answered && shutdown.is_requested() {
            // Stopping cut the poll short (or it never started): no verdict on the device.
            self.publish(&poll, &outcomes).await;
            return;
        }
        let now = self.now_ms();
        match self.scheduler.report(d, now, answered) {
            Transition::Degraded => {
                let backoff = self
                    .scheduler
                    .retry_at(d)
                    .map_or(0, |t| t.saturating_sub(now));
                self.devices[d].degraded(backoff);
            }
            Transition::Recovered => self.devices[d].recovered(),
            Transition::None => {}
        }
        self.publish(&poll, &outcomes).await
    }

    /// One request with its retries.
    async fn request(&mut self, d: usize, request: &Request) -> Outcome {
        let slave = self.spec.devices[d].slave;
        let mut silent = true;
        for attempt in 0..=self.spec.retries {
            if self.conn.is_none() {
                let ctx =
                    match open(&self.spec.link, self.received.clone(), self.spec.timeout).await {
                        Ok(ctx) => ctx,
                        Err(e) => {
                            // Counted, not waited for: the reconnect loop waits before the
                            // next attempt.
                            let _wait = self.reopen.failed();
                            self.events.link_failed(&e, &self.link, true, 0);
                            return Outcome::LinkLost;
                        }
                    };
                self.events.connected(false, &self.link);
                self.conn = Some(ctx);
                self.last_frame = Instant::now();
            }
            self.devices[d].request(attempt > 0);
            self.window.requests += 1;
            let started = Instant::now();
            let result = self.exchange(slave, request).await;
            let ended = Instant::now();
            self.last_frame = ended;
            let elapsed = ended.duration_since(started);
            match result {
                Attempt::Words(words) => {
                    self.devices[d].answered();
                    self.window.answered += 1;
                    self.window.latency_sum_ms += elapsed.as_secs_f64() * 1000.0;
                    self.window.busy_s += self.busy(request.count, elapsed);
                    return Outcome::Words {
                        words,
                        ts_ms: proto::now_ms(),
                    };
                }
                Attempt::Exception(code) => {
                    self.window.errors += 1;
                    self.window.busy_s += self.busy(1, elapsed);
                    self.devices[d].exception(
                        code,
                        request.function.code(),
                        request.start,
                        request.count,
                    );
                    // The device answered: asking again gets the same answer.
                    return Outcome::Exception;
                }
                Attempt::Timeout => {
                    self.window.errors += 1;
                    self.window.busy_s += self.busy(0, elapsed);
                    self.devices[d].timeout(self.spec.timeout.as_millis());
                }
                Attempt::Garbled(what) => {
                    silent = false;
                    self.window.errors += 1;
                    self.window.busy_s += self.busy(0, elapsed);
                    self.devices[d].garbled(&what);
                }
                Attempt::WrongSlave(what) => {
                    silent = false;
                    self.window.errors += 1;
                    self.window.busy_s += self.busy(0, elapsed);
                    self.devices[d].wrong_slave(&what);
                }
                Attempt::LinkLost(e) => {
                    self.conn = None;
                    self.events.link_failed(&e, &self.link, true, 0);
                    return Outcome::LinkLost;
                }
            }
            // Resync: whatever arrives late must not be read as the next answer.
            self.conn = None;
        }
        Outcome::Failed { silent }
    }

    /// Line time of an exchange: on a serial line the frames' time (a request alone when
    /// `registers` is 0, i.e. no valid answer), on TCP the time in flight.
    fn busy(&self, registers: u16, elapsed: Duration) -> f64 {
        match self.spec.line {
            Some(line) if registers > 0 => line.read_s(registers),
            Some(line) => {
                f64::from(crate::timing::READ_REQUEST_BYTES) * line.char_s() + line.silence_s()
            }
            None => elapsed.as_secs_f64(),
        }
    }

    /// Sends one request and waits for its answer, keeping the silence before it.
    async fn exchange(&mut self, slave: u8, request: &Request) -> Attempt {
        let Some(mut ctx) = self.conn.take() else {
            return Attempt::LinkLost(io::Error::new(io::ErrorKind::NotConnected, "not open"));
        };
        if self.spec.line.is_some() {
            tokio::time::sleep_until(self.last_frame + self.spec.silence).await;
        }
        ctx.set_slave(Slave(slave));
        let before = self.received.load(Ordering::Relaxed);
        let (function, start, count) = (request.function, request.start, request.count);
        let mut call = tokio::spawn(async move {
            let r = match function {
                Function::Holding => ctx.read_holding_registers(start, count).await,
                Function::Input => ctx.read_input_registers(start, count).await,
            };
            (ctx, r)
        });
        let got_bytes = || self.received.load(Ordering::Relaxed) > before;
        match tokio::time::timeout(self.spec.timeout, &mut call).await {
            Err(_) => {
                call.abort();
                // Wait until the aborted call has dropped the client: a serial port is
                // locked while open, and the resync reopens it next. The result is the
                // cancellation itself.
                if let Ok((_ctx, late)) = call.await {
                    tracing::debug!(
                        ?late,
                        "An answer completed as its timeout fired; discarded."
                    );
                }
                if got_bytes() {
                    Attempt::Garbled("incomplete or corrupt frame (no valid answer in time)".into())
                } else {
                    Attempt::Timeout
                }
            }
            Ok(Err(join)) => Attempt::Garbled(format!("answer could not be decoded: {join}")),
            Ok(Ok((ctx, result))) => {
                let attempt = classify(result);
                if matches!(attempt, Attempt::Words(_) | Attempt::Exception(_)) {
                    self.conn = Some(ctx);
                }
                attempt
            }
        }
    }

    /// Groups what a poll read into measurements and journals them.
    async fn publish(&mut self, poll: &Poll, outcomes: &[Outcome]) {
        type Key = (Segment, Segment, BTreeMap<Segment, Segment>);
        struct Group {
            fields: BTreeMap<String, f64>,
            ts_ms: i64,
            incomplete: bool,
        }
        let d = poll.device;
        let spec = &self.spec.devices[d];
        let registers = &spec.profile.registers;
        let mut groups: BTreeMap<Key, Group> = BTreeMap::new();
        for (i, request) in poll.requests.iter().enumerate() {
            let words = match outcomes.get(i) {
                Some(Outcome::Words { words, ts_ms }) => Some((words, *ts_ms)),
                _ => None,
            };
            let decoded = words.map(|(w, ts)| (decode_response(registers, request, w), ts));
            for &index in &request.registers {
                let Some(r) = registers.get(index) else {
                    continue;
                };
                let g = groups
                    .entry((r.measurement.clone(), r.channel.clone(), r.tags.clone()))
                    .or_insert(Group {
                        fields: BTreeMap::new(),
                        ts_ms: 0,
                        incomplete: false,
                    });
                let value = match &decoded {
                    Some((Ok(values), ts)) => {
                        g.ts_ms = g.ts_ms.max(*ts);
                        values.iter().find(|(i, _)| *i == index).map(|(_, v)| v)
                    }
                    Some((Err(e), _)) => {
                        self.devices[d].bad_value(&r.field, e);
                        None
                    }
                    None => None,
                };
                match value {
                    Some(Ok(v)) => {
                        g.fields.insert(r.field.clone(), *v);
                    }
                    Some(Err(e)) => {
                        self.devices[d].bad_value(&r.field, e);
                        g.incomplete = true;
                    }
                    None => g.incomplete = true,
                }
            }
        }
        for ((measurement, channel, tags), g) in groups {
            if g.fields.is_empty() {
                continue;
            }
            let m = Measurement {
                tags,
                ..Measurement::new(
                    ReadingId::new(self.site.clone(), spec.name.clone(), channel),
                    measurement,
                    g.ts_ms,
                    if g.incomplete {
                        Quality::Error
                    } else {
                        Quality::Good
                    },
                    g.fields,
                )
            };
            match self.producer.send(&m.topic(), m).await {
                Ok(_) => self.devices[d].reading(),
                Err(e) => self.devices[d].not_sent(&e),
            }
        }
    }

    /// `modbus_bus` for the bus and `modbus_device` for each device, channel `health`.
    async fn publish_health(&mut self) {
        let now = Instant::now();
        let wall = now.duration_since(self.window_start).as_secs_f64();
        let w = std::mem::take(&mut self.window);
        self.window_start = now;
        let ts_ms = proto::now_ms();
        let health = seg("health");
        let totals = self.devices.iter().fold((0, 0, 0), |(r, t, e), d| {
            (
                r + d.counts.requests,
                t + d.counts.retries,
                e + d.counts.errors(),
            )
        });
        let mut fields = BTreeMap::from([
            ("requests".to_string(), totals.0 as f64),
            ("retries".to_string(), totals.1 as f64),
            ("errors".to_string(), totals.2 as f64),
            ("reconnects".to_string(), self.events.reconnects() as f64),
        ]);
        if w.answered > 0 {
            fields.insert("latency_ms".into(), w.latency_sum_ms / w.answered as f64);
        }
        if w.requests > 0 {
            fields.insert("error_rate".into(), w.errors as f64 / w.requests as f64);
        }
        if wall > 0.0 {
            fields.insert("utilisation".into(), w.busy_s / wall);
        }
        let m = Measurement::new(
            ReadingId::new(self.site.clone(), self.spec.name.clone(), health.clone()),
            seg("modbus_bus"),
            ts_ms,
            Quality::Good,
            fields,
        );
        if let Err(e) = self.producer.send(&m.topic(), m).await {
            self.events.not_sent(&e);
        }
        for (i, d) in self.devices.iter().enumerate() {
            let c = d.counts;
            let fields = BTreeMap::from([
                ("requests".to_string(), c.requests as f64),
                ("retries".to_string(), c.retries as f64),
                ("timeouts".to_string(), c.timeouts as f64),
                ("exceptions".to_string(), c.exceptions as f64),
                ("crc_errors".to_string(), c.crc_errors as f64),
                ("wrong_slave".to_string(), c.wrong_slave as f64),
                (
                    "degraded".to_string(),
                    if self.scheduler.is_degraded(i) {
                        1.0
                    } else {
                        0.0
                    },
                ),
            ]);
            let m = Measurement::new(
                ReadingId::new(
                    self.site.clone(),
                    self.spec.devices[i].name.clone(),
                    health.clone(),
                ),
                seg("modbus_device"),
                ts_ms,
                Quality::Good,
                fields,
            );
            if let Err(e) = self.producer.send(&m.topic(), m).await {
                d.not_sent(&e);
            }
        }
    }
}

fn classify(result: tokio_modbus::Result<Vec<u16>>) -> Attempt {
    match result {
        Ok(Ok(words)) => Attempt::Words(words),
        Ok(Err(code)) => Attempt::Exception(exception_code(code)),
        Err(tokio_modbus::Error::Protocol(tokio_modbus::ProtocolError::HeaderMismatch {
            message,
            ..
        })) => Attempt::WrongSlave(message),
        Err(tokio_modbus::Error::Protocol(e)) => Attempt::Garbled(e.to_string()),
        Err(tokio_modbus::Error::Transport(e)) if e.kind() == io::ErrorKind::InvalidData => {
            Attempt::Garbled(chain(&e))
        }
        Err(tokio_modbus::Error::Transport(e)) => Attempt::LinkLost(e),
    }
}

fn exception_code(code: ExceptionCode) -> u8 {
    u8::from(code)
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
