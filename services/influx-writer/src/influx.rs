//! The InfluxDB output: batches to line protocol to HTTP, with a spool on disk for when the
//! server cannot take them.
//!
//! The path of a batch:
//! 1. Every reading is encoded on its own; one that cannot be (it never happens with readings
//!    that passed proto's validation, but the encoder checks anyway) is dead-lettered.
//! 2. While InfluxDB answers, the batch is POSTed. 204: done. 400 or 413: the batch is split in
//!    halves until the line the server refuses is alone; that line is dead-lettered with the
//!    server's message and everything else is written (resending a line that was already
//!    written overwrites it with itself: writes are idempotent).
//! 3. When the server is away (connection refused, timeout, 429, 5xx) or refuses our settings
//!    (401, 403, 404), the rest of the batch is appended to the spool and fsynced, and only
//!    then acknowledged upstream: from that moment the spool owns it. Later batches go
//!    straight to the spool until a retry succeeds.
//! 4. The spool is retried with exponential backoff and jitter, oldest batch first; once the
//!    server is back it drains in order, interleaved with the new batches, which are written
//!    directly again. A spooled batch leaves the spool only when InfluxDB has accepted it.
//!
//! The spool is the runtime's disk journal (CRC per record, torn-tail recovery, bounded with
//! the oldest dropped loudly), one record per batch. Nothing touches the disk while InfluxDB
//! is healthy.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::{DeadLetter, Segment, Topic};
use runtime::Shutdown;
use runtime::backoff::{Backoff, Retries};
use runtime::bus::Bus;
use runtime::config::{JournalKind, StreamConfig};
use runtime::dead_letters::DeadLetterFile;
use runtime::journal::{Journal, JournalError, Record};
use runtime::telemetry::{Counter, Gauge};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::batch::Batch;
use crate::config::{SpoolConfig, Target};
use crate::http::{Client, ClientError, Outcome};
use crate::line_protocol::{Precision, encode_point, measurement_point};

/// Lines to write: one body, and where each line starts.
#[derive(Debug, Default)]
pub struct Lines {
    body: String,
    /// `starts[i]..starts[i + 1]` is line `i` (with its newline); one more entry than lines.
    starts: Vec<usize>,
    /// The topic each line came from (empty for lines read back from the spool).
    topics: Vec<String>,
}

impl Lines {
    fn new() -> Self {
        Self {
            body: String::new(),
            starts: vec![0],
            topics: Vec::new(),
        }
    }

    /// Lines of a spooled body.
    fn parse(body: String) -> Self {
        let mut starts = vec![0];
        for (i, b) in body.bytes().enumerate() {
            if b == b'\n' {
                starts.push(i + 1);
            }
        }
        if starts.last() != Some(&body.len()) {
            starts.push(body.len());
        }
        let n = starts.len() - 1;
        Self {
            body,
            starts,
            topics: vec![String::new(); n],
        }
    }

    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slice(&self, r: &Range<usize>) -> &str {
        &self.body[self.starts[r.start]..self.starts[r.end]]
    }
}

/// Why a batch could not be written now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Unavailable(String),
    Refused(String),
    /// Shutdown was requested between the requests of a split batch.
    Stopping,
}

/// A point that will not be written, and why.
#[derive(Debug)]
struct Refusal {
    reason: String,
    topic: String,
    line: String,
}

/// Points the server refused, published and kept in a file.
#[derive(Debug)]
pub struct DeadLetters {
    bus: Bus,
    topic: Topic<DeadLetter>,
    service: Segment,
    /// Shared with the inbox, which keeps its own dead letters (mislabelled and malformed
    /// messages) in the same file.
    file: Arc<DeadLetterFile>,
    count: Counter,
}

/// Dead letters logged one by one per batch; the rest are summarised.
const LOGGED_PER_BATCH: usize = 3;

impl DeadLetters {
    pub fn new(bus: &Bus, site: &Segment, service: &Segment, file: Arc<DeadLetterFile>) -> Self {
        Self {
            bus: bus.clone(),
            topic: Topic::dead_letter(site, service),
            service: service.clone(),
            file,
            count: Counter::new(
                "wattbus_influx_dead_letters_total",
                "Points InfluxDB refused (or that could not be encoded), sent to the dead-letter topic and file.",
                &[],
            ),
        }
    }

