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
//! Delivery: a frame is acknowledged only at a checkpoint after every window holding its
//! samples is journaled and fsynced *and* the energy counters (with the per-device mark of
//! what they hold) are saved. A crash replays unacknowledged frames; samples before the saved
//! mark are skipped and the windows after it are cut exactly as before, so the replayed
//! measurements are identical and no energy is counted twice (see `window`).
//!
//! Layout:
//! - `config`: the `[rms_processor]` section.
//! - `kernel`: whole-cycle RMS, power and PF of one window (pure, benchmarked).
//! - `window`: frames to windows per device, the mark, which frames are done (pure).
//! - `measure`: one window to one reading per channel (pure).
//! - `energy`: import/export counters and marks, saved atomically (std only).

pub mod config;
pub mod energy;
pub mod kernel;
pub mod measure;
pub mod window;

use std::collections::HashMap;
use std::time::Duration;

pub use config::Config;

use proto::{Filter, Measurement, Quality, RawFrame, Segment, Topic};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{AckToken, Acker, Delivery, DeliveryError, Inbox, Producer};
use runtime::telemetry::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::energy::{Energy, EnergyError};
use crate::window::{Assembler, Channel, Window};

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

/// Identity of the processor on the bus.
pub fn identity(config: &Config) -> Identity {
    Identity {
        service: seg("rms-processor"),
        instance: config.instance.clone(),
    }
}

/// Run the processor until shutdown.
pub async fn run(config: Config, ctx: Context) -> Result<(), Error> {
    ctx.clone()
        .on_bus(&identity(&config), |bus| async move {
            run_on(&bus, &config, &ctx).await
        })
        .await
}

type Token = (AckToken, Acker);

struct Device {
    name: Segment,
    frames: Assembler<Option<Token>>,
    last_frame: tokio::time::Instant,
    windows: Counter,
    partial: Counter,
    samples: Counter,
    duplicate: Counter,
    gaps: Counter,
    discarded: Counter,
    unfilled: Counter,
}

