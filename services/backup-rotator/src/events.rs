//! backup-rotator's notable events, each logged and counted here and nowhere else: the log
//! line for the person at the terminal, the counter for the dashboard.
//!
//! One [`Events`] per rotator (the service's, or a `wattbus backup` command's). Every error
//! event counts in the core `wattbus_errors_total{service="backup-rotator",kind}`
//! ([`ERROR_KINDS`]); runs, sets and bytes are the `wattbus_backup_*` series
//! (docs/metrics.md).

use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, Gauge, chain};

use crate::manifest::{Manifest, Part, SetKind};

/// backup-rotator's own kinds of `wattbus_errors_total`, besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A run that made no good set (InfluxDB or the storage away, a full disk): retried.
    "backup",
    // A set found damaged or unreadable (its manifest); it is left alone, never counted.
    "damaged_set",
    // An expired or unfinished set that could not be deleted: tried again next run.
    "rotation",
    // InfluxDB's own backup tool failed (native mode), or its scratch directory could not be
    // emptied: that full set has only line protocol.
    "native",
    // Rows line protocol cannot carry (a newline in a string, a value of another type than
    // its field), left out of a set.
    "unexportable_rows",
    // The note of the set in progress could not be cleared (the next run removes the set).
    "state_file",
    // The sets could not be listed, or the status reading could not be journaled.
    "status",
    // A task of the rotator ended abnormally (a bug).
    "task",
];

/// The rotator's events (see the module doc).
#[derive(Debug)]
pub struct Events {
    core: Core,
    deleted: Counter,
    runs_ok: Counter,
    runs_failed: Counter,
    bytes: Counter,
    points: Counter,
    last_success: Gauge,
    full_sets: Gauge,
    incremental_sets: Gauge,
}

impl Events {
    pub(crate) fn new() -> Self {
        let runs = |result| {
            Counter::new(
                "wattbus_backup_runs_total",
                "Backup runs, by result (ok: a good set made; failed: none).",
                &[("result", result)],
            )
        };
        let sets = |kind| {
            Gauge::new(
                "wattbus_backup_sets",
                "Good backup sets in the storage, by kind.",
                &[("kind", kind)],
            )
        };
        Self {
            core: Core::of(<crate::BackupRotator as runtime::Service>::NAME),
            deleted: Counter::new(
                "wattbus_backup_deleted_sets_total",
                "Sets deleted: expired by rotation, or unfinished.",
                &[],
            ),
            runs_ok: runs("ok"),
            runs_failed: runs("failed"),
            bytes: Counter::new(
                "wattbus_backup_bytes_total",
                "Bytes uploaded in good backup sets.",
                &[],
            ),
            points: Counter::new(
                "wattbus_backup_points_total",
                "Points written to good backup sets.",
                &[],
            ),
            last_success: Gauge::new(
                "wattbus_backup_last_success_timestamp_seconds",
                "When the newest good set was made (Unix seconds); 0 before the first.",
                &[],
            ),
            full_sets: sets("full"),
            incremental_sets: sets("incremental"),
        }
    }

    // --- the service ----------------------------------------------------------------------

    pub fn backing_up(
        &self,
        store: &dyn Display,
        influxdb: &dyn Display,
        database: &str,
        schedule: &str,
        keep: usize,
    ) {
        tracing::info!(store = %store, influxdb = %influxdb, database, schedule, keep, "Backing up.");
    }

    pub fn native_mode(&self, tool: &str, command: &Path) {
        tracing::info!(tool, command = %command.display(), "Native mode: InfluxDB's own backup with every full set.");
    }

    pub fn stopping_mid_run(&self) {
        tracing::info!("Stopping mid-run: the unfinished set is removed by the next run.");
    }

    pub fn task_failed(&self, task: &str, error: &tokio::task::JoinError) {
        self.core.error("task").inc();
        tracing::error!(task, error = %chain(error), "A task of backup-rotator ended abnormally.");
    }

    /// A run made a set (`Some`) or had nothing to do (`None`).
    pub fn run_ok(&self, made: Option<&Manifest>) {
        self.runs_ok.inc();
        if let Some(m) = made {
            self.bytes.add(m.bytes());
            self.points.add(m.points());
            #[allow(clippy::cast_precision_loss)]
            self.last_success.set(m.created_ms as f64 / 1000.0);
        }
    }

    /// A run made no set; `next_in` is when it is tried again.
    pub fn run_failed(&self, error: &dyn std::error::Error, transient: bool, next_in: Duration) {
        self.runs_failed.inc();
        self.core.error("backup").inc();
        let next_in_s = next_in.as_secs();
        if transient {
            tracing::warn!(error = %chain(error), retry_in_s = next_in_s, "Backup failed; no set was counted. Trying again.");
        } else {
            tracing::error!(error = %chain(error), next_in_s, "Backup failed and will until this is fixed; no set was counted.");
        }
    }

    /// The good sets as listed after a run.
    pub fn sets(&self, sets: &[Manifest]) {
        let count = |kind| sets.iter().filter(|m| m.kind == kind).count();
        #[allow(clippy::cast_precision_loss)]
        {
            self.full_sets.set(count(SetKind::Full) as f64);
            self.incremental_sets
                .set(count(SetKind::Incremental) as f64);
        }
    }

