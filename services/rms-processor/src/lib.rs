//! rms-processor: raw sample frames from the bus to RMS current, power and energy.
//!
//! Reads `wattbus/v1/<site>/raw/<device>` ([`proto::RawFrame`]) as sink group `group`, cuts
//! each device's samples into windows of `interval_ms`, computes per channel RMS current over
//! whole mains cycles with the DC offset removed per window, and — with a paired voltage
//! channel — RMS voltage, real and apparent power and power factor; without one, apparent
//! power from a nominal voltage, labelled so. Energy is integrated per channel into counters
//! that only grow and survive restarts. Writes `wattbus/v1/<site>/meas/<device>/<channel>`
//! ([`proto::Measurement`], measurement `power`) through the `meas` stream of its journal.
//!
//! Delivery: readings leave only at a checkpoint, which saves the energy counters with the
//! per-device mark of what they hold and the readings themselves, then journals the readings,
//! fsyncs the journal, and only then acknowledges the frames whose every sample is behind the
//! mark. A crash replays
//! unacknowledged frames; samples before the saved mark are skipped and the windows after it
//! are cut exactly as before, so the replayed measurements are identical and no energy is
//! counted twice (see `window`).
//!
//! Invariants of the processing loop:
//! - **A window carries its device.** Each device's assembler stamps its name on every window
//!   it cuts, and a window is computed, labelled, counted and marked under that name only.
//!   Windows come out of a frame of their device, of a checkpoint's wait running out or of an
//!   idle flush: none of these can lend its device to another's window.
//! - **No input ends the loop or stops a device.** A frame that cannot be used (see `check`) is
//!   dead-lettered and acknowledged; a reading that cannot be stored is dead-lettered and its
//!   energy not counted; the device's next frames are used as usual. Only shutdown ends the
//!   loop. A journal or disk that fails makes the checkpoint fail: readings wait in memory
//!   (up to `MAX_WAITING` of them, then no more frames are taken) and nothing is
//!   acknowledged until a checkpoint succeeds.
//!
//! Layout:
//! - `config`: the `[rms_processor]` section.
//! - `check`: frames that would poison a device's state, refused (pure).
//! - `kernel`: whole-cycle RMS, power and PF of one window (pure, benchmarked).
//! - `window`: frames to windows per device, the mark, which frames are done (pure).
//! - `measure`: one window to one reading per channel, with energy (pure).
//! - `energy`: import/export counters and marks, saved atomically (std only).
//! - `events`: per device and overall, every counter and notable log line (dead letters,
//!   implausible readings, failed checkpoints), with the error kinds it counts.

pub mod check;
pub mod config;
pub mod energy;
mod events;
pub mod kernel;
pub mod measure;
pub mod window;

use std::collections::HashMap;
use std::time::Duration;

pub use config::{Config, Plan};

use proto::{DeadLetter, Filter, Measurement, Payload as _, RawFrame, Segment, Topic};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{AckToken, Acker, Delivery, DeliveryError, Inbox, Producer};
use runtime::telemetry::chain;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::energy::{Energy, EnergyError};
use crate::events::Events;
use crate::window::{Assembler, Channel, Window};

/// Most readings waiting for a checkpoint that keeps failing (a full or failing disk). Past
/// this no more frames are taken: they wait unacknowledged at their producer instead of in
/// this process's memory (~1 kB a reading).
const MAX_WAITING: usize = 10_000;

/// The section name in the config file.
pub const SECTION: &str = "rms_processor";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Energy(#[from] EnergyError),
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct RmsProcessor;

impl runtime::Service for RmsProcessor {
    const NAME: &'static str = "rms-processor";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "raw sample frames to RMS current, power and energy";
    const ERROR_KINDS: &'static [&'static str] = events::ERROR_KINDS;
    type Config = Config;
    type Plan = Plan;
    type Error = Error;

    fn resolve(config: Config, section: &str) -> Result<Plan, runtime::ConfigError> {
        config.resolve(section)
    }

    fn health_listen(plan: &Plan) -> Option<std::net::SocketAddr> {
        plan.health_listen
    }

    fn run(
        plan: Plan,
        ctx: Context,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send {
        run(plan, ctx)
    }
}

/// Identity of the processor on the bus.
pub fn identity(config: &Config) -> Identity {
    Identity {
        service: seg("rms-processor"),
        instance: config.instance.clone(),
    }
}

/// Run the processor until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await
}