    /// Record a batch's refused points: one fsynced append to the file, one message each on
    /// the dead-letter topic, a few ERROR lines. `false` when the file could not take them:
    /// then the file is not their copy, and the batch must not be acknowledged (its producer
    /// replays it, and the points are refused and dead-lettered again).
    #[must_use]
    async fn send_all(&self, refused: Vec<Refusal>) -> bool {
        if refused.is_empty() {
            return true;
        }
        self.count.add(refused.len() as u64);
        for r in refused.iter().take(LOGGED_PER_BATCH) {
            tracing::error!(
                reason = %r.reason,
                topic = %r.topic,
                line = r.line.trim_end(),
                file = %self.file.path().display(),
                "A point was refused and dead-lettered; the rest of its batch is stored."
            );
        }
        if refused.len() > LOGGED_PER_BATCH {
            tracing::error!(
                more = refused.len() - LOGGED_PER_BATCH,
                file = %self.file.path().display(),
                "More points of this batch were dead-lettered."
            );
        }
        let letters: Vec<DeadLetter> = refused
            .iter()
            .map(|r| {
                let topic = if r.topic.is_empty() {
                    "(spool)"
                } else {
                    &r.topic
                };
                DeadLetter::new(self.service.clone(), &r.reason, topic, r.line.as_bytes())
            })
            .collect();
        let file = self.file.clone();
        let (letters, written) = match tokio::task::spawn_blocking(move || {
            let r = file.append(&letters);
            (letters, r)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let kept = match written {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(file = %self.file.path().display(), error = %e, "Cannot write the dead-letter file; the batch is not acknowledged, and its producer will send it again.");
                false
            }
        };
        for dl in &letters {
            if let Err(e) = self.bus.send(&self.topic, dl, false).await {
                tracing::warn!(error = %e, "Could not publish a dead letter.");
                break;
            }
        }
        kept
    }
}

/// The write retries, and when the current wait after a failure ends.
#[derive(Debug)]
struct RetryWait {
    retries: Retries,
    until: Option<Instant>,
}

impl RetryWait {
    fn new(policy: Backoff) -> Self {
        Self {
            retries: Retries::new(policy),
            until: None,
        }
    }

    fn fail(&mut self) -> Duration {
        let wait = self.retries.failed();
        self.until = Some(Instant::now() + wait);
        wait
    }

    fn reset(&mut self) {
        self.retries.succeeded();
        self.until = None;
    }