    /// `first`: at start, before any run (the storage may not be up yet).
    pub fn cannot_list(&self, error: &dyn std::error::Error, first: bool) {
        self.core.error("status").inc();
        if first {
            tracing::warn!(error = %chain(error), "Cannot list the backup sets yet.");
        } else {
            tracing::warn!(error = %chain(error), "Cannot list the backup sets.");
        }
    }

    /// The runtime counts what it could not journal (`wattbus_unjournaled_messages_total`).
    pub fn status_not_journaled(&self, error: &dyn std::error::Error) {
        self.core.error("status").inc();
        tracing::warn!(error = %chain(error), "Cannot publish the backup status.");
    }

    // --- one run --------------------------------------------------------------------------

    pub fn backup_started(&self, set: &str, kind: SetKind, store: &dyn Display) {
        tracing::info!(set, kind = kind.as_str(), store = %store, "Backup started.");
    }

    /// A part written to the storage and read back.
    pub fn part_stored(&self, set: &str, part: &Part, seconds: f64) {
        tracing::info!(set, part = %part.file, measurement = %part.measurement, retention_policy = %part.retention_policy, points = part.points, bytes = part.bytes, seconds, "Part stored and verified.");
    }

    pub fn rows_skipped(&self, retention_policy: &str, measurement: &str, skipped: u64) {
        self.core.error("unexportable_rows").add(skipped);
        tracing::warn!(
            retention_policy,
            measurement,
            skipped,
            "Rows that line protocol cannot carry (a newline in a string, a value of another type than its field) were left out of the backup."
        );
    }

    pub fn set_stored(&self, m: &Manifest, seconds: f64) {
        tracing::info!(set = %m.id, kind = m.kind.as_str(), points = m.points(), bytes = m.bytes(), parts = m.parts.len(), seconds, "Backup set stored and verified.");
    }

    pub fn native_started(&self, set: &str, tool: &str, dir: &Path) {
        tracing::info!(set, tool, dir = %dir.display(), "Native backup started.");
    }

    pub fn native_failed(&self, set: &str, problem: &str) {
        self.core.error("native").inc();
        tracing::error!(
            set,
            error = problem,
            "InfluxDB's native backup failed: this full set has only its line protocol (restorable with `wattbus backup restore`). Tried again with the next full set."
        );
    }

    pub fn native_stored(&self, set: &str, files: usize, bytes: u64) {
        tracing::info!(set, files, bytes, "Native backup stored and verified.");
    }

    pub fn scratch_not_cleared(&self, problem: &str) {
        self.core.error("native").inc();
        tracing::warn!(
            error = problem,
            "Cannot empty the native backup's scratch directory."
        );
    }

    pub fn note_not_cleared(&self, error: &dyn std::error::Error) {
        self.core.error("state_file").inc();
        tracing::warn!(error = %chain(error), "Cannot clear the note of the set in progress.");
    }

    pub fn failed_set_stays(&self, set: &str, error: &dyn std::error::Error) {
        tracing::debug!(set, error = %chain(error), "The failed run's set stays until the next run removes it.");
    }

    // --- the sets in the storage ----------------------------------------------------------

    pub fn foreign_unfinished(&self, set: &str, store: &dyn Display) {
        tracing::warn!(set, store = %store, "An unfinished backup set this rotator did not start: another rotator writing to the same prefix (give each its own `prefix`), or one killed on another host. Left alone; removed once it is a day old.");
    }

    pub fn removing_unfinished(&self, set: &str, store: &dyn Display) {
        tracing::warn!(set, store = %store, "Removing an unfinished backup set (a run that failed or was killed).");
    }

    /// An unfinished or expired set deleted.
    pub fn set_deleted(&self, set: &str, expired: bool) {
        self.deleted.inc();
        if expired {
            tracing::info!(set, "Expired backup set deleted.");
        }
    }

    pub fn set_not_deleted(&self, set: &str, error: &dyn std::error::Error, expired: bool) {
        self.core.error("rotation").inc();
        if expired {
            tracing::warn!(set, error = %chain(error), "Cannot delete an expired backup set; trying again next run.");
        } else {
            tracing::warn!(set, error = %chain(error), "Cannot remove an unfinished backup set; trying again next run.");
        }
    }

    pub fn damaged_manifest(&self, set: &str, error: &dyn std::error::Error) {
        self.core.error("damaged_set").inc();
        tracing::error!(set, error = %chain(error), "A backup set's manifest cannot be read: the set is not counted and is left for you to look at (`wattbus backup verify`).");
    }

    pub fn set_from_future(&self, set: &str) {
        self.core.error("damaged_set").inc();
        tracing::error!(
            set,
            "A backup set is from the future (this clock jumped back, or its manifest is wrong): it is kept but not continued; new sets are made from the present."
        );
    }

    pub fn keeping_native(&self, set: &str) {
        tracing::warn!(
            set,
            "Keeping an expired backup set: it holds the newest good InfluxDB native backup (the tool failed for every full set since; see native_ok)."
        );
    }

    pub fn not_deleting_shrunk(&self, set: &str, newest: &str, newest_points: u64) {
        self.core.error("rotation").inc();
        tracing::error!(
            set,
            newest,
            newest_points,
            "Not deleting an expired backup set: it holds more than twice the points of the newest full set (InfluxDB lost data?). Check the database; delete old sets by hand once you are sure."
        );
    }
}
