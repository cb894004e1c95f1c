//! The writer's notable events, each logged and counted here and nowhere else: the log line
//! for the person at the terminal, the counter for the dashboard.
//!
//! One struct per unit, made once: [`Intake`] (readings off the bus), [`Output`] (a spooled
//! output: InfluxDB or HTTP, with its spool; [`INFLUX`] and [`HTTP`] name their metrics) and
//! [`Files`] (the file output). Every error event also counts in the
//! core `wattbus_errors_total{service="influx-writer",kind}` ([`ERROR_KINDS`], and the
//! runtime's `journal` and `journal_dropped` for the spool, which is a journal), every dead
//! letter in the core `wattbus_dead_letters_total`, and the spool's depth and age are the core
//! `wattbus_journal_records` / `wattbus_journal_oldest_seconds{stream="influx-spool"|"http-spool"}`
//! (docs/metrics.md).

use std::path::Path;
use std::time::Duration;

use proto::{Implausible, Measurement};
use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, Gauge, LogLimit, chain};

use crate::sink::Refusal;

/// The writer's own kinds of `wattbus_errors_total`, besides the runtime's.
pub const ERROR_KINDS: &[&str] = &[
    // A `good` reading with a value outside its unit's plausible range: stored as out_of_range.
    "implausible",
    // An output refused a point on its own (InfluxDB 400/422/413, the HTTP endpoint a 4xx), or
    // it could not be encoded: dead-lettered.
    "refused_point",
    // InfluxDB could not take a write (connection refused, timeout, 429, 5xx): spooled, retried.
    "influx_unavailable",
    // InfluxDB refused the writer's settings (401, 403, 404): spooled until a person fixes them.
    "influx_refused",
    // The HTTP endpoint could not take a request (connection refused, timeout, 408, 429, 5xx).
    "http_unavailable",
    // The HTTP endpoint refused the writer's settings (401, 403, 404, 405, a redirect).
    "http_refused",
    // The dead-letter file could not be written: the batch is not acknowledged (replayed).
    "dead_letter_file",
    // The file output could not write a batch: it is not acknowledged (replayed).
    "files",
    // A reading the file format cannot hold: dead-lettered.
    "unwritable_reading",
    // An output task ended (a bug): batches stay with their producers.
    "output_stopped",
];

/// The service's name in the core metrics.
const SERVICE: &str = <crate::InfluxWriter as runtime::Service>::NAME;

/// The spool's stream name in the core journal metrics (and in its journal's own metrics).
pub const SPOOL_STREAM: &str = "influx-spool";

/// The HTTP output's spool.
pub const HTTP_SPOOL_STREAM: &str = "http-spool";

/// A broken register repeats every poll: its implausible readings are logged at most once in
/// this interval, with the count of the rest.
const IMPLAUSIBLE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Refused points logged one by one per batch; the rest are summarised.
const LOGGED_PER_BATCH: usize = 3;

/// Readings off the bus, before they are batched.
#[derive(Debug)]
pub struct Intake {
    core: Core,
    readings: Counter,
    implausible: Counter,
    log: LogLimit,
    status_log: LogLimit,
}

impl Intake {
    pub fn new() -> Self {
        Self {
            core: Core::of(SERVICE),
            readings: Counter::new(
                "wattbus_influx_writer_readings_total",
                "Readings received from the bus.",
                &[],
            ),
            implausible: Counter::new(
                "wattbus_influx_writer_implausible_readings_total",
                "Readings stored with quality out_of_range because a value is outside the plausible range of its unit.",
                &[],
            ),
            log: LogLimit::new(IMPLAUSIBLE_LOG_EVERY),
            status_log: LogLimit::new(IMPLAUSIBLE_LOG_EVERY),
        }
    }

    /// A reading came off the bus (the runtime has checked it decodes and is labelled right).
    pub fn reading(&self) {
        self.readings.inc();
    }

