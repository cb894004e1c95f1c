//! backup-rotator: InfluxDB backed up on a schedule to a directory, Azure Blob storage or an
//! S3-compatible store, the latest N full sets kept, and its own state on the bus as readings.
//!
//! A run (hourly by default) makes one set (see `manifest` for the layout): a **full** set
//! when the newest good full set is older than `full_every_h`, otherwise an **incremental**
//! one, from where the last set ended (minus `lookback_s`, for late readings) to now (minus
//! `settle_s`). Each part is exported over InfluxQL (`export`), streamed into the store
//! (`store`), read back and checked (size and SHA-256); the manifest goes last and is read
//! back too. Only then are sets beyond the `keep` newest full ones deleted (`manifest::expired`).
//! A run that fails leaves an unfinished set, which the next run deletes first; it is never
//! counted, restored or kept.
//!
//! Why line protocol over `/query` rather than `influxd backup`: it works the same on 1.x,
//! 2.x and 3.x, needs no RPC port or operator token, restores into an existing database, and
//! is read by any InfluxDB without wattbus (docs/backups.md). Native mode adds InfluxDB's own
//! backup to full sets where its tools are installed (`native`).
//!
//! Layout:
//! - `config`: the `[backup_rotator]` section and its plan.
//! - `schedule`: cron expressions (pure).
//! - `manifest`: a set as stored, set ids, rotation and restore chains (pure).
//! - `export`: InfluxQL to line-protocol parts.
//! - `native`: InfluxDB's own backup tool, run with full sets.
//! - `store`: object_store (local, Azure, S3) and the operations on sets.
//! - `restore`: reading sets back (used by `wattbus backup`).

pub mod config;
mod events;
pub mod export;
pub mod manifest;
pub mod native;
pub mod restore;
pub mod schedule;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use influx_client::query::{Connection, QueryError};
use proto::{Filter, Measurement, Quality, ReadingId, Segment};
use runtime::Context;
use runtime::backoff::Retries;
use runtime::bus::{Bus, Identity};
use runtime::delivery::Producer;

pub use config::{Config, Plan};
use events::Events;
use export::{ExportError, ExportWindow};
use manifest::{Manifest, SetKind, SetRef};
use store::{Store, StoreError};

/// The section name in the config file.
pub const SECTION: &str = "backup_rotator";
/// The measurement of its status readings.
pub const MEASUREMENT: &str = "backup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] runtime::ConfigError),
    #[error(transparent)]
    Claim(#[from] runtime::state::ClaimError),
    #[error(transparent)]
    Delivery(#[from] runtime::delivery::DeliveryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// The service, for wattbus's service table.
#[derive(Debug)]
pub struct BackupRotator;

/// Its own kinds of `wattbus_errors_total`.
pub use events::ERROR_KINDS;

impl runtime::Service for BackupRotator {
    const NAME: &'static str = "backup-rotator";
    const SECTION: &'static str = SECTION;
    const ABOUT: &'static str =
        "InfluxDB backed up hourly to a directory, Azure Blob or S3, the latest N kept";
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

pub fn identity(plan: &Plan) -> Identity {
    Identity {
        service: seg("backup-rotator"),
        instance: plan.instance.clone(),
    }
}

/// Run until shutdown.
pub async fn run(plan: Plan, ctx: Context) -> Result<(), Error> {
    // Two rotators on one storage prefix would delete each other's sets in progress.
    let _claim = runtime::state::Claim::exclusive(
        &ctx.common.data_dir,
        "backup-rotator",
        &plan.instance,
        runtime::state::MUST_NOT_SCALE,
    )?;
    ctx.clone()
        .on_bus(&identity(&plan), |bus| async move {
            run_on(&bus, &plan, &ctx).await
        })
        .await
}

/// What a run did.
#[derive(Debug)]
pub enum RunOutcome {
    Made(Box<Manifest>),
    /// Nothing to do (the last set ends after this window would start).
    Nothing,
}

/// Why a run made no set.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RunError {
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Export(e) => e.is_transient(),
            RunError::Store(e) => e.is_transient(),
        }
    }
}

/// Native mode, resolved for a rotator.
#[derive(Debug)]
struct NativeJob {
    plan: native::NativePlan,
    influx: config::InfluxPlan,
    dir: std::path::PathBuf,
}

