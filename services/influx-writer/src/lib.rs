//! influx-writer: readings from the bus into InfluxDB (v2 `/api/v2/write` or v1 `/write`), to
//! an HTTP endpoint as JSON, and into rotating local files.
//!
//! One subscription to `wattbus/v1/<site>/meas/+/+` as sink group `group` (shared when
//! `inbox.shared`, so two writers split the load). Readings are batched by count and age and
//! each batch goes to every enabled output. A reading is acknowledged to its producer only
//! when every output has stored it: InfluxDB (or the HTTP endpoint) accepted it, or it is
//! fsynced in that output's spool, or it was dead-lettered; and the file output has fsynced it.
//!
//! Why our own encoder and client rather than the `influxdb2` crate: it writes only to
//! `/api/v2/write` (no InfluxDB 1.x, which is what 32-bit Pis run), escapes `"` but not `\` in
//! string fields, lets NaN and infinity through, cannot turn gzip off, and brings reqwest 0.11
//! with an advisory-affected rustls-webpki, next to the reqwest 0.13 object_store needs.
//!
//! Layout:
//! - `line_protocol`: points, escaping, validation per point, [`Measurement`] mapping (pure;
//!   from the `influx-client` crate, which backup-rotator and the tools share).
//! - `config`: the `[influx_writer]` section.
//! - `http`: one InfluxDB write request and what its answer means.
//! - `post`: one request of the HTTP output (JSON) and what its answer means.
//! - `sink`: a spooled output (splitting, dead letters, spool, backoff), InfluxDB's or HTTP's.
//! - `files`: the rotating-file output (pure std).
//! - `batch`: a batch and its shared acknowledgement.
//! - `events`: every counter and notable log line, per unit (the intake, each output), with
//!   the error kinds it counts.
//!
//! What is stored is judged first: the inbox dead-letters a reading whose payload names
//! another site, device or channel than its topic (the runtime's identity check), and a
//! `good` reading with a value outside the plausible range of its unit (`proto::RANGES`) is
//! stored as `out_of_range`.

pub mod batch;
pub mod config;
mod events;
pub mod files;
pub mod http;
pub mod post;
mod round;
pub mod sink;
pub mod status;

pub use influx_client::line_protocol;

use std::os::unix::fs::DirBuilderExt as _;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Config, Plan};
pub use line_protocol::{FieldValue, LineError, Point, Precision, encode_batch, measurement_point};

#[doc(no_inline)]
pub use proto::Measurement;
use proto::{Filter, Segment};
use runtime::Context;
use runtime::bus::{Bus, Identity};
use runtime::dead_letters::DeadLetterFile;
use runtime::delivery::{AckToken, Acker, Delivery, Inbox};
use runtime::telemetry::chain;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::batch::{Batch, Item};
use crate::files::RotatingFiles;
use crate::sink::{DeadLetters, Endpoint, HttpSink, InfluxSink, Sink, SinkError};