    /// A `good` reading with a value outside the plausible range of its unit, stored as
    /// `out_of_range`. WARN: handled (the value is kept, flagged), but a meter, a profile or a
    /// producer is wrong and a person should look.
    pub fn implausible(&self, topic: &str, m: &Measurement, bad: &Implausible) {
        self.implausible.inc();
        self.core.error("implausible").inc();
        if let Some(unlogged) = self.log.allow() {
            tracing::warn!(
                topic,
                device = %m.device,
                channel = %m.channel,
                field = %bad.field,
                value = bad.value,
                unlogged,
                "{bad}; stored with quality out_of_range (value kept)."
            );
        }
    }

    /// A status that cannot be stored (it does not decode, or names another instance or
    /// site than its topic): not stored, counted as malformed, WARN at most once a minute.
    pub fn bad_status(&self, topic: &str, reason: &str) {
        self.core.error("malformed").inc();
        if let Some(unlogged) = self.status_log.allow() {
            tracing::warn!(
                topic,
                unlogged,
                "A service status was not stored: {reason}."
            );
        }
    }

    /// An output took no more batches: it ended, and what it did not store stays with the
    /// producers (replayed).
    pub fn output_stopped(&self) {
        self.core.error("output_stopped").inc();
        tracing::error!("An output has stopped; readings stay with their producers.");
    }

    /// An output task ended with a panic.
    pub fn output_failed(&self, error: &dyn std::error::Error) {
        self.core.error("output_stopped").inc();
        tracing::error!(error = %chain(error), "An output task ended abnormally.");
    }
}

/// What tells one spooled output's events from another's: its name in log lines, its
/// metrics, its error kinds, its spool's stream.
#[derive(Debug, Clone, Copy)]
pub struct OutputNames {
    /// As the subject of a sentence: "InfluxDB", "The HTTP endpoint".
    pub name: &'static str,
    /// What to check when it refuses every reading.
    pub check: &'static str,
    /// What to lower when it finds every request too large.
    pub bytes_key: &'static str,
    /// `wattbus_errors_total` kinds.
    unavailable_kind: &'static str,
    refused_kind: &'static str,
    /// The spool's stream in the core journal metrics.
    pub spool_stream: &'static str,
    points: &'static str,
    points_help: &'static str,
    requests: &'static str,
    spooled: &'static str,
    spooled_help: &'static str,
    dropped: &'static str,
    bytes: &'static str,
    up: &'static str,
    up_help: &'static str,
}

/// The InfluxDB output.
pub const INFLUX: OutputNames = OutputNames {
    name: "InfluxDB",
    check: "influx_writer.influx.url, and whatever answers there before InfluxDB (a proxy?)",
    bytes_key: "influx_writer.batch_points",
    unavailable_kind: "influx_unavailable",
    refused_kind: "influx_refused",
    spool_stream: SPOOL_STREAM,
    points: "wattbus_influx_points_written_total",
    points_help: "Points InfluxDB accepted (replays of a point count again).",
    requests: "wattbus_influx_requests_total",
    spooled: "wattbus_influx_spooled_points_total",
    spooled_help: "Points put in the spool because InfluxDB could not take them.",
    dropped: "wattbus_influx_spool_dropped_batches_total",
    bytes: "wattbus_influx_spool_bytes",
    up: "wattbus_influx_up",
    up_help: "1 while InfluxDB accepts writes, 0 while the writer is spooling.",
};

/// The HTTP output.
pub const HTTP: OutputNames = OutputNames {
    name: "The HTTP endpoint",
    check: "influx_writer.http.url, gzip, what the endpoint expects",
    bytes_key: "influx_writer.http.max_bytes",
    unavailable_kind: "http_unavailable",
    refused_kind: "http_refused",
    spool_stream: HTTP_SPOOL_STREAM,
    points: "wattbus_http_output_readings_written_total",
    points_help: "Readings the HTTP endpoint accepted (2xx; replays of a reading count again).",
    requests: "wattbus_http_output_requests_total",
    spooled: "wattbus_http_output_spooled_readings_total",
    spooled_help: "Readings put in the spool because the HTTP endpoint could not take them.",
    dropped: "wattbus_http_output_spool_dropped_batches_total",
    bytes: "wattbus_http_output_spool_bytes",
    up: "wattbus_http_output_up",
    up_help: "1 while the HTTP endpoint accepts readings, 0 while the writer is spooling.",
};

