//! node-health: this node's own health on the bus, as readings. Every `interval_ms` it reads
//! the kernel's files — CPU time, load, memory, the CPU's temperature, the Raspberry Pi
//! firmware's throttling flags, the data disk's space and how fast its card is written, uptime
//! — and publishes one reading per group through its journal, as a meter's readings are: they
//! reach InfluxDB and Grafana, and are never lost, the same way.
//!
//! Topics written: `wattbus/v1/<site>/meas/<node>/<channel>`, measurement `node_health`,
//! channels `cpu`, `load`, `memory`, `temperature`, `throttling`, `disk` and `uptime` (fields
//! and units in docs/node-health.md), through the `meas` stream of its producer (journal,
//! acknowledgements, replay). `<node>` is the `node` key, by default the hostname.
//!
//! Why a small service of its own rather than a part of another:
//! - **One per node, where the hardware is.** CPU, temperature, the firmware's under-voltage
//!   flag and the SD card can only be read on the machine itself, and every node has them —
//!   a Pi with only sensors, a second Pi by the garage meter — while the writer and the
//!   bridges run once per site, possibly elsewhere.
//! - **It cannot stall the data path.** A sysfs attribute is driver code (`get_throttled`
//!   asks the Pi's firmware over a mailbox) and statvfs(3) blocks on a stuck mount: a read
//!   that hangs, or a bug that crashes this process, stops only the node's health, never the
//!   ingestion, processing or delivery of readings in another service.
//! - **It costs little.** A few small reads of procfs and sysfs every ten seconds, seven
//!   journal records, no dependency beyond the runtime's (statvfs through `nix`, already in
//!   the binary), and its own small memory.
//!
//! Sources that fail are left out of their reading and counted ([`ERROR_KINDS`]), never
//! published as zero; sources a machine does not have (no thermal zone, not a Pi) are said
//! once at start and left out.
//!
//! Layout:
//! - `config`: the `[node_health]` section and its plan.
//! - `sample`: the pure core — parsers of each file's text, and the [`sample::Sampler`] that
//!   keeps the previous counters and turns a snapshot into readings (no tokio, no I/O).
//! - `sources`: where the files are on this machine (found once at start) and reading a
//!   snapshot of them (blocking std I/O, bounded reads).
//! - `events`: every log line and counter.

pub mod config;
mod events;
pub mod sample;
pub mod sources;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use proto::{Filter, Measurement, Quality, ReadingId, Segment};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::delivery::{DeliveryError, Producer};

pub use config::{Config, Plan};
use events::Events;
use sample::{Sampler, Snapshot, Source};
use sources::Sources;

/// The section name in the config file.
pub const SECTION: &str = "node_health";
/// The measurement of every reading (docs/node-health.md).
pub const MEASUREMENT: &str = "node_health";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("finding this node's sources ended abnormally: {0}")]
    Discovery(#[source] tokio::task::JoinError),
}

/// Its own kinds of `wattbus_errors_total`.
pub use events::ERROR_KINDS;

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct NodeHealth;

impl runtime::Service for NodeHealth {
    const NAME: &'static str = "node-health";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "this node's own health as readings: CPU, load, memory, CPU temperature, Pi throttling, disk space and writes, uptime";
    const ERROR_KINDS: &'static [&'static str] = ERROR_KINDS;
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

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|_| unreachable!("valid literal segment {s}"))
}

/// Its identity on the bus: the instance is the MQTT client id and the journal's producer.
pub fn identity(plan: &Plan) -> Identity {
    Identity {
        service: seg("node-health"),
        instance: plan.instance.clone(),
    }
}

/// Run until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await
}

/// A snapshot with the moment it was taken.
struct Taken {
    snapshot: Snapshot,
    /// The readings' time (Unix ms).
    ts_ms: i64,
    /// For rates: the monotonic clock.
    at: Instant,
}