/// The section name in the config file.
pub const SECTION: &str = "influx_writer";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Output(#[from] SinkError),
    #[error("cannot open the readings directory {dir}: {source}")]
    Files {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Claim(#[from] runtime::state::ClaimError),
    #[error("cannot create the state directory {dir}: {source}")]
    State {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct InfluxWriter;

impl runtime::Service for InfluxWriter {
    const NAME: &'static str = "influx-writer";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str = "readings from the bus to InfluxDB, an HTTP endpoint and/or CSV files, acknowledged once stored";
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

/// Identity of the writer on the bus.
pub fn identity(config: &Config) -> Identity {
    Identity {
        service: seg("influx-writer"),
        instance: config.instance.clone(),
    }
}

/// Run the writer until shutdown.
pub async fn run(mut plan: Plan, ctx: Context) -> Result<(), Error> {
    let base = plan.instance.clone();
    let _claim = plan.claim_slot(&ctx.common.data_dir)?;
    tracing::info!(instance = %plan.instance, "Writer slot taken.");
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            let adopter = (plan.max_replicas > 1 && plan.spooled_outputs()).then(|| {
                tokio::spawn(adopt_free_slots(
                    bus.clone(),
                    plan.clone(),
                    base,
                    ctx.clone(),
                ))
            });
            let result = run_on(&bus, &plan, &ctx).await;
            if let Some(adopter) = adopter {
                // It stops at shutdown, its spool position saved.
                let _ended = adopter.await;
            }
            result
        })
        .await
}

/// How often a writer looks for replica slots nobody holds that still have a spool.
const ADOPT_INTERVAL: Duration = Duration::from_secs(30);

/// The spools of replica slots nobody holds (a writer scaled away, or `up` without the
/// `--scale` of before) are written by a writer that runs: their batches were acknowledged to
/// their producers when spooled, so the spool is their only copy. A slot is taken with its
/// lock for the time, so a replica starting meanwhile takes another; an emptied spool is
/// removed, so the slot is not looked at again until a replica uses it.
async fn adopt_free_slots(bus: Bus, plan: Plan, base: Segment, ctx: Context) {
    let data_dir = &ctx.common.data_dir;
    loop {
        for k in 1..=plan.max_replicas {
            if ctx.shutdown.is_requested() {
                return;
            }
            let claim = match runtime::state::Claim::try_slot(data_dir, &base, k) {
                Ok(Some(claim)) => claim,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %runtime::telemetry::chain(&e), "Cannot look at a free writer slot.");
                    continue;
                }
            };
            let dir = data_dir.join(claim.instance().as_str());
            let dead = || {
                Arc::new(DeadLetters::new(
                    &bus,
                    &ctx.common.site,
                    bus.service(),
                    Arc::new(DeadLetterFile::new(
                        dir.join("dead-letters.jsonl"),
                        plan.dead_letter_max_bytes,
                    )),
                ))
            };
            if let Some(target) = plan.target() {
                let spool_dir = dir.join(INFLUX_SPOOL);
                if spool_dir.is_dir() {
                    let client = http::WriteClient::new(target).map_err(SinkError::from);
                    let sink = open_sink(
                        client,
                        target.retry,
                        Duration::ZERO,
                        &spool_dir,
                        &plan,
                        dead(),
                        &ctx,
                    );
                    adopt(sink, claim.instance(), &spool_dir).await;
                }
            }
            if let Some(target) = plan.http_target() {
                let spool_dir = dir.join(HTTP_SPOOL);
                if spool_dir.is_dir() {
                    let client =
                        post::PostClient::new(target, &ctx.common.site).map_err(SinkError::from);
                    let sink = open_sink(
                        client,
                        target.retry,
                        Duration::ZERO,
                        &spool_dir,
                        &plan,
                        dead(),
                        &ctx,
                    );
                    adopt(sink, claim.instance(), &spool_dir).await;
                }
            }
        }
        tokio::select! {
            () = ctx.shutdown.wait() => return,
            () = tokio::time::sleep(ADOPT_INTERVAL) => {}
        }
    }
}

/// The spool directories under a writer's state directory, one per spooled output.
const INFLUX_SPOOL: &str = "spool";
const HTTP_SPOOL: &str = "http-spool";

/// Batches a spooled output may hold queued: as many as the intake makes while one request
/// waits for its timeout, so a server that takes connections and never answers holds up only
/// its own output, not the others (the intake hands every output each batch in turn). At
/// most 64 (a batch is at most `batch_points` readings, in memory until taken).
fn queue_len(timeout_ms: u64, plan: &Plan) -> usize {
    let per_timeout = timeout_ms.div_ceil(plan.flush_interval_ms.max(1));
    usize::try_from(per_timeout.saturating_add(2))
        .unwrap_or(64)
        .clamp(2, 64)
}

/// A spooled output's sink on `spool_dir`, with the plan's spool settings.
fn open_sink<E: Endpoint>(
    client: Result<E, SinkError>,
    retry: runtime::backoff::Backoff,
    linger: Duration,
    spool_dir: &std::path::Path,
    plan: &Plan,
    dead: Arc<DeadLetters>,
    ctx: &Context,
) -> Result<Sink<E>, SinkError> {
    Sink::open(
        client?,
        retry,
        linger,
        spool_dir,
        &plan.spool,
        plan.batch_points,
        dead,
        ctx.shutdown.clone(),
    )
}

/// Drain a free slot's spool and remove it once empty.
async fn adopt<E: Endpoint>(
    sink: Result<Sink<E>, SinkError>,
    slot: &Segment,
    spool_dir: &std::path::Path,
) {
    let sink = match sink {
        Ok(sink) => sink,
        Err(e) => {
            tracing::warn!(slot = %slot, error = %runtime::telemetry::chain(&e), "Cannot open the spool of a free writer slot.");
            return;
        }
    };
    let held = sink.spooled();
    if held > 0 {
        tracing::info!(slot = %slot, batches = held, spool = %spool_dir.display(), "Writing the spool of a writer slot nobody holds.");
    }
    if sink.drain_all().await {
        if let Err(e) = std::fs::remove_dir_all(spool_dir) {
            tracing::warn!(dir = %spool_dir.display(), error = %runtime::telemetry::chain(&e), "Cannot remove an emptied spool.");
        }
        if held > 0 {
            tracing::info!(slot = %slot, spool = %spool_dir.display(), "The free slot's spool is written.");
        }
    }
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, config: &Plan, ctx: &Context) -> Result<(), Error> {
    let data_dir = &ctx.common.data_dir;
    let dead_file = Arc::new(DeadLetterFile::new(
        config.dead_letter_path(data_dir),
        config.dead_letter_max_bytes,
    ));
    let mut outputs: Vec<(mpsc::Sender<Arc<Batch>>, JoinHandle<()>)> = Vec::new();
    let dead = || {
        Arc::new(DeadLetters::new(
            bus,
            &ctx.common.site,
            bus.service(),
            dead_file.clone(),
        ))
    };
    if let Some(target) = config.target() {
        let client = http::WriteClient::new(target).map_err(SinkError::from);
        let dir = spool_dir(config, data_dir, INFLUX_SPOOL)?;
        let sink: InfluxSink = open_sink(
            client,
            target.retry,
            Duration::ZERO,
            &dir,
            config,
            dead(),
            ctx,
        )?;
        let (tx, rx) = mpsc::channel(queue_len(target.cfg.timeout_ms, config));
        outputs.push((tx, tokio::spawn(sink.run(rx))));
    }
    if let Some(target) = config.http_target() {
        let client = post::PostClient::new(target, &ctx.common.site).map_err(SinkError::from);
        let dir = spool_dir(config, data_dir, HTTP_SPOOL)?;
        let linger = Duration::from_millis(target.cfg.max_age_ms);
        let sink: HttpSink = open_sink(client, target.retry, linger, &dir, config, dead(), ctx)?;
        let (tx, rx) = mpsc::channel(queue_len(target.cfg.timeout_ms, config));
        outputs.push((tx, tokio::spawn(sink.run(rx))));
    }
    if config.files_enabled() {
        let dir = config.files_dir(data_dir);
        let files = RotatingFiles::open(&dir, &config.files).map_err(|source| Error::Files {
            dir: dir.clone(),
            source,
        })?;
        let events = events::Files::new();
        events.opened(&dir, &config.files.format);
        let (tx, rx) = mpsc::channel(2);
        outputs.push((
            tx,
            tokio::spawn(run_files(
                files,
                rx,
                dead_file.clone(),
                bus.service().clone(),
                events,
            )),
        ));
    }

    let filter = Filter::measurements(Some(&ctx.common.site), None);
    let (mut inbox, ack_task) = Inbox::subscribe(bus, &filter, &config.group, &config.inbox);
    // Not `dead_file`: a flood of bad messages must not rotate refused points away.
    inbox.keep_dead_letters(Arc::new(DeadLetterFile::new(
        config.malformed_path(data_dir),
        config.dead_letter_max_bytes,
    )));
    let acker = inbox.acker();
    // Every service's status, stored as its health (`status`), in InfluxDB only. A writer
    // with several replicas stores each once per replica, stamped by each on receipt: a
    // status every 10 s shows as two points close together.
    let mut statuses = bus.watch_statuses(&ctx.common.site);
    let ready = ctx.health.check("influx-writer");
    ready.set(true);

    let flush = Duration::from_millis(config.flush_interval_ms);
    let mut pending = Collecting::new(config.batch_points);
    let mut deadline: Option<tokio::time::Instant> = None;
    let intake = events::Intake::new();
    loop {
        let wake = deadline.unwrap_or_else(|| tokio::time::Instant::now() + flush);
        let full = tokio::select! {
            d = inbox.recv() => match d {
                Some(mut d) => {
                    intake.reading();
                    if let Some(bad) = d.message.flag_implausible() {
                        intake.implausible(&d.topic, &d.message, &bad);
                    }
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + flush);
                    pending.push(d)
                }
                None => break,
            },
            Some(m) = statuses.recv() => {
                match status::reading(&ctx.common.site, &m.topic, &m.payload, m.retain, proto::now_ms()) {
                    Ok(Some(reading)) => {
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + flush);
                        pending.push_untracked(m.topic, reading)
                    }
                    Ok(None) => false,
                    Err(reason) => {
                        intake.bad_status(&m.topic, &reason);
                        false
                    }
                }
            }
            () = tokio::time::sleep_until(wake), if deadline.is_some() => true,
            () = ctx.shutdown.wait() => break,
        };
        if full {
            deadline = None;
            dispatch(pending.take(&acker, outputs.len()), &outputs, &intake).await;
        }
    }
    dispatch(pending.take(&acker, outputs.len()), &outputs, &intake).await;
    // Outputs finish what they hold (the InfluxDB output spools instead of posting once
    // shutdown is requested), then acknowledgements are flushed.
    for (tx, task) in outputs {
        drop(tx);
        if let Err(e) = task.await {
            intake.output_failed(&e);
        }
    }
    drop(acker);
    drop(inbox);
    if let Err(e) = ack_task.await {
        tracing::warn!(error = %chain(&e), "The acknowledgement task ended abnormally.");
    }
    ready.set(false);
    Ok(())
}