/// A spooled output (InfluxDB, HTTP) and its spool.
#[derive(Debug)]
pub struct Output {
    names: OutputNames,
    core: Core,
    points: Counter,
    requests_ok: Counter,
    requests_failed: Counter,
    spooled_points: Counter,
    spool_dropped: Counter,
    spool_bytes: Gauge,
    spool_records: Gauge,
    spool_oldest: Gauge,
    up: Gauge,
    held_log: LogLimit,
}

impl Output {
    pub fn new(names: OutputNames) -> Self {
        let core = Core::of(SERVICE);
        let (spool_records, spool_oldest) = core.journal(names.spool_stream);
        Self {
            points: Counter::new(names.points, names.points_help, &[]),
            requests_ok: Counter::new(
                names.requests,
                "Write requests by result.",
                &[("result", "written")],
            ),
            requests_failed: Counter::new(
                names.requests,
                "Write requests by result.",
                &[("result", "failed")],
            ),
            spooled_points: Counter::new(names.spooled, names.spooled_help, &[]),
            spool_dropped: Counter::new(
                names.dropped,
                "Spooled batches dropped unwritten because the spool was full.",
                &[],
            ),
            spool_bytes: Gauge::new(names.bytes, "Size of the spool on disk.", &[]),
            spool_records,
            spool_oldest,
            up: Gauge::new(names.up, names.up_help, &[]),
            held_log: LogLimit::new(Duration::from_secs(60)),
            core,
            names,
        }
    }

    /// The output opened: the server is taken to accept writes until a write says otherwise.
    pub fn opened(&self, endpoint: &str, spooled: u64) {
        self.up.set(1.0);
        let name = self.names.name;
        if spooled > 0 {
            tracing::info!(
                batches = spooled,
                "The spool for {name} holds batches from before; draining them."
            );
        }
        tracing::info!(endpoint = %endpoint, "Writing to {name}.");
    }

    /// The token or password goes unencrypted over the network: anyone on the path can read
    /// it. Allowed (a backend on the LAN without TLS), said once at start.
    pub fn credentials_in_clear(&self, endpoint: &str) {
        tracing::warn!(
            endpoint = %endpoint,
            "{} is http:// on another machine: its token or password crosses the network unencrypted. Use https:// (with ca_file for your own CA).",
            self.names.name
        );
    }

    /// The spool holds `records` batches in `bytes`, the oldest appended `oldest` ago.
    pub fn spool(&self, records: u64, bytes: u64, oldest: Duration) {
        self.spool_records.set(records as f64);
        self.spool_bytes.set(bytes as f64);
        self.spool_oldest.set(oldest.as_secs_f64().floor());
    }

    /// The server accepted `points` points in one request.
    pub fn written(&self, points: usize) {
        self.requests_ok.inc();
        self.points.add(points as u64);
    }

    /// A write request failed; what follows (a split, a refusal, the spool) is its own event.
    pub fn request_failed(&self) {
        self.requests_failed.inc();
    }

    /// The server refused a batch of several points: it is split to find the bad one.
    pub fn splitting_rejected(&self, lines: usize, message: &str) {
        tracing::debug!(
            lines,
            message = %message,
            "{} refused a batch; splitting it to find the bad reading.",
            self.names.name
        );
    }

    /// The endpoint keeps answering 5xx to a batch: it is split to find a reading it cannot
    /// process.
    pub fn splitting_failing(&self, lines: usize, why: &str) {
        tracing::debug!(
            lines,
            reason = %why,
            "{} keeps failing on a batch; splitting it to find a reading it cannot process.",
            self.names.name
        );
    }