type Token = (AckToken, Acker);

/// One device's window assembler. Its name is in the assembler (stamped on every window) and
/// is the key it is kept under; its counters are in [`Events::device`].
struct Device {
    name: Segment,
    frames: Assembler<Option<Token>>,
    last_frame: tokio::time::Instant,
}

impl Device {
    fn new(name: Segment, cfg: &Config, mark: Option<i64>) -> Self {
        Self {
            frames: Assembler::new(
                name.clone(),
                cfg.interval_ms as f64 / 1000.0,
                // Two mains cycles: the least the kernel can cut a whole cycle from.
                2.0 / cfg.mains_hz,
                mark,
            ),
            name,
            last_frame: tokio::time::Instant::now(),
        }
    }
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, config: &Plan, ctx: &Context) -> Result<(), Error> {
    let site = &ctx.common.site;
    let energy = Energy::load(&config.energy_path(&ctx.common.data_dir))?;
    let (producer, producer_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(site), None),
        &config.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;

    // One subscription per device this instance owns (or one for all), each drained by its
    // own task into one queue. Decoding (the costly part: JSON floats) happens in those tasks,
    // off the processing loop, and a full processing queue holds back only the forwarders,
    // never the MQTT event loop for longer than the bus's own bound.
    let filters: Vec<Filter<RawFrame>> = if config.devices.is_empty() {
        vec![Filter::raw(Some(site), None)]
    } else {
        config
            .devices
            .iter()
            .map(|d| Filter::raw(Some(site), Some(d)))
            .collect()
    };
    let (tx, mut rx) = mpsc::channel::<(Delivery<RawFrame>, Acker)>(64);
    let mut forwarders: Vec<JoinHandle<()>> = Vec::new();
    let mut ack_tasks: Vec<JoinHandle<()>> = Vec::new();
    for f in &filters {
        let (mut inbox, ack_task) = Inbox::subscribe(bus, f, &config.group, &config.inbox);
        ack_tasks.push(ack_task);
        let tx = tx.clone();
        forwarders.push(tokio::spawn(async move {
            let acker = inbox.acker();
            while let Some(d) = inbox.recv().await {
                if tx.send((d, acker.clone())).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let ready = ctx.health.check("rms-processor");
    ready.set(true);
    tracing::info!(
        devices = ?config.devices,
        interval_ms = config.interval_ms,
        mains_hz = config.mains_hz,
        energy_file = %energy.path().display(),
        "Processing raw frames."
    );

    // Readings committed with the counters before a crash may not have reached the journal:
    // they go out (again) at the first checkpoint, which runs at once.
    let waiting = energy.outbox().to_vec();
    if !waiting.is_empty() {
        tracing::info!(
            readings = waiting.len(),
            "Journaling the readings saved with the energy counters at the last checkpoint (some may be stored already; the same readings again)."
        );
    }
    let mut p = Processor {
        cfg: config,
        site,
        bus,
        producer: &producer,
        energy,
        devices: HashMap::new(),
        waiting,
        scratch: Vec::new(),
        events: Events::new(),
    };
    let mut checkpoint =
        tokio::time::interval(Duration::from_millis(config.checkpoint_interval_ms));
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = ctx.shutdown.wait() => break,
            // While checkpoints fail, readings pile up in memory: past the bound, frames wait
            // at their producer instead.
            got = rx.recv(), if p.waiting.len() < MAX_WAITING => {
                let Some((delivery, acker)) = got else { break };
                p.frame(delivery, acker).await;
            }
            _ = checkpoint.tick() => p.tick().await,
        }
    }
    // A clean stop: what is computed is made durable and acknowledged; samples held short of
    // a window stay unacknowledged and come back as a replay.
    if let Err(e) = p.checkpoint().await {
        p.events.final_checkpoint_failed(&e, p.waiting.len());
    }
    drop(rx);
    drop(p);
    for f in forwarders {
        f.abort();
        let _ = f.await;
    }
    for t in ack_tasks {
        if tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
        {
            tracing::warn!(
                "Acknowledgement flush did not finish in 5 s; the producer will replay."
            );
        }
    }
    if let Err(e) = producer_task.await {
        tracing::warn!(error = %chain(&e), "Producer task ended abnormally.");
    }
    Ok(())
}

/// How long after the last sample counted from its producer a device takes frames from
/// another one (see [`Processor::owned_by`]): 10 minutes of the device's samples.
const OWNER_MOVES_AFTER_US: i64 = 10 * 60 * 1_000_000;

/// The processing loop's state.
struct Processor<'a> {
    cfg: &'a Config,
    site: &'a Segment,
    bus: &'a Bus,
    producer: &'a Producer,
    energy: Energy,
    /// Keyed by device name, which is also stamped on every window its assembler cuts.
    devices: HashMap<Segment, Device>,
    /// Readings computed since the last checkpoint, oldest first: journaled at the next one,
    /// together with the energy counters they carry (see [`Processor::checkpoint`]).
    waiting: Vec<Measurement>,
    scratch: Vec<f32>,
    events: Events,
}

impl Processor<'_> {
    /// One frame in: refused, or added to its device's windows.
    async fn frame(&mut self, delivery: Delivery<RawFrame>, acker: Acker) {
        self.events.frame();
        let Delivery {
            topic,
            message: frame,
            token,
        } = delivery;
        let now_us = proto::now_ms().saturating_mul(1000);
        let ahead_us = i64::try_from(self.cfg.max_ahead_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        if let Err(refused) = check::frame(&frame, &topic, self.site, now_us, ahead_us) {
            if refused.kind == "clock" {
                // Not the frame's fault: left unacknowledged, its producer replays it, and
                // once this host's clock is set it is judged again.
                self.events.device(frame.device.as_str()).clock_not_set();
                return;
            }
            // Named after the device of its topic, which the broker let its producer publish
            // on (the payload may claim another).
            let device = proto::parse(&topic)
                .and_then(|t| t.rest.into_iter().next())
                .unwrap_or_else(|| frame.device.clone());
            // Its output is the dead letter: once that is out, the frame is done with.
            let payload = serde_json::to_vec(&frame).unwrap_or_default();
            let sent = self
                .dead_letter(
                    device.as_str(),
                    refused.kind,
                    &refused.reason,
                    &topic,
                    &payload,
                )
                .await;
            if sent && let Some(t) = token {
                acker.ack(&t);
            }
            return;
        }
        if !self.cfg.handles(frame.device.as_str()) {
            // Not ours (a filter for all devices cannot be narrower): whoever owns it
            // acknowledges it.
            self.events.foreign();
            return;
        }
        match &frame.origin {
            Some(origin) => {
                if !self.owned_by(&frame.device, origin.producer.as_str(), frame.start_ts_us) {
                    // Left unacknowledged: if the device really moved, its new producer
                    // replays these once the move is accepted; a forger's journal keeps its
                    // own frames.
                    return;
                }
            }
            None => {
                // No origin: a producer whose journal could not take it published it as the
                // best it could do, or anyone with a producer login did, and nothing tells
                // which. For a device that has an owner it is not used: an origin-less frame
                // dated ahead silenced a device like another producer's, and a chain of them
                // continuing its samples exactly (a reader sees where they end) replaced its
                // readings with forged ones (hostile reviews).
                if self.energy.owner(frame.device.as_str()).is_some() {
                    let payload = serde_json::to_vec(&frame).unwrap_or_default();
                    let device = frame.device.to_string();
                    self.dead_letter(
                        &device,
                        "origin",
                        "a frame without an origin (not from a producer's journal): it cannot \
                         be told from a forgery, and would move the device's mark",
                        &topic,
                        &payload,
                    )
                    .await;
                    return;
                }
            }
        }
        let energy = &self.energy;
        let dev = self.devices.entry(frame.device.clone()).or_insert_with(|| {
            Device::new(
                frame.device.clone(),
                self.cfg,
                energy.mark(frame.device.as_str()),
            )
        });
        dev.last_frame = tokio::time::Instant::now();
        let n = frame.channels.first().map_or(0, |c| c.samples.len());
        let events = self.events.device(frame.device.as_str());
        events.samples(n);
        let channels = frame
            .channels
            .into_iter()
            .map(|c| Channel {
                name: c.channel,
                unit: c.unit,
                samples: c.samples,
            })
            .collect();
        let mut windows = Vec::new();
        // A frame that did not come through a journal (no origin) has nothing to acknowledge.
        let pushed = dev.frames.push(
            frame.start_ts_us,
            frame.sample_rate_hz,
            frame.continues,
            channels,
            token.map(|t| (t, acker)),
            clock_ms(),
            &mut windows,
        );
        events.pushed(pushed);
        self.compute(windows).await;
    }

    /// Whether `device` takes frames from `producer` (the origin the broker let it claim).
    ///
    /// A device takes the frames of one producer: the first one it got frames from, recorded
    /// with its energy. Frames of it from another producer are refused while the device is
    /// live: another producer's frames, dated up to `max_ahead_ms` ahead, moved the device's
    /// mark past its real frames, which were then skipped as already counted, acknowledged
    /// and lost, for as long as the forger went on (hostile review). A device that moved to
    /// another producer (a serial-ingest instance renamed, a sensor moved to another Pi) is
    /// taken from the new one once its samples start [`OWNER_MOVES_AFTER_US`] after the last
    /// sample counted from the old one.
    fn owned_by(&mut self, device: &Segment, producer: &str, start_us: i64) -> bool {
        let Some(owner) = self.energy.owner(device.as_str()) else {
            self.energy.set_owner(device.as_str(), producer);
            return true;
        };
        if owner == producer {
            return true;
        }
        let counted = self
            .devices
            .get(device)
            .and_then(|d| d.frames.mark())
            .or_else(|| self.energy.mark(device.as_str()));
        let owner = owner.to_string();
        if counted.is_none_or(|m| start_us >= m.saturating_add(OWNER_MOVES_AFTER_US)) {
            self.events.device(device.as_str()).moved(&owner, producer);
            self.energy.set_owner(device.as_str(), producer);
            return true;
        }
        self.events
            .device(device.as_str())
            .other_producer(&owner, producer);
        false
    }

    /// The checkpoint tick: holds whose wait ran out and quiet devices are closed, then the
    /// checkpoint.
    async fn tick(&mut self) {
        let mut windows = Vec::new();
        let idle = Duration::from_millis(self.cfg.idle_flush_ms);
        for dev in self.devices.values_mut() {
            let released =
                dev.frames
                    .release_waiting(clock_ms(), self.cfg.reorder_ms, &mut windows);
            let events = self.events.device(dev.name.as_str());
            if released.held_released {
                events.hole_unfilled(self.cfg.reorder_ms);
            }
            events.pushed(released);
            if dev.frames.held_samples() > 0 && dev.last_frame.elapsed() >= idle {
                events.flushed(dev.frames.flush(&mut windows));
            }
        }
        // Windows of several devices, each labelled by its own.
        self.compute(windows).await;
        match self.checkpoint().await {
            // Shutdown came while the journal was full: the final checkpoint reports it.
            Ok(()) | Err(Error::Delivery(DeliveryError::Stopped)) => {}
            Err(e) => self.events.checkpoint_failed(&e, self.waiting.len()),
        }
    }

    /// Compute `windows` (of any devices) into readings that wait for the checkpoint.
    async fn compute(&mut self, windows: Vec<Window>) {
        for w in windows {
            let events = self.events.device(w.device.as_str());
            events.window(w.partial);
            let out =
                measure::measurements(self.cfg, self.site, &w, &mut self.energy, &mut self.scratch);
            for (channel, power) in &out.implausible {
                events.implausible(channel.as_str(), *power);
            }
            for (m, reason) in out.invalid {
                let payload = serde_json::to_vec(&m).unwrap_or_default();
                self.dead_letter(
                    w.device.as_str(),
                    "unstorable_reading",
                    &reason,
                    m.topic().as_str(),
                    &payload,
                )
                .await;
            }
            self.waiting.extend(out.readings);
        }
    }

    /// Publish a dead letter for `device`; says whether it went out.
    async fn dead_letter(
        &mut self,
        device: &str,
        kind: &'static str,
        reason: &str,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        self.events.device(device).dead_lettered(kind, reason);
        let service = self.bus.service().clone();
        let dl = DeadLetter::new(
            service.clone(),
            format!("device {device}: {reason}"),
            topic,
            payload,
        );
        match dl.encode() {
            Ok(bytes) => {
                let to = Topic::dead_letter(self.site, &service);
                self.bus.publish_or_defer(to.as_str(), bytes).await
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "Could not encode a dead letter.");
                false
            }
        }
    }

    /// The checkpoint, the only moment anything computed leaves the processor, in this order:
    ///
    /// 1. the readings journaled at earlier checkpoints are made durable: the output journal
    ///    is fsynced, unless every sink group has stored them already (the usual case: the
    ///    writer stores within about a second, and the journal is then not fsynced at all);
    /// 2. the energy counters, every device's mark and the readings waiting (the *outbox*)
    ///    are saved in one atomic write (fsynced, renamed): the commit;
    /// 3. the waiting readings are journaled (written to the kernel: they are durable in the
    ///    outbox until the next commit, and step 1 of the next checkpoint takes over);
    /// 4. the frames whose every sample is behind the mark are acknowledged.
    ///
    /// A step that fails stops the rest, and the next checkpoint starts again at 1 with what
    /// is still waiting.
    ///
    /// Why in this order. A frame is acknowledged only once the readings of its windows are
    /// journaled and durable (in the saved outbox), and the counters holding their energy
    /// saved: ARCHITECTURE invariant 3, and more, which is why `Acker::ack_after_sync` (which
    /// waits for the output only) is not used: a frame acknowledged before its energy is saved is never replayed, so
    /// after a crash its energy would be missing from the counters. And a reading is journaled
    /// only after the counters it shows are saved, with the reading itself in the outbox,
    /// which a restart journals again: whenever the process dies, no stored reading is ahead
    /// of the saved counters, so after a restart whose frames are gone (a raw journal in
    /// memory, `wattbus demo` killed -9) the counters resume at the last stored reading, never
    /// below it (a counter that goes down reads as a reset on every dashboard); and no
    /// reading of a window behind a saved mark can be lost, since the mark and the reading
    /// are saved together. Tested in
    /// `frames_are_acknowledged_only_by_a_checkpoint_after_their_readings_are_journaled` and
    /// `a_restart_that_lost_its_frames_labels_every_reading_with_its_own_device`.
    async fn checkpoint(&mut self) -> Result<(), Error> {
        // The commit below replaces the outbox: what the last one held must be durable in
        // the journal (or stored by every sink) first.
        self.producer.sync_unstored().await?;
        for dev in self.devices.values() {
            if let Some(mark) = dev.frames.mark() {
                self.energy.set_mark(dev.name.as_str(), mark);
            }
        }
        self.energy.set_outbox(&self.waiting);
        if let Some(snapshot) = self.energy.snapshot()? {
            // An fsync on an SD card can take long: off the async workers (the demo runs
            // every service on them).
            tokio::task::spawn_blocking(move || snapshot.write())
                .await
                .map_err(|_| DeliveryError::Stopped)??;
            self.energy.saved();
        }
        let mut sent = 0;
        let mut result: Result<(), Error> = Ok(());
        for m in &self.waiting {
            // A reading the journal cannot take (disk full) is waited for, never published
            // without a guarantee: its frames stay unacknowledged meanwhile, and the outbox
            // saved above still holds it should the process stop first.
            match self.producer.send_journaled(&m.topic(), m.clone()).await {
                Ok(_) => sent += 1,
                Err(DeliveryError::Encode(e)) => {
                    // `measure` checked it before counting its energy; kept for safety, so
                    // one reading can never hold up the others.
                    sent += 1;
                    self.events
                        .device(m.device.as_str())
                        .dead_lettered("unstorable_reading", &e.to_string());
                }
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        // Journaled: they stay in the saved outbox until the next commit, so a crash before
        // it journals them once more (the same readings again).
        self.waiting.drain(..sent);
        result?;
        for dev in self.devices.values_mut() {
            for (token, acker) in dev.frames.done().into_iter().flatten() {
                acker.ack(&token);
            }
        }
        Ok(())
    }
}

/// A monotonic millisecond clock for the resume wait.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

pub(crate) fn seg(s: &str) -> Segment {
    // Only called with literals and names that were Segments already.
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
