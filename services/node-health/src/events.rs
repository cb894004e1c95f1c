//! node-health's notable events, each logged and counted here and nowhere else.
//!
//! One [`Events`] per run. Every error event counts in the core
//! `wattbus_errors_total{service="node-health",kind}` ([`ERROR_KINDS`]). A source that keeps
//! failing is logged when it starts (WARN), then at most once a minute with the count of the
//! rest, and once more when it reads again (INFO).

use std::time::Duration;

use proto::Segment;
use runtime::delivery::DeliveryError;
use runtime::telemetry::core::Core;
use runtime::telemetry::{LogLimit, chain};

use crate::config::NodeName;
use crate::sample::Source;
use crate::sources::{Sources, Writes};

/// node-health's own kinds of `wattbus_errors_total`, besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A source that could not be read or parsed (a file missing, unreadable or malformed,
    // statvfs failing): left out of that reading, never published as zero.
    "source",
    // A sample that did not finish within the interval (a read that hangs): samples are
    // skipped until it does, and /healthz says not ready meanwhile.
    "stuck", // A sample or the readings stream ended abnormally (a bug).
    "task",
];

/// Repeated failures are logged at most this often, with the count of the rest.
const FLOOD_LOG_EVERY: Duration = Duration::from_secs(60);

/// The service's events (see the module doc).
#[derive(Debug)]
pub struct Events {
    core: Core,
    sources_log: LogLimit,
    stuck_log: LogLimit,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            core: Core::of(<crate::NodeHealth as runtime::Service>::NAME),
            sources_log: LogLimit::new(FLOOD_LOG_EVERY),
            stuck_log: LogLimit::new(FLOOD_LOG_EVERY),
        }
    }

    // --- start ----------------------------------------------------------------------------

    pub fn started(&self, node: &Segment, name: &NodeName, interval: Duration) {
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        match name {
            NodeName::Configured => {
                tracing::info!(node = %node, interval_ms, "Publishing this node's health.");
            }
            NodeName::Hostname(hostname) => {
                tracing::info!(node = %node, hostname, interval_ms, "Publishing this node's health, named after its hostname.");
            }
            NodeName::Fallback(why) => {
                tracing::warn!(node = %node, why, interval_ms, "Publishing this node's health under a stand-in name: set node_health.node.");
            }
        }
    }

    /// What was found on this machine, and what is not there by nature (INFO, once).
    pub fn found(&self, s: &Sources) {
        match &s.thermal {
            Ok(z) => {
                tracing::info!(zone = %z.name, kind = %z.kind, "CPU temperature from this thermal zone.");
            }
            Err(why) => {
                tracing::info!(why = %why, "CPU temperature not available on this machine: left out.");
            }
        }
        match &s.throttled {
            Ok(p) => {
                tracing::info!(path = %p.display(), "Raspberry Pi throttling flags from the firmware.");
            }
            Err(why) => {
                tracing::info!(why = %why, "Throttling flags not available on this machine (not a Raspberry Pi): left out.");
            }
        }
        let disk_path = s.disk_path.display().to_string();
        match &s.writes {
            Writes::Configured(d) => {
                tracing::info!(device = %d, disk_path, "Disk writes of the configured block device.");
            }
            Writes::Holding { disk, partition } => {
                tracing::info!(device = %disk, partition = partition.as_deref().unwrap_or("-"), disk_path, "Disk writes of the disk holding the data.");
            }
            Writes::AllDisks { disks, why } => {
                tracing::info!(devices = %disks.join(","), why = %why, disk_path, "The disk holding the data is not known: disk writes are those of every physical disk.");
            }
            Writes::Unknown(why) => {
                tracing::info!(why = %why, disk_path, "Disk writes not available on this machine: left out.");
            }
        }
    }

    // --- samples --------------------------------------------------------------------------

    /// A source read or parsed wrong: left out of this reading.
    pub fn source_failed(&self, source: Source, path: &str, error: &str, first: bool) {
        self.core.error("source").inc();
        let allowed = self.sources_log.allow_key(source.as_str());
        match (first, allowed) {
            // Logged whatever the limit: the log shows when each failure began.
            (true, _) => {
                tracing::warn!(
                    source = source.as_str(),
                    path,
                    error,
                    "Cannot read a source of the node's health: left out of its reading until it reads again."
                );
            }
            (false, Some(skipped)) => {
                tracing::warn!(
                    source = source.as_str(),
                    path,
                    error,
                    skipped,
                    "A source of the node's health still fails: left out."
                );
            }
            (false, None) => {}
        }
    }

    pub fn source_recovered(&self, source: Source, path: &str, failures: u64) {
        tracing::info!(
            source = source.as_str(),
            path,
            failures,
            "A source of the node's health reads again."
        );
    }

    /// The previous sample is still running after an interval (a hanging read).
    pub fn sample_stuck(&self, waited: Duration) {
        self.core.error("stuck").inc();
        if let Some(skipped) = self.stuck_log.allow() {
            let waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
            tracing::error!(
                waited_ms,
                skipped,
                "A sample of the node's health has not finished (a read hangs): no readings until it does."
            );
        }
    }

    pub fn sample_unstuck(&self, skipped: u64) {
        tracing::warn!(
            skipped,
            "The hanging sample of the node's health finished: readings resume."
        );
    }

    /// A task ended by panicking (a bug).
    pub fn task_failed(&self, task: &str, error: &tokio::task::JoinError) {
        self.core.error("task").inc();
        tracing::error!(task, error = %chain(error), "A task of node-health ended abnormally.");
    }

    /// Counted and logged as every service does (`runtime::events`).
    pub fn reading_not_sent(&self, node: &Segment, error: &DeliveryError) {
        runtime::events::reading_not_sent(&self.core, node.as_str(), error);
    }
}