/// The rotator's state between runs.
pub struct Rotator {
    store: Store,
    conn: Connection,
    chunk_rows: usize,
    keep: usize,
    full_every: Duration,
    lookback: Duration,
    settle: Duration,
    /// Manifests read so far (they never change), by set id.
    manifests: HashMap<String, Manifest>,
    /// Damaged sets already reported.
    damaged: HashMap<String, String>,
    /// Unfinished sets of others already reported.
    foreign: HashMap<String, ()>,
    /// Sets from the future already reported.
    future: HashMap<String, ()>,
    /// Where the id of the set being made is kept until it is finished or removed: after a
    /// kill, the next run knows that unfinished set was its own and removes it at once.
    state_file: Option<std::path::PathBuf>,
    /// Native mode: the tool run with every full set.
    native: Option<NativeJob>,
    events: Events,
}

impl std::fmt::Debug for Rotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rotator({})", self.store.describe())
    }
}

impl Rotator {
    pub fn new(plan: &Plan, store: Store, conn: Connection) -> Self {
        Self {
            store,
            conn,
            chunk_rows: plan.influx.chunk_rows,
            keep: plan.keep,
            full_every: plan.full_every,
            lookback: plan.lookback,
            settle: plan.settle,
            manifests: HashMap::new(),
            damaged: HashMap::new(),
            foreign: HashMap::new(),
            future: HashMap::new(),
            state_file: None,
            native: None,
            events: Events::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Keep the id of the set in progress in this file (in the rotator's state directory).
    #[must_use]
    pub fn with_state_file(mut self, path: std::path::PathBuf) -> Self {
        self.state_file = Some(path);
        self
    }

    /// Run InfluxDB's own backup tool with every full set, as `plan.native` says (nothing if
    /// it says nothing); its scratch directory defaults to `state_dir/native`.
    #[must_use]
    pub fn with_native(mut self, plan: &Plan, state_dir: &std::path::Path) -> Self {
        // A directory of its own inside the one configured: it is emptied before and after
        // every run, and nothing else there may ever be touched.
        self.native = plan.native.clone().map(|n| NativeJob {
            dir: n.dir.as_ref().map_or_else(
                || state_dir.join("native"),
                |d| d.join(format!("wattbus-native-{}", plan.instance)),
            ),
            plan: n,
            influx: plan.influx.clone(),
        });
        self
    }

    /// The native backup of set `id`: the tool's files stored and verified, or why there
    /// are none (the tool failed: said, counted, the set still good). Only a failure of the
    /// storage fails the set.
    async fn native_backup(&self, id: &str) -> Result<Option<manifest::Native>, StoreError> {
        let Some(job) = &self.native else {
            return Ok(None);
        };
        let tool = job.plan.tool.as_str().to_string();
        let token = match &job.influx.auth {
            Some(influx_client::query::Auth::Token(t)) => Some(t.as_str()),
            _ => None,
        };
        self.events.native_started(id, &tool, &job.dir);
        let taken = native::take(&job.plan, &job.influx, token, &job.dir).await;
        let uploaded = match taken {
            Ok(files) => native::upload(&self.store, id, &files).await,
            Err(problem) => Err(native::UploadError::Local(problem)),
        };
        let result = match uploaded {
            Ok(files) => Ok(manifest::Native {
                tool,
                files,
                error: None,
            }),
            Err(native::UploadError::Store(e)) => Err(e),
            Err(native::UploadError::Local(problem)) => {
                self.events.native_failed(id, &problem);
                Ok(manifest::Native {
                    tool,
                    files: Vec::new(),
                    error: Some(problem),
                })
            }
        };
        if let Err(e) = native::clear(&job.dir) {
            self.events.scratch_not_cleared(&e);
        }
        if let Ok(n) = &result
            && n.ok()
        {
            self.events.native_stored(id, n.files.len(), n.bytes());
        }
        result.map(Some)
    }

    /// Empty native mode's scratch directory (a run stopped mid-way leaves the tool's copy
    /// of the database there).
    pub fn clear_scratch(&self) {
        if let Some(job) = &self.native
            && let Err(e) = native::clear(&job.dir)
        {
            self.events.scratch_not_cleared(&e);
        }
    }

    /// The set a killed run of this rotator left unfinished, if any.
    fn own_unfinished(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.state_file.as_ref()?).ok()?;
        Some(text.trim().to_string())
    }

    fn note_in_progress(&self, id: Option<&str>) -> Result<(), StoreError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
        match id {
            Some(id) => {
                use std::io::Write as _;
                let mut f = std::fs::File::create(path).map_err(io)?;
                f.write_all(id.as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)
            }
            None => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            },
        }
    }