    /// Still inside the wait after a failure.
    fn waiting(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }
}

#[derive(Debug)]
struct Metrics {
    points: Counter,
    requests_ok: Counter,
    requests_failed: Counter,
    spooled_points: Counter,
    spool_dropped: Counter,
    spool_batches: Gauge,
    spool_bytes: Gauge,
    up: Gauge,
}

impl Metrics {
    fn new() -> Self {
        Self {
            points: Counter::new(
                "wattbus_influx_points_written_total",
                "Points InfluxDB accepted (replays of a point count again).",
                &[],
            ),
            requests_ok: Counter::new(
                "wattbus_influx_requests_total",
                "Write requests by result.",
                &[("result", "written")],
            ),
            requests_failed: Counter::new(
                "wattbus_influx_requests_total",
                "Write requests by result.",
                &[("result", "failed")],
            ),
            spooled_points: Counter::new(
                "wattbus_influx_spooled_points_total",
                "Points put in the spool because InfluxDB could not take them.",
                &[],
            ),
            spool_dropped: Counter::new(
                "wattbus_influx_spool_dropped_batches_total",
                "Spooled batches dropped unwritten because the spool was full.",
                &[],
            ),
            spool_batches: Gauge::new(
                "wattbus_influx_spool_batches",
                "Batches waiting in the spool.",
                &[],
            ),
            spool_bytes: Gauge::new(
                "wattbus_influx_spool_bytes",
                "Size of the spool on disk.",
                &[],
            ),
            up: Gauge::new(
                "wattbus_influx_up",
                "1 while InfluxDB accepts writes, 0 while the writer is spooling.",
                &[],
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot open the spool: {0}")]
    Spool(#[from] JournalError),
}

/// Most bytes read from the spool at once (about one segment).
const SPOOL_READ_BYTES: u64 = 4 << 20;

/// The InfluxDB output task.
#[derive(Debug)]
pub struct InfluxSink {
    client: Client,
    /// `None` only while a blocking spool operation has it.
    spool: Option<Journal>,
    /// Spooled records read but not yet written, oldest first.
    queue: VecDeque<Record>,
    /// Largest spool record: a batch's remainder is cut at line boundaries to fit, so a
    /// record never outgrows a segment (or the journal's record limit).
    max_record: usize,
    /// Spooled records are merged into requests of up to this many lines.
    merge_lines: usize,
    backoff: RetryWait,
    precision: Precision,
    dead: Arc<DeadLetters>,
    shutdown: Shutdown,
    m: Metrics,
    down: Option<Failure>,
}

impl InfluxSink {
    pub fn open(
        target: &Target,
        spool_dir: &Path,
        spool: &SpoolConfig,
        batch_points: usize,
        dead: Arc<DeadLetters>,
        shutdown: Shutdown,
    ) -> Result<Self, SinkError> {
        let client = Client::new(target)?;
        let cfg = StreamConfig {
            journal: JournalKind::Disk,
            max_bytes: spool.max_bytes,
            segment_bytes: spool.segment_bytes,
            // Each append is fsynced by hand before the batch is acknowledged.
            fsync_interval_ms: 0,
            ..StreamConfig::default()
        };
        let (journal, report) = Journal::open(spool_dir, &cfg)?;
        runtime::events::journal_opened("influx-spool", spool_dir, &report);
        let m = Metrics::new();
        m.up.set(1.0);
        let sink = Self {
            client,
            spool: Some(journal),
            queue: VecDeque::new(),
            max_record: usize::try_from(spool.segment_bytes / 2).unwrap_or(usize::MAX),
            merge_lines: batch_points,
            backoff: RetryWait::new(target.retry),
            precision: target.cfg.precision,
            dead,
            shutdown,
            m,
            down: None,
        };
        sink.update_gauges();
        let spooled = sink.spooled();
        if spooled > 0 {
            tracing::info!(
                batches = spooled,
                "The InfluxDB spool holds batches from before; draining them."
            );
        }
        tracing::info!(endpoint = %sink.client.endpoint(), "Writing to InfluxDB.");
        Ok(sink)
    }

    fn spooled(&self) -> u64 {
        self.spool.as_ref().map_or(0, Journal::records)
    }

    fn update_gauges(&self) {
        if let Some(j) = &self.spool {
            self.m.spool_batches.set(j.records() as f64);
            self.m.spool_bytes.set(j.bytes() as f64);
        }
    }

    /// Take batches until the channel closes; then save the spool's position.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Arc<Batch>>) {
        loop {
            let retry_at = self.backoff.until.unwrap_or_else(Instant::now);
            let drain = self.spooled() > 0 && !self.shutdown.is_requested();
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => self.handle(b).await,
                    None => break,
                },
                () = tokio::time::sleep_until(retry_at), if drain => self.drain_some().await,
                () = self.shutdown.wait(), if drain => {}
            }
        }
        if let Some(j) = &self.spool
            && let Err(e) = j.save_acked()
        {
            tracing::warn!(error = %e, "Cannot save the spool's position; some batches will be written twice (harmless).");
        }
    }

    async fn handle(&mut self, batch: Arc<Batch>) {
        let mut lines = Lines::new();
        let mut refused = Vec::new();
        for item in &batch.items {
            let encoded = measurement_point(&item.measurement, self.precision)
                .and_then(|p| encode_point(&mut lines.body, &p));
            match encoded {
                Ok(()) => {
                    lines.starts.push(lines.body.len());
                    lines.topics.push(item.topic.clone());
                }
                Err(e) => refused.push(Refusal {
                    reason: e.to_string(),
                    topic: item.topic.clone(),
                    line: serde_json::to_string(&item.measurement).unwrap_or_default(),
                }),
            }
        }
        let result = if lines.is_empty() {
            Ok(())
        } else if self.backoff.waiting() || self.shutdown.is_requested() {
            // Known to be away, or stopping (a POST could outlast the grace period): spool.
            // Once the wait is over, the next batch is the probe — also when the spool is
            // empty because writing it failed.
            Err(std::iter::once(0..lines.len()).collect())
        } else {
            match self.deliver(&lines, &mut refused).await {
                Ok(()) => {
                    self.came_back();
                    Ok(())
                }
                Err((rest, failure)) => {
                    self.went_down(failure);
                    Err(rest)
                }
            }
        };
        let kept = self.dead.send_all(refused).await;
        match result {
            // Stored, except the refused points, which are in the dead-letter file.
            Ok(()) if kept => batch.done(),
            // Their only copy would be gone: not acknowledged, so the producer keeps and
            // replays the batch (what InfluxDB took is overwritten with itself).
            Ok(()) => {}
            Err(rest) => {
                let mut body = String::new();
                let mut n = 0;
                // `rest` is a stack: the last entry is the next range in order.
                for r in rest.iter().rev() {
                    body.push_str(lines.slice(r));
                    n += r.len();
                }
                if self.spool_append(&body, n).await {
                    batch.done();
                }
            }
        }
    }

    /// Write `lines`, splitting on 400/413 and collecting the lines refused on their own in
    /// `refused`. On a failure that is not about particular lines, returns the ranges not
    /// yet written.
    async fn deliver(
        &mut self,
        lines: &Lines,
        refused: &mut Vec<Refusal>,
    ) -> Result<(), (Vec<Range<usize>>, Failure)> {
        let mut stack: Vec<Range<usize>> = Vec::with_capacity(16);
        stack.push(0..lines.len());
        let mut first = true;
        while let Some(r) = stack.pop() {
            if !first && self.shutdown.is_requested() {
                stack.push(r);
                return Err((stack, Failure::Stopping));
            }
            first = false;
            let outcome = self.client.write(lines.slice(&r).as_bytes()).await;
            let split = |stack: &mut Vec<Range<usize>>, r: &Range<usize>| {
                let mid = r.start + r.len() / 2;
                stack.push(mid..r.end);
                stack.push(r.start..mid);
            };
            let refuse = |refused: &mut Vec<Refusal>, reason: String| {
                refused.push(Refusal {
                    reason,
                    topic: lines.topics[r.start].clone(),
                    line: lines.slice(&r).to_string(),
                });
            };
            match outcome {
                Outcome::Written => {
                    self.m.requests_ok.inc();
                    self.m.points.add(r.len() as u64);
                }
                Outcome::Rejected(msg) if r.len() == 1 => {
                    self.m.requests_failed.inc();
                    refuse(refused, msg);
                }
                Outcome::TooLarge if r.len() == 1 => {
                    self.m.requests_failed.inc();
                    refuse(
                        refused,
                        "InfluxDB answered 413: this single point is larger than it accepts".into(),
                    );
                }
                Outcome::Rejected(msg) => {
                    self.m.requests_failed.inc();
                    tracing::debug!(lines = r.len(), message = %msg, "InfluxDB refused a batch; splitting it to find the bad line.");
                    split(&mut stack, &r);
                }
                Outcome::TooLarge => {
                    self.m.requests_failed.inc();
                    tracing::info!(
                        lines = r.len(),
                        "InfluxDB found a batch too large (413); splitting it. Lower batch_points to avoid this."
                    );
                    split(&mut stack, &r);
                }
                Outcome::Unavailable(why) => {
                    self.m.requests_failed.inc();
                    stack.push(r);
                    return Err((stack, Failure::Unavailable(why)));
                }
                Outcome::Refused { what, .. } => {
                    self.m.requests_failed.inc();
                    stack.push(r);
                    return Err((stack, Failure::Refused(what)));
                }
            }
        }
        Ok(())
    }

    /// Write the oldest spooled records (merged up to `merge_lines` lines) and trim them.
    async fn drain_some(&mut self) {
        if self.queue.is_empty() && !self.refill().await {
            return;
        }
        let mut body = String::new();
        let mut taken: usize = 0;
        let mut line_count = 0;
        for r in &self.queue {
            let n = r.payload.iter().filter(|b| **b == b'\n').count();
            if taken > 0 && line_count + n > self.merge_lines {
                break;
            }
            body.push_str(&String::from_utf8_lossy(&r.payload));
            if !body.ends_with('\n') {
                body.push('\n');
            }
            taken += 1;
            line_count += n;
        }
        let Some(last_seq) = self.queue.get(taken.saturating_sub(1)).map(|r| r.seq) else {
            return;
        };
        let lines = Lines::parse(body);
        let mut refused = Vec::new();
        let result = self.deliver(&lines, &mut refused).await;
        let kept = self.dead.send_all(refused).await;
        match result {
            // The refused points could not be dead-lettered: the spool keeps them (and what
            // InfluxDB took), and they are tried again after a backoff.
            Ok(()) if !kept => self.went_down(Failure::Unavailable(
                "the dead-letter file cannot take the points InfluxDB refused".into(),
            )),
            Ok(()) => {
                self.queue.drain(..taken);
                self.trim_spool(last_seq).await;
                self.came_back();
                if self.spooled() == 0 {
                    tracing::info!("The InfluxDB spool is drained.");
                }
            }
            Err((_, Failure::Stopping)) => {}
            Err((_, failure)) => self.went_down(failure),
        }
    }

    /// Read the next part of the spool into the queue. `false`: nothing to drain now.
    async fn refill(&mut self) -> bool {
        let Some(spool) = self.spool.take() else {
            return false;
        };
        let (spool, read) = blocking(spool, |j| {
            j.read_after_within(0, usize::MAX, SPOOL_READ_BYTES, |_| false)
        })
        .await;
        self.spool = Some(spool);
        match read {
            Ok(records) if !records.is_empty() => {
                self.queue.extend(records);
                true
            }
            Ok(_) => {
                // The journal counts records it cannot return (their segment lost its file
                // under us). Waiting cannot bring them back, and spinning on them would
                // stop the spool: give them up, loudly.
                let lost = self.spooled();
                if let Some(last) = self.spool.as_ref().and_then(Journal::last_seq) {
                    tracing::error!(
                        batches = lost,
                        "Spooled batches cannot be read back (their segment file is gone); they are dropped."
                    );
                    self.m.spool_dropped.add(lost);
                    self.trim_spool(last).await;
                }
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the InfluxDB spool; retrying with backoff.");
                self.m.up.set(0.0);
                self.backoff.fail();
                false
            }
        }
    }

    async fn trim_spool(&mut self, through: u64) {
        let Some(spool) = self.spool.take() else {
            return;
        };
        let (spool, r) = blocking(spool, move |j| {
            j.trim_through(through)?;
            // Saving the position only when the spool is empty keeps the disk quiet during
            // a drain; a crash mid-drain resends some batches (harmless).
            if j.records() == 0 {
                j.save_acked()?;
            }
            Ok::<_, JournalError>(())
        })
        .await;
        self.spool = Some(spool);
        if let Err(e) = r {
            tracing::warn!(error = %e, "Cannot trim the InfluxDB spool.");
        }
        self.update_gauges();
    }

    /// Append to the spool (in records of at most `max_record` bytes, cut at line
    /// boundaries) and fsync. `false`: not stored (the batch stays unacknowledged and its
    /// producers will replay it).
    async fn spool_append(&mut self, body: &str, points: usize) -> bool {
        let Some(spool) = self.spool.take() else {
            return false;
        };
        let chunks = split_at_lines(body, self.max_record);
        let (spool, r) = blocking(spool, move |j| {
            let mut dropped = 0;
            for c in chunks {
                let (_, d) = j.append("", c.as_bytes())?;
                dropped += d.map_or(0, |d| d.records);
            }
            if let Some((path, file)) = j.sync_handle()? {
                file.sync_data()
                    .map_err(|source| JournalError::Io { path, source })?;
            }
            Ok::<_, JournalError>(dropped)
        })
        .await;
        self.spool = Some(spool);
        match r {
            Ok(dropped) => {
                self.m.spooled_points.add(points as u64);
                if dropped > 0 {
                    self.m.spool_dropped.add(dropped);
                    tracing::error!(
                        batches = dropped,
                        "The InfluxDB spool is full: its oldest batches were dropped unwritten. \
                         Raise influx_writer.spool.max_bytes or bring InfluxDB back."
                    );
                }
                self.update_gauges();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot write the InfluxDB spool; the batch stays with its producers.");
                false
            }
        }
    }

    fn went_down(&mut self, failure: Failure) {
        if failure == Failure::Stopping {
            return;
        }
        let wait = self.backoff.fail();
        self.m.up.set(0.0);
        let changed = self.down.as_ref() != Some(&failure);
        let retry_in_ms = wait.as_millis() as u64;
        match &failure {
            Failure::Refused(what) => {
                // A person has to act: say it at ERROR on every retry (at most once per
                // retry_max_ms once the backoff has grown).
                tracing::error!(
                    retry_in_ms,
                    "{what}. Readings are kept in the spool until this is fixed."
                );
            }
            Failure::Unavailable(why) if changed => {
                tracing::warn!(
                    reason = %why,
                    endpoint = %self.client.endpoint(),
                    retry_in_ms,
                    "InfluxDB cannot take writes; spooling readings to disk until it can."
                );
            }
            Failure::Unavailable(why) => {
                tracing::debug!(reason = %why, retry_in_ms, "InfluxDB still unavailable.");
            }
            Failure::Stopping => {}
        }
        self.down = Some(failure);
    }

    fn came_back(&mut self) {
        self.backoff.reset();
        if self.down.take().is_some() {
            self.m.up.set(1.0);
            tracing::info!(
                spooled_batches = self.spooled(),
                "InfluxDB accepts writes again; draining the spool."
            );
        }
    }
}

/// Cut `body` into pieces of at most `max` bytes at line ends (a single longer line stays
/// whole: the journal's own record limit is far above any line).
fn split_at_lines(body: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in body.split_inclusive('\n') {
        if !current.is_empty() && current.len() + line.len() > max {
            out.push(std::mem::take(&mut current));
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Run a spool operation off the async threads and hand the spool back.
async fn blocking<R: Send + 'static>(
    mut j: Journal,
    f: impl FnOnce(&mut Journal) -> R + Send + 'static,
) -> (Journal, R) {
    match tokio::task::spawn_blocking(move || {
        let r = f(&mut j);
        (j, r)
    })
    .await
    {
        Ok(v) => v,
        // A panic in a spool operation is a bug; panic=abort in release ends the process anyway.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_slice() {
        let l = Lines::parse("a v=1 1\nb v=2 2\nc v=3 3\n".into());
        assert_eq!(l.len(), 3);
        assert_eq!(l.slice(&(1..3)), "b v=2 2\nc v=3 3\n");
        // A body without its last newline still yields every line.
        let l = Lines::parse("a v=1 1\nb v=2 2".into());
        assert_eq!(l.len(), 2);
        assert_eq!(l.slice(&(1..2)), "b v=2 2");
    }

    #[test]
    fn spool_records_are_cut_at_line_ends() {
        let body = "aaaa\nbbbb\ncccc\n";
        assert_eq!(split_at_lines(body, 10), vec!["aaaa\nbbbb\n", "cccc\n"]);
        assert_eq!(split_at_lines(body, 3), vec!["aaaa\n", "bbbb\n", "cccc\n"]);
        assert_eq!(split_at_lines(body, 100), vec![body]);
        assert!(split_at_lines("", 10).is_empty());
    }

    #[tokio::test]
    async fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = RetryWait::new(Backoff::constant(
            Duration::from_millis(100),
            Duration::from_millis(400),
        ));
        let waits: Vec<Duration> = (0..5).map(|_| b.fail()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[1] >= Duration::from_millis(100) && waits[1] <= Duration::from_millis(200));
        for w in &waits[2..] {
            assert!(
                *w >= Duration::from_millis(200) && *w <= Duration::from_millis(400),
                "{w:?}"
            );
        }
        assert!(b.waiting());
        b.reset();
        assert!(!b.waiting());
    }
}