impl Device {
    fn new(name: Segment, cfg: &Config, mark: Option<i64>) -> Self {
        let d = name.as_str().to_string();
        let labels: [(&'static str, &str); 1] = [("device", &d)];
        Self {
            frames: Assembler::new(
                cfg.interval_ms as f64 / 1000.0,
                // Two mains cycles: the least the kernel can cut a whole cycle from.
                2.0 / cfg.mains_hz,
                mark,
            ),
            name,
            last_frame: tokio::time::Instant::now(),
            windows: Counter::new(
                "wattbus_rms_windows_total",
                "Windows computed (one reading per channel each).",
                &labels,
            ),
            partial: Counter::new(
                "wattbus_rms_partial_windows_total",
                "Windows closed short of the interval (a hole in the samples, a layout change, an idle device).",
                &labels,
            ),
            samples: Counter::new(
                "wattbus_rms_samples_total",
                "Samples received (per channel-instant: a 3-channel frame of 2000 counts 2000).",
                &labels,
            ),
            duplicate: Counter::new(
                "wattbus_rms_duplicate_samples_total",
                "Samples received again (replays) and skipped because they were already used.",
                &labels,
            ),
            gaps: Counter::new(
                "wattbus_rms_gaps_total",
                "Frames that did not continue the samples before them.",
                &labels,
            ),
            discarded: Counter::new(
                "wattbus_rms_discarded_samples_total",
                "Samples discarded because a run ended with fewer than two mains cycles of them.",
                &labels,
            ),
            unfilled: Counter::new(
                "wattbus_rms_unfilled_holes_total",
                "Holes in the frames that no replay filled within reorder_ms (lost in transport and not replayed).",
                &labels,
            ),
        }
    }
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, config: &Config, ctx: &Context) -> Result<(), Error> {
    let site = &ctx.common.site;
    let mut energy = Energy::load(&config.energy_path(&ctx.common.data_dir))?;
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

    let frames_total = Counter::new("wattbus_rms_frames_total", "Raw frames received.", &[]);
    let foreign = Counter::new(
        "wattbus_rms_foreign_frames_total",
        "Frames of devices another instance processes (left unacknowledged for it).",
        &[],
    );
    let mut devices: HashMap<Segment, Device> = HashMap::new();
    let mut scratch = Vec::new();
    let mut windows = Vec::new();
    let mut checkpoint =
        tokio::time::interval(Duration::from_millis(config.checkpoint_interval_ms));
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle = Duration::from_millis(config.idle_flush_ms);
    let mut result = Ok(());
    loop {
        tokio::select! {
            () = ctx.shutdown.wait() => break,
            got = rx.recv() => {
                let Some((delivery, acker)) = got else { break };
                frames_total.inc();
                let frame = delivery.message;
                if !config.handles(frame.device.as_str()) {
                    // Not ours (a filter for all devices cannot be narrower): whoever owns it
                    // acknowledges it.
                    foreign.inc();
                    continue;
                }
                let dev = devices.entry(frame.device.clone()).or_insert_with(|| {
                    Device::new(frame.device.clone(), config, energy.mark(frame.device.as_str()))
                });
                dev.last_frame = tokio::time::Instant::now();
                let n = frame.channels.first().map_or(0, |c| c.samples.len());
                dev.samples.add(n as u64);
                let channels = frame
                    .channels
                    .into_iter()
                    .map(|c| Channel { name: c.channel.into(), unit: c.unit.into(), samples: c.samples })
                    .collect();
                let Some(token) = delivery.token else {
                    // Not journaled by its producer: nothing to acknowledge, use it as it is.
                    let pushed = dev.frames.push(frame.start_ts_us, frame.sample_rate_hz, frame.continues, channels, None, clock_ms(), &mut windows);
                    count(dev, pushed);
                    if let Err(e) = publish(config, site, dev, &mut windows, &producer, &mut energy, &mut scratch).await {
                        result = Err(e);
                        break;
                    }
                    continue;
                };
                let pushed = dev.frames.push(
                    frame.start_ts_us,
                    frame.sample_rate_hz,
                    frame.continues,
                    channels,
                    Some((token, acker)),
                    clock_ms(),
                    &mut windows,
                );
                count(dev, pushed);
                if let Err(e) = publish(config, site, dev, &mut windows, &producer, &mut energy, &mut scratch).await {
                    result = Err(e);
                    break;
                }
            }
            _ = checkpoint.tick() => {
                for dev in devices.values_mut() {
                    let released = dev.frames.release_waiting(clock_ms(), config.reorder_ms, &mut windows);
                    if released.held_released {
                        dev.unfilled.inc();
                        tracing::warn!(device = %dev.name, wait_ms = config.reorder_ms, "No replay filled a hole in the frames in time; continuing after it (those samples are not counted).");
                    }
                    count(dev, released);
                    if dev.frames.held_samples() > 0 && dev.last_frame.elapsed() >= idle {
                        let discarded = dev.frames.flush(&mut windows);
                        dev.discarded.add(discarded as u64);
                        if let Err(e) = publish(config, site, dev, &mut windows, &producer, &mut energy, &mut scratch).await {
                            result = Err(e);
                        }
                    }
                }
                if result.is_err() {
                    break;
                }
                if let Err(e) = save_and_ack(&producer, &mut energy, &mut devices).await {
                    tracing::error!(error = %e, "Checkpoint failed; frames stay unacknowledged and will be replayed.");
                }
            }
        }
    }
    // A clean stop: what is computed is made durable and acknowledged; samples held short of
    // a window stay unacknowledged and come back as a replay.
    if let Err(e) = save_and_ack(&producer, &mut energy, &mut devices).await {
        tracing::error!(error = %e, "Final checkpoint failed; the next start replays more.");
    }
    drop(rx);
    drop(devices);
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
        tracing::warn!(error = %e, "Producer task ended abnormally.");
    }
    result
}

fn count(dev: &Device, p: window::Pushed) {
    dev.duplicate.add(p.duplicate_samples as u64);
    dev.discarded.add(p.discarded_samples as u64);
    if p.gap {
        dev.gaps.inc();
        tracing::debug!(device = %dev.name, "Frame does not continue the samples before it; window closed early.");
    }
}

/// Compute and journal every window in `windows`, integrate energy, move the device's mark.
async fn publish(
    cfg: &Config,
    site: &Segment,
    dev: &mut Device,
    windows: &mut Vec<Window>,
    producer: &Producer,
    energy: &mut Energy,
    scratch: &mut Vec<f32>,
) -> Result<(), Error> {
    for w in windows.drain(..) {
        dev.windows.inc();
        if w.partial {
            dev.partial.inc();
        }
        // The reading's time is the end of its window: when the value was complete. It comes
        // from the sample clock, so a replayed window carries the same time as the first.
        let ts_ms = w.end_us.div_euclid(1000);
        let dt_s = w.duration_s();
        for r in measure::window(cfg, dev.name.as_str(), &w, scratch) {
            let mut fields = r.fields;
            if let Some(p) = r.power_for_energy {
                let key = measure::energy_key(dev.name.as_str(), &r.channel, r.basis);
                let c = energy.add(&key, p, dt_s, ts_ms);
                match r.basis {
                    measure::Basis::NominalVoltage(_) => {
                        fields.insert("apparent_energy_vah".into(), c.import_wh);
                    }
                    _ => {
                        fields.insert("energy_import_wh".into(), c.import_wh);
                        fields.insert("energy_export_wh".into(), c.export_wh);
                    }
                }
                // A reset (`wattbus energy reset`) shows in every reading after it, so a
                // dashboard can tell a counter that restarted from one that ran backwards.
                fields.insert("energy_resets".into(), f64::from(c.resets));
            }
            let Ok(channel) = Segment::new(r.channel.clone()) else {
                continue; // came from a Segment in the frame: cannot happen
            };
            let m = Measurement {
                origin: None,
                site: site.clone(),
                device: dev.name.clone(),
                channel: channel.clone(),
                measurement: seg("power"),
                ts_ms,
                quality: Quality::Good,
                fields,
                tags: [(seg("power_basis"), seg(r.basis.tag()))].into(),
            };
            let topic = Topic::measurement(site, &dev.name, &channel);
            producer.send(&topic, m).await?;
        }
        energy.set_mark(dev.name.as_str(), w.end_us);
    }
    Ok(())
}

/// The checkpoint: output fsynced, energy saved, then the frames they cover acknowledged.
async fn save_and_ack(
    producer: &Producer,
    energy: &mut Energy,
    devices: &mut HashMap<Segment, Device>,
) -> Result<(), Error> {
    producer.sync().await?;
    energy.save()?;
    for dev in devices.values_mut() {
        for (token, acker) in dev.frames.done().into_iter().flatten() {
            acker.ack(&token);
        }
    }
    Ok(())
}

/// A monotonic millisecond clock for the resume wait.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

fn seg(s: &str) -> Segment {
    // Only called with literals and names that were Segments already.
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