    /// The endpoint fails (5xx) on this reading alone while it takes the others: it is kept
    /// in the spool and tried again; the rest is delivered. ERROR, at most once a minute.
    pub fn reading_held(&self, why: &str, line: &str) {
        self.core.error(self.names.unavailable_kind).inc();
        if let Some(unlogged) = self.held_log.allow() {
            tracing::error!(
                reason = %why,
                reading = line.trim_end(),
                unlogged,
                "{} fails on this reading alone while it takes the others; it is kept in the spool and tried again (the rest is delivered). Look at the endpoint's logs.",
                self.names.name
            );
        }
    }

    /// The server found a batch too large (413): it is split.
    pub fn splitting_too_large(&self, lines: usize) {
        tracing::info!(
            lines,
            "{} found a batch too large (413); splitting it. Lower the batch size to avoid this.",
            self.names.name
        );
    }

    /// The server refused these points on their own (or they could not be encoded): they go
    /// to the dead-letter topic and `file`, and the rest of their batch is stored.
    pub fn points_refused(&self, refused: &[Refusal], file: &Path) {
        let n = refused.len() as u64;
        self.core.dead_letters.add(n);
        self.core.error("refused_point").add(n);
        for r in refused.iter().take(LOGGED_PER_BATCH) {
            tracing::error!(
                output = self.names.name,
                reason = %r.reason,
                topic = %r.topic,
                line = r.line.trim_end(),
                file = %file.display(),
                "A point was refused and dead-lettered; the rest of its batch is stored."
            );
        }
        if refused.len() > LOGGED_PER_BATCH {
            tracing::error!(
                more = refused.len() - LOGGED_PER_BATCH,
                file = %file.display(),
                "More points of this batch were dead-lettered."
            );
        }
    }

    /// The dead-letter file could not take refused points: their batch is not acknowledged.
    pub fn dead_letter_file_failed(&self, file: &Path, error: &std::io::Error) {
        self.core.error("dead_letter_file").inc();
        tracing::error!(file = %file.display(), error = %chain(error), "Cannot write the dead-letter file; the batch is not acknowledged, and its producer will send it again.");
    }

    /// A dead letter could not be published (it is in the file).
    pub fn dead_letter_unpublished(&self, error: &dyn std::error::Error) {
        tracing::warn!(error = %chain(error), "Could not publish a dead letter.");
    }

    /// The server is away: batches go to the spool. `first`: the first failure of this kind
    /// (WARN); the retries that follow are DEBUG.
    pub fn unavailable(&self, why: &str, endpoint: &str, retry_in_ms: u64, first: bool) {
        self.up.set(0.0);
        self.core.error(self.names.unavailable_kind).inc();
        let name = self.names.name;
        if first {
            tracing::warn!(
                reason = %why,
                endpoint = %endpoint,
                retry_in_ms,
                "{name} cannot take writes; spooling readings to disk until it can."
            );
        } else {
            tracing::debug!(reason = %why, retry_in_ms, "{name} still unavailable.");
        }
    }

    /// The server refuses the writer's settings. A person has to act: ERROR on every retry
    /// (at most once per retry_max_ms once the backoff has grown).
    pub fn refused(&self, what: &str, retry_in_ms: u64) {
        self.up.set(0.0);
        self.core.error(self.names.refused_kind).inc();
        tracing::error!(
            retry_in_ms,
            "{what}. Readings are kept in the spool until this is fixed."
        );
    }

    /// The server accepts writes again after a failure.
    pub fn came_back(&self, spooled: u64) {
        self.up.set(1.0);
        tracing::info!(
            spooled_batches = spooled,
            "{} accepts writes again; draining the spool.",
            self.names.name
        );
    }