impl Taken {
    fn now(sources: &Sources) -> Taken {
        let (ts_ms, at) = (proto::now_ms(), Instant::now());
        Taken {
            snapshot: sources.read(),
            ts_ms,
            at,
        }
    }
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let events = Events::new();
    let (producer, producer_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(&ctx.common.site), Some(&plan.node)),
        &plan.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;
    events.started(&plan.node, &plan.node_name, plan.interval);
    // Off the async threads: a sysfs read at start may hang as well as any later.
    let mut found = {
        let (plan, data_dir) = (plan.clone(), ctx.common.data_dir.clone());
        tokio::task::spawn_blocking(move || sources::discover(&plan, &data_dir))
    };
    // A hanging read at start (a thermal zone's driver that never answers) shows as it does
    // later: not ready, an ERROR each interval, `stuck` counted — never a silent service.
    let ready = ctx.health.check("node-health");
    let waiting_since = std::time::Instant::now();
    let sources = loop {
        tokio::select! {
            () = ctx.shutdown.wait() => break None,
            r = &mut found => break Some(Arc::new(r.map_err(Error::Discovery)?)),
            () = tokio::time::sleep(plan.interval) => {
                ready.set(false);
                events.sample_stuck(waiting_since.elapsed());
            }
        }
    };
    if let Some(sources) = sources {
        events.found(&sources);
        sample_until_shutdown(plan, ctx, &events, &producer, sources).await;
    }
    drop(producer);
    if let Err(e) = producer_task.await {
        events.task_failed("readings stream", &e);
    }
    Ok(())
}

async fn sample_until_shutdown(
    plan: &Plan,
    ctx: &Context,
    events: &Events,
    producer: &Producer,
    sources: Arc<Sources>,
) {
    let ready = ctx.health.check("node-health");
    ready.set(true);
    let started = Instant::now();
    let mut sampler = Sampler::new(sources.writes.devices());
    // Sources failing now, with how many samples they have failed.
    let mut failing: BTreeMap<Source, u64> = BTreeMap::new();
    // A sample that did not finish in time, and how many ticks were skipped for it: only one
    // read runs at a time, so a hanging one holds one blocking thread, not one per tick.
    let mut hanging: Option<(tokio::task::JoinHandle<Taken>, u64)> = None;
    let mut tick = tokio::time::interval(plan.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = ctx.shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        if let Some((job, skipped)) = &mut hanging {
            if !job.is_finished() {
                *skipped += 1;
                events
                    .sample_stuck(plan.interval * u32::try_from(*skipped + 1).unwrap_or(u32::MAX));
                continue;
            }
            // What it read is stale by now: dropped.
            events.sample_unstuck(*skipped);
            hanging = None;
            ready.set(true);
        }
        let mut job = {
            let sources = sources.clone();
            tokio::task::spawn_blocking(move || Taken::now(&sources))
        };
        // `None`: not within the interval, the read hangs.
        let outcome = tokio::select! {
            () = ctx.shutdown.wait() => break,
            r = tokio::time::timeout(plan.interval, &mut job) => r.ok(),
        };
        let taken = match outcome {
            Some(Ok(taken)) => taken,
            Some(Err(e)) => {
                events.task_failed("sample", &e);
                continue;
            }
            None => {
                events.sample_stuck(plan.interval);
                ready.set(false);
                hanging = Some((job, 0));
                continue;
            }
        };
        let sample = sampler.sample(&taken.snapshot, taken.at.saturating_duration_since(started));
        for (source, outcome) in &sample.outcomes {
            match outcome {
                Err(e) => {
                    let n = failing.entry(*source).or_insert(0);
                    *n += 1;
                    events.source_failed(*source, &sources.path(*source), e, *n == 1);
                }
                Ok(()) => {
                    if let Some(n) = failing.remove(source) {
                        events.source_recovered(*source, &sources.path(*source), n);
                    }
                }
            }
        }
        for (channel, fields) in sample.groups {
            let id = ReadingId::new(
                ctx.common.site.clone(),
                plan.node.clone(),
                seg(channel.as_str()),
            );
            let m = Measurement::new(id, seg(MEASUREMENT), taken.ts_ms, Quality::Good, fields);
            // A journal that refuses it (disk full) is the producer's to report; the next
            // sample tries again.
            if let Err(e) = producer.send(&m.topic(), m).await {
                events.reading_not_sent(&plan.node, &e);
            }
        }
    }
    ready.set(false);
}