    /// The good sets, oldest first. With `clean_at` (now, in ms), unfinished sets are
    /// removed: at once if this rotator's own killed run left it, otherwise once a day old
    /// (until then it may be another rotator's set in progress).
    async fn good_sets(&mut self, clean_at: Option<i64>) -> Result<Vec<Manifest>, StoreError> {
        let listed = self.store.list().await?;
        let own = self.own_unfinished();
        let mut good = Vec::new();
        for l in listed {
            if !l.finished {
                if let Some(now_ms) = clean_at {
                    let old = manifest::id_time_s(&l.id)
                        .is_some_and(|t| t < now_ms.div_euclid(1000) - 86_400);
                    if own.as_deref() != Some(l.id.as_str()) && !old {
                        if self.foreign.insert(l.id.clone(), ()).is_none() {
                            self.events
                                .foreign_unfinished(&l.id, &self.store.describe());
                        }
                        continue;
                    }
                    self.events
                        .removing_unfinished(&l.id, &self.store.describe());
                    match self.store.delete_set(&l.id).await {
                        Ok(()) => self.events.set_deleted(&l.id, false),
                        Err(e) => self.events.set_not_deleted(&l.id, &e, false),
                    }
                }
                continue;
            }
            if let Some(m) = self.manifests.get(&l.id) {
                good.push(m.clone());
                continue;
            }
            match self.store.manifest(&l.id).await {
                Ok(m) => {
                    self.manifests.insert(l.id.clone(), m.clone());
                    good.push(m);
                }
                // Damaged, or unreadable (permissions, a blip of the storage): not counted
                // this run, never deleted, and the other sets go on being made and kept.
                Err(e) => {
                    if self.damaged.insert(l.id.clone(), e.to_string()).is_none() {
                        self.events.damaged_manifest(&l.id, &e);
                    }
                }
            }
        }
        if let Some(own) = own
            && !good.iter().any(|m| m.id == own)
            && clean_at.is_some()
        {
            self.note_in_progress(None)?;
        }
        Ok(good)
    }

    /// The good sets as they stand, without changing anything (status readings, `list`).
    pub async fn sets(&mut self) -> Result<Vec<Manifest>, StoreError> {
        self.good_sets(None).await
    }

    /// Sets whose time is ahead of this clock (it jumped back, or a damaged manifest): kept,
    /// but not what the next set continues from, nor what the status counts as newest.
    fn plausible(&mut self, sets: Vec<Manifest>, now_ms: i64) -> Vec<Manifest> {
        let limit_ms = now_ms.saturating_add(300_000);
        sets.into_iter()
            .filter(|m| {
                let ok = m.created_ms <= limit_ms && m.to_ns / 1_000_000 <= limit_ms;
                if !ok && self.future.insert(m.id.clone(), ()).is_none() {
                    self.events.set_from_future(&m.id);
                }
                ok
            })
            .collect()
    }