    /// `points` points were appended to the spool (and fsynced); `dropped` of its oldest
    /// batches made room for them.
    pub fn spooled(&self, points: usize, dropped: u64) {
        self.spooled_points.add(points as u64);
        if dropped > 0 {
            self.spool_dropped.add(dropped);
            self.core.error("journal_dropped").inc();
            tracing::error!(
                batches = dropped,
                "The spool for {} is full: its oldest batches were dropped unwritten. \
                 Raise influx_writer.spool.max_bytes (each spooled output has that much) or \
                 bring it back.",
                self.names.name,
            );
        }
    }

    /// The spool could not take a batch: it stays with its producers.
    pub fn spool_write_failed(&self, error: &dyn std::error::Error) {
        self.core.error("journal").inc();
        tracing::error!(error = %chain(error), stream = self.names.spool_stream, "Cannot write the spool; the batch stays with its producers.");
    }

    /// The spool could not be read: retried with backoff.
    pub fn spool_read_failed(&self, error: &dyn std::error::Error) {
        self.up.set(0.0);
        self.core.error("journal").inc();
        tracing::error!(error = %chain(error), stream = self.names.spool_stream, "Cannot read the spool; retrying with backoff.");
    }

    /// Spooled batches whose segment file is gone: given up.
    pub fn spool_unreadable(&self, batches: u64) {
        self.spool_dropped.add(batches);
        self.core.error("journal_dropped").inc();
        tracing::error!(
            batches,
            stream = self.names.spool_stream,
            "Spooled batches cannot be read back (their segment file is gone); they are dropped."
        );
    }

    /// Written batches could not be trimmed from the spool: they will be written again
    /// (harmless), and the spool holds their room meanwhile.
    pub fn spool_trim_failed(&self, error: &dyn std::error::Error) {
        self.core.error("journal").inc();
        tracing::warn!(error = %chain(error), stream = self.names.spool_stream, "Cannot trim the spool.");
    }

    /// The spool's position could not be saved at stop: some batches are written twice.
    pub fn spool_position_unsaved(&self, error: &dyn std::error::Error) {
        self.core.error("journal").inc();
        tracing::warn!(error = %chain(error), stream = self.names.spool_stream, "Cannot save the spool's position; some batches will be written twice (harmless).");
    }

    pub fn spool_drained(&self) {
        tracing::info!("The spool for {} is drained.", self.names.name);
    }
}

/// The file output.
#[derive(Debug)]
pub struct Files {
    core: Core,
    written: Counter,
    failed: Counter,
}

impl Files {
    pub fn new() -> Self {
        Self {
            core: Core::of(SERVICE),
            written: Counter::new(
                "wattbus_files_bytes_written_total",
                "Bytes appended to the readings files.",
                &[],
            ),
            failed: Counter::new(
                "wattbus_files_write_errors_total",
                "Batches the file output could not write (they are replayed).",
                &[],
            ),
        }
    }

    pub fn opened(&self, dir: &Path, format: &dyn std::fmt::Debug) {
        tracing::info!(dir = %dir.display(), format = ?format, "Writing readings to files.");
    }

    /// A batch was appended (and fsynced), `rotated` files closed on the way.
    pub fn wrote(&self, bytes: u64, rotated: &[std::path::PathBuf]) {
        self.written.add(bytes);
        for p in rotated {
            tracing::info!(file = %p.display(), "Readings file rotated.");
        }
    }

    /// A reading the format cannot hold: dead-lettered, the rest of its batch written.
    pub fn unwritable(&self, topic: &str, reason: &str) {
        self.core.dead_letters.inc();
        self.core.error("unwritable_reading").inc();
        tracing::error!(
            topic = %topic,
            reason = %reason,
            "A reading cannot be written to a file; dead-lettered."
        );
    }

    /// The dead-letter file could not take the batch's unwritable readings: not acknowledged.
    pub fn dead_letter_file_failed(&self, file: &Path, error: &std::io::Error) {
        self.failed.inc();
        self.core.error("dead_letter_file").inc();
        tracing::error!(file = %file.display(), error = %chain(error), "Cannot write the dead-letter file; the batch will be replayed.");
    }