/// Create a spool directory of the writer's state directory. It holds readings: its
/// directories are the owner's alone (the journal creates its files 0600).
fn spool_dir(
    config: &Plan,
    data_dir: &std::path::Path,
    name: &str,
) -> Result<std::path::PathBuf, Error> {
    let dir = config.state_dir(data_dir).join(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| Error::State {
            dir: dir.clone(),
            source,
        })?;
    Ok(dir)
}

/// Readings gathered for the next batch.
struct Collecting {
    items: Vec<Item>,
    tokens: Vec<AckToken>,
    capacity: usize,
}

impl Collecting {
    fn new(capacity: usize) -> Self {
        Self {
            items: Vec::with_capacity(capacity),
            tokens: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// Add a reading; `true` once the batch is full.
    fn push(&mut self, d: Delivery<Measurement>) -> bool {
        if let Some(t) = d.token {
            self.tokens.push(t);
        }
        self.items.push(Item {
            topic: d.topic,
            measurement: d.message,
        });
        self.items.len() >= self.capacity
    }

    /// Add a reading that no producer waits for (a service's status); `true` once full.
    fn push_untracked(&mut self, topic: String, measurement: Measurement) -> bool {
        self.items.push(Item { topic, measurement });
        self.items.len() >= self.capacity
    }

    /// The gathered readings as a batch for `outputs` outputs, if there are any.
    fn take(&mut self, acker: &Acker, outputs: usize) -> Option<Batch> {
        if self.items.is_empty() {
            return None;
        }
        Some(Batch::new(
            std::mem::replace(&mut self.items, Vec::with_capacity(self.capacity)),
            std::mem::replace(&mut self.tokens, Vec::with_capacity(self.capacity)),
            Some(acker.clone()),
            outputs,
        ))
    }
}

async fn dispatch(
    batch: Option<Batch>,
    outputs: &[(mpsc::Sender<Arc<Batch>>, JoinHandle<()>)],
    events: &events::Intake,
) {
    let Some(batch) = batch else {
        return;
    };
    let batch = Arc::new(batch);
    for (tx, _) in outputs {
        // A full channel is backpressure: the bus holds further readings meanwhile. A closed
        // one means its output ended; the batch then stays unacknowledged and is replayed.
        if tx.send(batch.clone()).await.is_err() {
            events.output_stopped();
        }
    }
}

async fn run_files(
    files: RotatingFiles,
    mut rx: mpsc::Receiver<Arc<Batch>>,
    dead_file: Arc<DeadLetterFile>,
    service: proto::Segment,
    events: events::Files,
) {
    let mut files = Some(files);
    while let Some(batch) = rx.recv().await {
        let Some(mut f) = files.take() else { break };
        let b = batch.clone();
        // Services' statuses are for the InfluxDB output (the health dashboard and alerts);
        // the files hold readings.
        let kept: Vec<usize> = (0..batch.items.len())
            .filter(|i| batch.items[*i].measurement.measurement.as_str() != status::MEASUREMENT)
            .collect();
        let kept_too = kept.clone();
        let res = tokio::task::spawn_blocking(move || {
            let refs: Vec<&Measurement> =
                kept_too.iter().map(|i| &b.items[*i].measurement).collect();
            let r = f.write(&refs, std::time::SystemTime::now());
            (f, r)
        })
        .await;
        let (f, r) = match res {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        files = Some(f);
        match r {
            Ok(w) => {
                events.wrote(w.bytes, &w.rotated);
                // A reading the format cannot hold is kept in the dead-letter file, or the
                // batch is not acknowledged: acknowledged, it would exist nowhere.
                let letters: Vec<proto::DeadLetter> = w
                    .skipped
                    .iter()
                    .map(|(i, why)| {
                        let item = &batch.items[kept[*i]];
                        events.unwritable(&item.topic, why);
                        let payload = proto::Payload::encode(&item.measurement).unwrap_or_default();
                        proto::DeadLetter::new(service.clone(), why, &item.topic, &payload)
                    })
                    .collect();
                let file = dead_file.clone();
                let kept = match tokio::task::spawn_blocking(move || file.append(&letters)).await {
                    Ok(r) => r,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                match kept {
                    Ok(()) => batch.done(),
                    Err(e) => events.dead_letter_file_failed(dead_file.path(), &e),
                }
            }
            Err(e) => events.write_failed(&e),
        }
    }
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|e| unreachable!("invalid built-in segment {s:?}: {e}"))
}