    /// One backup run at `now_ms`: clean up, make a set, rotate.
    pub async fn run_once(&mut self, now_ms: i64) -> Result<RunOutcome, RunError> {
        let started = Instant::now();
        let all = self.good_sets(Some(now_ms)).await?;
        let good = self.plausible(all.clone(), now_ms);
        let to_ns = (now_ms - millis(self.settle)).div_euclid(1000) * 1_000_000_000;
        let newest_full = good
            .iter()
            .filter(|m| m.kind == SetKind::Full)
            .max_by(|a, b| a.id.cmp(&b.id));
        let (kind, from_ns, base) = match newest_full {
            Some(f) if now_ms - f.created_ms < millis(self.full_every) => {
                let last_end = good
                    .iter()
                    .filter(|m| m.id >= f.id)
                    .map(|m| m.to_ns)
                    .max()
                    .unwrap_or(f.to_ns);
                let from = last_end - i64::try_from(self.lookback.as_nanos()).unwrap_or(i64::MAX);
                (SetKind::Incremental, Some(from), Some(f.id.clone()))
            }
            _ => (SetKind::Full, None, None),
        };
        if from_ns
            .is_some_and(|f| f + i64::try_from(self.lookback.as_nanos()).unwrap_or(0) >= to_ns)
        {
            return Ok(RunOutcome::Nothing);
        }
        let id = manifest::set_id(to_ns, kind);
        if good.iter().any(|m| m.id == id) {
            return Ok(RunOutcome::Nothing);
        }
        let version = self.conn.ping().await.map_err(ExportError::from)?;
        self.note_in_progress(Some(&id))?;
        self.events
            .backup_started(&id, kind, &self.store.describe());
        let window = ExportWindow { from_ns, to_ns };
        let exported = export::export(
            &self.conn,
            &self.store,
            &id,
            window,
            self.chunk_rows,
            &self.events,
        )
        .await;
        let exported = match exported {
            Ok(e) => e,
            Err(e) => {
                self.discard(&id).await;
                return Err(e.into());
            }
        };
        let native = if kind == SetKind::Full {
            match self.native_backup(&id).await {
                Ok(n) => n,
                Err(e) => {
                    self.discard(&id).await;
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        let m = Manifest {
            format: manifest::FORMAT,
            id: id.clone(),
            kind,
            base,
            database: self.conn.database().to_string(),
            from_ns,
            to_ns,
            created_ms: now_ms,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            wattbus_version: env!("CARGO_PKG_VERSION").to_string(),
            influxdb_version: version,
            retention_policies: exported.policies,
            parts: exported.parts,
            native,
        };
        // Every part still there as uploaded, right before the manifest makes the set count.
        let present = self.store.check_parts(&m).await;
        let stored = match present {
            Ok(()) => self.store.put_manifest(&m).await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            self.discard(&id).await;
            return Err(e.into());
        }
        self.note_in_progress(None)?;
        self.manifests.insert(id.clone(), m.clone());
        self.events.set_stored(&m, started.elapsed().as_secs_f64());
        self.rotate(all.iter().chain(std::iter::once(&m)), &m).await;
        Ok(RunOutcome::Made(Box::new(m)))
    }

    /// Delete what rotation no longer keeps. Failures are logged and retried next run.
    ///
    /// A full set more than twice the size of the newest one is never deleted (nor the sets
    /// that continue it): a database that lost most of its data (a reinstall, a dropped
    /// database) must not rotate the last real backups away behind near-empty ones.
    async fn rotate<'a>(
        &mut self,
        sets: impl Iterator<Item = &'a Manifest>,
        newest: &Manifest,
    ) -> u64 {
        let sets: Vec<&Manifest> = sets.collect();
        let refs: Vec<SetRef> = sets
            .iter()
            .map(|m| SetRef {
                id: m.id.clone(),
                kind: m.kind,
            })
            .collect();
        let shrunk: Vec<&Manifest> = if newest.kind == SetKind::Full {
            sets.iter()
                .filter(|m| m.kind == SetKind::Full && m.points() / 2 > newest.points())
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        let protected = |id: &str| {
            sets.iter().find(|m| m.id == id).is_some_and(|m| {
                let full = match m.kind {
                    SetKind::Full => Some(m.id.as_str()),
                    SetKind::Incremental => m.base.as_deref(),
                };
                full.is_some_and(|f| shrunk.iter().any(|s| s.id == f))
            })
        };
        // The newest InfluxDB native backup is not rotated away behind full sets whose tool
        // failed: it stays until a newer one is good.
        let newest_native = sets
            .iter()
            .filter(|m| m.kind == SetKind::Full && m.native.as_ref().is_some_and(|n| n.ok()))
            .map(|m| m.id.as_str())
            .max()
            .map(str::to_string);
        let mut deleted = 0;
        for id in manifest::expired(&refs, self.keep) {
            if newest_native.as_deref() == Some(id.as_str()) {
                self.events.keeping_native(&id);
                continue;
            }
            if protected(&id) {
                self.events
                    .not_deleting_shrunk(&id, &newest.id, newest.points());
                continue;
            }
            match self.store.delete_set(&id).await {
                Ok(()) => {
                    self.manifests.remove(&id);
                    self.events.set_deleted(&id, true);
                    deleted += 1;
                }
                Err(e) => self.events.set_not_deleted(&id, &e, true),
            }
        }
        deleted
    }

    /// A set a failed run left: removed now if the storage lets us, else on the next run.
    async fn discard(&self, id: &str) {
        match self.store.delete_set(id).await {
            Ok(()) => {
                if let Err(e) = self.note_in_progress(None) {
                    self.events.note_not_cleared(&e);
                }
            }
            Err(e) => {
                self.events.failed_set_stays(id, &e);
            }
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The fields of the status reading.
fn status_fields(
    sets: &[Manifest],
    now_ms: i64,
    failures: u32,
    last_ok: bool,
) -> BTreeMap<String, f64> {
    #[allow(clippy::cast_precision_loss)]
    let f = |n: u64| n as f64;
    let mut fields = BTreeMap::from([
        ("last_run_ok".to_string(), if last_ok { 1.0 } else { 0.0 }),
        ("failures".to_string(), f64::from(failures)),
        (
            "full_sets".to_string(),
            f(sets.iter().filter(|m| m.kind == SetKind::Full).count() as u64),
        ),
        (
            "incremental_sets".to_string(),
            f(sets
                .iter()
                .filter(|m| m.kind == SetKind::Incremental)
                .count() as u64),
        ),
        (
            "stored_bytes".to_string(),
            f(sets.iter().map(Manifest::bytes).sum()),
        ),
    ]);
    // The newest set this clock can have made (one from the future says nothing of now).
    if let Some(newest) = sets
        .iter()
        .filter(|m| m.created_ms <= now_ms.saturating_add(300_000))
        .max_by_key(|m| m.created_ms)
    {
        #[allow(clippy::cast_precision_loss)]
        let age = (now_ms - newest.created_ms).max(0) as f64 / 1000.0;
        fields.insert("age_s".into(), age);
        fields.insert("last_points".into(), f(newest.points()));
        fields.insert("last_bytes".into(), f(newest.bytes()));
        #[allow(clippy::cast_precision_loss)]
        fields.insert("last_duration_s".into(), newest.duration_ms as f64 / 1000.0);
    }
    // Native mode: whether the newest full set has InfluxDB's own backup too.
    if let Some(n) = sets
        .iter()
        .filter(|m| m.kind == SetKind::Full && m.created_ms <= now_ms.saturating_add(300_000))
        .max_by_key(|m| m.created_ms)
        .and_then(|m| m.native.as_ref())
    {
        fields.insert("native_ok".into(), if n.ok() { 1.0 } else { 0.0 });
    }
    fields
}

/// Run on an existing bus connection (the demo shares one).
pub async fn run_on(bus: &Bus, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let (producer, producer_task) = Producer::open(
        bus,
        &seg("meas"),
        &Filter::measurements(Some(&ctx.common.site), Some(&plan.instance)),
        &plan.stream,
        &ctx.common.data_dir,
        ctx.shutdown.clone(),
    )?;
    let result = serve(&producer, plan, ctx).await;
    drop(producer);
    if let Err(e) = producer_task.await {
        Events::new().task_failed("status stream", &e);
    }
    result
}

async fn serve(producer: &Producer, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let store = Store::open(&plan.storage, &ctx.common.site, &ctx.common.data_dir)?;
    let conn = Connection::new(
        &plan.influx.url,
        &plan.influx.database,
        plan.influx.auth.clone(),
        plan.influx.timeout,
    )?;
    let events = Events::new();
    events.backing_up(
        &store.describe(),
        conn.url(),
        conn.database(),
        plan.schedule.as_str(),
        plan.keep,
    );
    let ready = ctx.health.check("backup-rotator");
    ready.set(true);
    let state_dir = ctx
        .common
        .data_dir
        .join("backup-rotator")
        .join(plan.instance.as_str());
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", state_dir.display())))?;
    let mut rotator = Rotator::new(plan, store, conn)
        .with_state_file(state_dir.join("in_progress"))
        .with_native(plan, &state_dir);
    if let Some(n) = &plan.native {
        events.native_mode(n.tool.as_str(), &n.command);
    }
    let mut retries = Retries::new(plan.retry);
    let mut last_ok = true;
    let id = ReadingId::new(
        ctx.common.site.clone(),
        plan.instance.clone(),
        seg("status"),
    );
    let topic = id.topic();
    let now_s = || proto::now_ms().div_euclid(1000);
    // The first run at once if there is no good set yet: a new install is protected within
    // minutes, not at the next scheduled time.
    let mut sets = match rotator.sets().await {
        Ok(s) => s,
        Err(e) => {
            events.cannot_list(&e, true);
            Vec::new()
        }
    };
    let mut next_s = if sets.is_empty() {
        now_s()
    } else {
        plan.schedule.next_after(now_s()).unwrap_or(i64::MAX)
    };
    let mut status = tokio::time::interval(plan.status_every);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wait = Duration::from_secs(u64::try_from(next_s - now_s()).unwrap_or(0));
        tokio::select! {
            () = ctx.shutdown.wait() => break,
            _ = status.tick() => {
                let fields = status_fields(&sets, proto::now_ms(), retries.failures(), last_ok);
                publish(producer, &topic, &id, fields, &events).await;
                continue;
            }
            () = tokio::time::sleep(wait) => {}
        }
        let outcome = tokio::select! {
            () = ctx.shutdown.wait() => None,
            o = rotator.run_once(proto::now_ms()) => Some(o),
        };
        let Some(outcome) = outcome else {
            events.stopping_mid_run();
            rotator.clear_scratch();
            break;
        };
        let scheduled = plan.schedule.next_after(now_s()).unwrap_or(i64::MAX);
        match outcome {
            Ok(o) => {
                retries.succeeded();
                last_ok = true;
                events.run_ok(match &o {
                    RunOutcome::Made(m) => Some(m),
                    RunOutcome::Nothing => None,
                });
                next_s = scheduled;
            }
            Err(e) => {
                last_ok = false;
                let transient = e.is_transient();
                let wait = retries.failed();
                let retry_s = now_s() + i64::try_from(wait.as_secs()).unwrap_or(i64::MAX);
                next_s = if transient {
                    retry_s.min(scheduled)
                } else {
                    scheduled
                };
                let next_in = u64::try_from(next_s - now_s()).unwrap_or(0);
                events.run_failed(&e, transient, Duration::from_secs(next_in));
            }
        }
        match rotator.sets().await {
            Ok(s) => sets = s,
            Err(e) => events.cannot_list(&e, false),
        }
        events.sets(&sets);
        let fields = status_fields(&sets, proto::now_ms(), retries.failures(), last_ok);
        publish(producer, &topic, &id, fields, &events).await;
    }
    ready.set(false);
    Ok(())
}

async fn publish(
    producer: &Producer,
    topic: &proto::Topic<Measurement>,
    id: &ReadingId,
    fields: BTreeMap<String, f64>,
    events: &Events,
) {
    let m = Measurement::new(
        id.clone(),
        seg(MEASUREMENT),
        proto::now_ms(),
        Quality::Good,
        fields,
    );
    if let Err(e) = producer.send(topic, m).await {
        events.status_not_journaled(&e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(id: &str, created_ms: i64, native: Option<manifest::Native>) -> Manifest {
        Manifest {
            format: manifest::FORMAT,
            id: id.into(),
            kind: SetKind::Full,
            base: None,
            database: "wattbus".into(),
            from_ns: None,
            to_ns: created_ms * 1_000_000,
            created_ms,
            duration_ms: 1,
            wattbus_version: "0".into(),
            influxdb_version: None,
            retention_policies: vec![],
            parts: vec![],
            native,
        }
    }

    #[test]
    fn native_ok_says_whether_the_newest_full_set_has_influxdbs_own_backup() {
        let good = manifest::Native {
            tool: "influxd".into(),
            files: vec![manifest::NativeFile {
                file: "native/a.meta".into(),
                bytes: 1,
                sha256: "00".into(),
            }],
            error: None,
        };
        let failed = manifest::Native {
            tool: "influxd".into(),
            files: vec![],
            error: Some("RPC port closed".into()),
        };
        let t = 1_767_225_600_000;
        let older = set("20260101T000000Z-full", t, Some(good.clone()));
        let newer = set("20260101T010000Z-full", t + 3_600_000, Some(failed));
        assert_eq!(
            status_fields(std::slice::from_ref(&older), t, 0, true)["native_ok"],
            1.0
        );
        assert_eq!(
            status_fields(&[older, newer], t + 3_600_000, 0, true)["native_ok"],
            0.0
        );
        // Native mode off: no field, not a zero that would alert.
        let plain = set("20260101T000000Z-full", t, None);
        assert!(!status_fields(&[plain], t, 0, true).contains_key("native_ok"));
    }

    #[test]
    fn status_before_any_set_has_no_age() {
        let f = status_fields(&[], 1000, 2, false);
        assert!(!f.contains_key("age_s"));
        assert_eq!(f["failures"], 2.0);
        assert_eq!(f["last_run_ok"], 0.0);
    }
}