    /// The readings file could not take a batch: not acknowledged, replayed.
    pub fn write_failed(&self, error: &std::io::Error) {
        self.failed.inc();
        self.core.error("files").inc();
        tracing::error!(error = %chain(error), "Cannot write the readings file; the batch will be replayed.");
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use wattbus_testkit::logged;

    fn errors(kind: &str) -> u64 {
        Core::of(SERVICE).error(kind).get()
    }

    fn reading(power_w: f64) -> Measurement {
        let seg = |s: &str| proto::Segment::new(s).unwrap();
        Measurement {
            origin: None,
            site: seg("home"),
            device: seg("m-1"),
            channel: seg("l1"),
            measurement: seg("power"),
            ts_ms: 1_796_000_000_000,
            quality: proto::Quality::Good,
            fields: [("power_w".to_string(), power_w)].into_iter().collect(),
            tags: Default::default(),
        }
    }

    #[test]
    fn implausible_readings_count_under_their_kind_and_are_logged_once_a_minute() {
        let intake = Intake::new();
        let before = errors("implausible");
        let mut m = reading(5e9);
        let bad = m.flag_implausible().unwrap();
        let log = logged(|| {
            for _ in 0..4 {
                intake.implausible("wattbus/v1/home/meas/m-1/l1", &m, &bad);
            }
        });
        // Only this test counts this kind in this binary.
        assert_eq!(errors("implausible"), before + 4);
        assert_eq!(
            log.matches("stored with quality out_of_range").count(),
            1,
            "{log}"
        );
    }

    #[test]
    fn refused_points_are_dead_letters_counted_each_and_logged_a_few_per_batch() {
        let influx = Output::new(INFLUX);
        let (kind, dead) = (
            errors("refused_point"),
            Core::of(SERVICE).dead_letters.get(),
        );
        let refused: Vec<Refusal> = (0..5)
            .map(|i| Refusal {
                reason: "field type conflict".into(),
                topic: format!("wattbus/v1/home/meas/m-{i}/l1"),
                line: format!("power,device=m-{i} power_w=1i 1\n"),
            })
            .collect();
        let log = logged(|| influx.points_refused(&refused, Path::new("dead.jsonl")));
        assert_eq!(errors("refused_point"), kind + 5);
        assert!(Core::of(SERVICE).dead_letters.get() >= dead + 5);
        assert_eq!(log.matches("A point was refused").count(), 3, "{log}");
        assert!(log.contains("more=2"), "{log}");
    }

    #[test]
    fn an_outage_counts_every_failed_write_and_warns_once_then_the_up_gauge_follows() {
        let influx = Output::new(INFLUX);
        let up = Gauge::new("wattbus_influx_up", "", &[]);
        let before = errors("influx_unavailable");
        let log = logged(|| {
            influx.unavailable("connection refused", "http://influx:8086", 100, true);
            influx.unavailable("connection refused", "http://influx:8086", 200, false);
        });
        assert_eq!(errors("influx_unavailable"), before + 2);
        assert_eq!(
            log.matches("InfluxDB cannot take writes").count(),
            1,
            "{log}"
        );
        assert_eq!(up.get(), 0.0);
        influx.came_back(0);
        assert_eq!(up.get(), 1.0);
    }

    #[test]
    fn a_failing_file_output_counts_under_its_kind_and_logs_the_cause() {
        let files = Files::new();
        let before = errors("files");
        let log = logged(|| files.write_failed(&io::Error::other("no space left on device")));
        assert_eq!(errors("files"), before + 1);
        assert!(log.contains("no space left on device"), "{log}");
    }

    #[test]
    fn every_error_kind_is_declared_once_and_apart_from_the_runtimes() {
        for (i, k) in ERROR_KINDS.iter().enumerate() {
            assert!(!ERROR_KINDS[..i].contains(k), "{k} twice");
            assert!(
                !runtime::telemetry::core::RUNTIME_ERROR_KINDS.contains(k),
                "{k} is the runtime's"
            );
        }
    }
}
