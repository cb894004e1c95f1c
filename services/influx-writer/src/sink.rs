//! A spooled output: batches to lines to HTTP requests, with a spool on disk for when the
//! server cannot take them. InfluxDB (line protocol, [`crate::http`]) and the HTTP output
//! (JSON, [`crate::post`]) are two [`Endpoint`]s of the same machinery, so both keep the same
//! delivery contract.
//!
//! The path of a batch:
//! 1. Every reading is encoded on its own as one line; one that cannot be (it never happens
//!    with readings that passed proto's validation, but the encoder checks anyway) is
//!    dead-lettered.
//! 2. While the server answers, the lines are POSTed, in requests of at most the endpoint's
//!    count and byte limits. 2xx: done. A refusal of particular readings (InfluxDB's 400/422,
//!    the HTTP endpoint's 4xx) or 413: the request is split in halves until the reading the
//!    server refuses is alone; that reading is dead-lettered with the server's message and
//!    everything else is written (resending a reading that was already written is harmless:
//!    InfluxDB overwrites a point with itself, and an HTTP receiver dedups by the reading's
//!    identity and time, or by its `origin`).
//! 3. When the server is away (connection refused, timeout, 408, 429, 5xx) or refuses our
//!    settings (401, 403, 404, a redirect), the rest of the batch is appended to the spool and
//!    fsynced, and only then acknowledged upstream: from that moment the spool owns it. Later
//!    batches go straight to the spool until a retry succeeds.
//! 4. The spool is retried with exponential backoff and jitter, oldest batch first; once the
//!    server is back it drains in order, interleaved with the new batches, which are written
//!    directly again. A spooled batch leaves the spool only when the server has accepted it.
//!
//! The spool is the runtime's disk journal (CRC per record, torn-tail recovery, bounded with
//! the oldest dropped loudly), one record per batch. Nothing touches the disk while the server
//! is healthy.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::{DeadLetter, Measurement, Segment, Topic};
use runtime::Shutdown;
use runtime::backoff::{Backoff, Retries};
use runtime::bus::Bus;
use runtime::config::{JournalKind, StreamConfig};
use runtime::dead_letters::DeadLetterFile;
use runtime::delivery::AppendTimes;
use runtime::journal::{Journal, JournalError, Record};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::batch::Batch;
use crate::config::SpoolConfig;
use crate::events;
use crate::http::WriteOutcome;
use crate::round::{Failure, Outcome, Reaction, Round, Step};

/// Where a spooled output writes: each reading becomes one line, lines go out in requests.
pub trait Endpoint: Send + Sync + 'static {
    /// Its log lines, metrics and spool stream.
    const NAMES: events::OutputNames;
    /// Whether this output stores `m` at all (the HTTP output leaves services' statuses to
    /// InfluxDB).
    fn takes(&self, _m: &Measurement) -> bool {
        true
    }
    /// Append `m` to `out` as one line, without its newline (and with none inside it).
    fn encode(&self, m: &Measurement, out: &mut String) -> Result<(), String>;
    /// Most lines, and most bytes of lines, in one request.
    fn limits(&self) -> (usize, usize);
    /// Send `count` newline-terminated lines as one request.
    fn write(
        &self,
        lines: &str,
        count: usize,
    ) -> impl std::future::Future<Output = WriteOutcome> + Send;
    /// Where writes go, without credentials, for logs.
    fn endpoint(&self) -> String;

    /// Whether a refusal needs proof before a reading is dead-lettered, and a reading that
    /// keeps failing is looked for ([`crate::round`]). InfluxDB's refusals name the bad point
    /// (and a proxy's error page before it is told apart by the client); an arbitrary
    /// endpoint's may not.
    const CAUTIOUS: bool = false;

    /// How spooled lines are encoded, where a setting changes it (InfluxDB's `precision`):
    /// the spool keeps it, and refuses to start with another while it holds lines.
    fn spool_format(&self) -> Option<(&'static str, String)> {
        None
    }

    /// How long the last answer asked the writer to wait (`Retry-After` of a 429 or 503).
    fn retry_after(&self) -> Option<Duration> {
        None
    }
    /// Whether credentials go unencrypted to another machine (`http://` to a host that is
    /// not this one): said at start, once.
    fn credentials_in_clear(&self) -> bool {
        false
    }
}

/// Lines to write: one body, and where each line starts.
#[derive(Debug)]
pub struct Lines {
    body: String,
    /// `starts[i]..starts[i + 1]` is line `i` (with its newline); one more entry than lines.
    starts: Vec<usize>,
    /// The topic each line came from (empty for lines read back from the spool).
    topics: Vec<String>,
}

impl Default for Lines {
    /// No lines.
    fn default() -> Self {
        Self {
            body: String::new(),
            starts: vec![0],
            topics: Vec::new(),
        }
    }
}

impl Lines {
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

    /// Bytes of lines `r`.
    fn bytes(&self, r: &Range<usize>) -> usize {
        self.starts[r.end] - self.starts[r.start]
    }

    /// All lines as consecutive requests of at most `max_lines` lines and `max_bytes` bytes
    /// (a single longer line alone), in order.
    fn requests(&self, max_lines: usize, max_bytes: usize) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 0..self.len() {
            let r = start..i + 1;
            if i > start && (r.len() > max_lines.max(1) || self.bytes(&r) > max_bytes) {
                out.push(start..i);
                start = i;
            }
        }
        if start < self.len() {
            out.push(start..self.len());
        }
        out
    }
}

/// A point that will not be written, and why.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reason: String,
    /// Empty for a line read back from the spool.
    pub(crate) topic: String,
    pub(crate) line: String,
}

/// Points the server refused, published and kept in a file.
#[derive(Debug)]
pub struct DeadLetters {
    bus: Bus,
    topic: Topic<DeadLetter>,
    service: Segment,
    /// Shared with the file output, which keeps its unwritable readings in the same file.
    file: Arc<DeadLetterFile>,
}

impl DeadLetters {
    pub fn new(bus: &Bus, site: &Segment, service: &Segment, file: Arc<DeadLetterFile>) -> Self {
        Self {
            bus: bus.clone(),
            topic: Topic::dead_letter(site, service),
            service: service.clone(),
            file,
        }
    }

    /// Record a batch's refused points: one fsynced append to the file, one message each on
    /// the dead-letter topic, a few ERROR lines. `false` when the file could not take them:
    /// then the file is not their copy, and the batch must not be acknowledged (its producer
    /// replays it, and the points are refused and dead-lettered again).
    #[must_use]
    async fn send_all(&self, refused: Vec<Refusal>, events: &events::Output) -> bool {
        if refused.is_empty() {
            return true;
        }
        events.points_refused(&refused, self.file.path());
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
                events.dead_letter_file_failed(self.file.path(), &e);
                false
            }
        };
        for dl in &letters {
            if let Err(e) = self.bus.send(&self.topic, dl, false).await {
                events.dead_letter_unpublished(&e);
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
    /// The policy's longest wait: a server's `Retry-After` gets no more.
    max: Duration,
}

impl RetryWait {
    fn new(policy: Backoff) -> Self {
        Self {
            max: policy.max(),
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

    /// Wait at least `d` from now (the server asked for it), longer if the backoff says so,
    /// but never longer than the policy's longest wait (`retry_max_ms`): a server that asks
    /// for a quarter of an hour must not hold readings that long once it is back.
    fn at_least(&mut self, d: Duration) -> Duration {
        let until = Instant::now() + d.min(self.max);
        if self.until.is_none_or(|u| u < until) {
            self.until = Some(until);
        }
        self.until
            .map_or(d, |u| u.saturating_duration_since(Instant::now()))
    }

    /// Still inside the wait after a failure.
    fn waiting(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    WriteClient(#[from] crate::http::WriteClientError),
    #[error(transparent)]
    PostClient(#[from] crate::post::PostClientError),
    #[error("cannot open the spool: {0}")]
    Spool(#[from] JournalError),
    #[error(
        "the spool {dir} holds {records} batches written with {key} = {was:?}, but {key} is now \
         {now:?}: sent now they would be stored at the wrong time. Set {key} back until the \
         spool has drained (the log says \"drained\"), then change it"
    )]
    FormatChanged {
        dir: std::path::PathBuf,
        key: &'static str,
        was: String,
        now: String,
        records: u64,
    },
    #[error("cannot read or write the spool's format file {file}: {source}")]
    Format {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Failed rounds in a row (the endpoint answering 5xx) after which a cautious output splits a
/// failing request to find a reading the endpoint cannot process.
const BISECT_AFTER: u32 = 3;

/// A single line refused for good.
fn refusal(lines: &Lines, r: &Range<usize>, reason: String) -> Refusal {
    Refusal {
        reason,
        topic: lines.topics[r.start].clone(),
        line: lines.slice(r).to_string(),
    }
}

/// Most bytes read from the spool at once (about one segment).
const SPOOL_READ_BYTES: u64 = 4 << 20;

/// The InfluxDB output.
pub type InfluxSink = Sink<crate::http::WriteClient>;

/// The HTTP output.
pub type HttpSink = Sink<crate::post::PostClient>;

/// A spooled output's task.
#[derive(Debug)]
pub struct Sink<E> {
    client: E,
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
    dead: Arc<DeadLetters>,
    shutdown: Shutdown,
    events: events::Output,
    /// When the spool's records were appended, for its age gauge: the journal keeps no
    /// time per record (see docs/influx-writer.md, "The spool").
    appended: AppendTimes,
    down: Option<Failure>,
    /// Batches encoded but not yet written, while they wait for more to fill a request.
    pending: Pending,
    /// How long the first of them may wait (zero: write each batch as it comes).
    linger: Duration,
    /// Rounds in a row that ended in a failure (reset when the server takes a write).
    failed_rounds: u32,
}

/// Batches held for one write.
#[derive(Debug, Default)]
struct Pending {
    batches: Vec<Arc<Batch>>,
    lines: Lines,
    refused: Vec<Refusal>,
    since: Option<Instant>,
}

impl<E: Endpoint> Sink<E> {
    /// `retry` is the backoff after a failed write; `linger` how long batches may wait to
    /// fill a request.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        client: E,
        retry: Backoff,
        linger: Duration,
        spool_dir: &Path,
        spool: &SpoolConfig,
        batch_points: usize,
        dead: Arc<DeadLetters>,
        shutdown: Shutdown,
    ) -> Result<Self, SinkError> {
        let cfg = StreamConfig {
            journal: JournalKind::Disk,
            max_bytes: spool.max_bytes,
            segment_bytes: spool.segment_bytes,
            // Each append is fsynced by hand before the batch is acknowledged.
            fsync_interval_ms: 0,
            ..StreamConfig::default()
        };
        let (journal, report) = Journal::open(spool_dir, &cfg)?;
        runtime::events::journal_opened(E::NAMES.spool_stream, spool_dir, &report);
        if let Some((key, format)) = client.spool_format() {
            check_spool_format(spool_dir, key, &format, journal.records())?;
        }
        // Batches spooled before a restart count from when their segment was last written.
        let appended = AppendTimes::resumed(&journal);
        let mut sink = Self {
            client,
            spool: Some(journal),
            queue: VecDeque::new(),
            max_record: usize::try_from(spool.segment_bytes / 2).unwrap_or(usize::MAX),
            merge_lines: batch_points,
            backoff: RetryWait::new(retry),
            dead,
            shutdown,
            events: events::Output::new(E::NAMES),
            appended,
            down: None,
            pending: Pending::default(),
            linger,
            failed_rounds: 0,
        };
        sink.update_gauges();
        sink.events.opened(&sink.client.endpoint(), sink.spooled());
        if sink.client.credentials_in_clear() {
            sink.events.credentials_in_clear(&sink.client.endpoint());
        }
        Ok(sink)
    }

    pub fn spooled(&self) -> u64 {
        self.spool.as_ref().map_or(0, Journal::records)
    }

    fn update_gauges(&mut self) {
        if let Some(j) = &self.spool {
            let oldest = self
                .appended
                .oldest(j.first_held(), std::time::Instant::now());
            self.events.spool(j.records(), j.bytes(), oldest);
        }
    }

    /// Take batches until the channel closes; then save the spool's position.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Arc<Batch>>) {
        loop {
            let retry_at = self.backoff.until.unwrap_or_else(Instant::now);
            let drain = self.spooled() > 0 && !self.shutdown.is_requested();
            let lingering = self.pending.since.map(|t| t + self.linger);
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => self.handle(b).await,
                    None => break,
                },
                () = tokio::time::sleep_until(lingering.unwrap_or(retry_at)), if lingering.is_some() => self.flush().await,
                () = tokio::time::sleep_until(retry_at), if drain => self.drain_some().await,
                () = self.shutdown.wait(), if drain || lingering.is_some() => {
                    // Stopping: what waits is spooled now, within the grace period.
                    self.flush().await;
                }
            }
            // The oldest batch ages while InfluxDB stays away: its gauge moves with every
            // batch and retry, not only when the spool changes.
            self.update_gauges();
        }
        self.flush().await;
        if let Some(j) = &self.spool
            && let Err(e) = j.save_acked()
        {
            self.events.spool_position_unsaved(&e);
        }
    }

    /// Write what the spool holds until it is empty (or shutdown), then save its position:
    /// the spool of a replica slot nobody holds any more, taken over by another writer.
    /// `true` when the spool was emptied.
    pub async fn drain_all(mut self) -> bool {
        while self.spooled() > 0 && !self.shutdown.is_requested() {
            let retry_at = self.backoff.until.unwrap_or_else(Instant::now);
            tokio::select! {
                () = tokio::time::sleep_until(retry_at) => self.drain_some().await,
                () = self.shutdown.wait() => {}
            }
            self.update_gauges();
        }
        if let Some(j) = &self.spool
            && let Err(e) = j.save_acked()
        {
            self.events.spool_position_unsaved(&e);
        }
        self.spooled() == 0
    }

    /// Encode a batch into the pending write; write when it is full (or at once when the
    /// output does not linger).
    async fn handle(&mut self, batch: Arc<Batch>) {
        let p = &mut self.pending;
        for item in &batch.items {
            if !self.client.takes(&item.measurement) {
                continue;
            }
            match self.client.encode(&item.measurement, &mut p.lines.body) {
                Ok(()) => {
                    p.lines.body.push('\n');
                    p.lines.starts.push(p.lines.body.len());
                    p.lines.topics.push(item.topic.clone());
                }
                Err(reason) => {
                    // Nothing of a failed encoding stays in the body.
                    if let Some(end) = p.lines.starts.last() {
                        p.lines.body.truncate(*end);
                    }
                    p.refused.push(Refusal {
                        reason,
                        topic: item.topic.clone(),
                        line: serde_json::to_string(&item.measurement).unwrap_or_default(),
                    });
                }
            }
        }
        p.batches.push(batch);
        p.since.get_or_insert_with(Instant::now);
        let (max_lines, max_bytes) = self.client.limits();
        if self.linger.is_zero()
            || p.lines.len() >= max_lines
            || p.lines.body.len() >= max_bytes
            || self.shutdown.is_requested()
        {
            self.flush().await;
        }
    }

    /// Write the pending batches (or spool them), then acknowledge them.
    async fn flush(&mut self) {
        let Pending {
            batches,
            lines,
            mut refused,
            ..
        } = std::mem::take(&mut self.pending);
        if batches.is_empty() {
            return;
        }
        let result = if lines.is_empty() {
            Ok(())
        } else if self.backoff.waiting() || self.shutdown.is_requested() {
            // Known to be away, or stopping (a POST could outlast the grace period): spool.
            // Once the wait is over, the next batch is the probe — also when the spool is
            // empty because writing it failed.
            Err(std::iter::once(0..lines.len()).collect())
        } else {
            match self.deliver(&lines, lines.len(), &mut refused).await {
                Ok(kept) => {
                    self.came_back();
                    if !kept.is_empty() {
                        // A reading the endpoint fails on: the next round looks at it again.
                        self.failed_rounds = BISECT_AFTER;
                    }
                    if kept.is_empty() {
                        Ok(())
                    } else {
                        // Readings to try again (a suspect with a strike): to the spool, in
                        // order, without a backoff.
                        Err(kept.into_iter().rev().collect())
                    }
                }
                Err((rest, failure)) => {
                    self.went_down(failure);
                    Err(rest)
                }
            }
        };
        let kept = self.dead.send_all(refused, &self.events).await;
        let stored = match result {
            // Stored, except the refused points, which are in the dead-letter file.
            Ok(()) => kept,
            Err(rest) => {
                let mut body = String::new();
                let mut n = 0;
                // `rest` is a stack: the last entry is the next range in order.
                for r in rest.iter().rev() {
                    body.push_str(lines.slice(r));
                    n += r.len();
                }
                // Without `kept`, the batches are not acknowledged: the spooled lines are
                // written twice when the producers replay them (harmless).
                self.spool_append(&body, n).await && kept
            }
        };
        // Not stored: their only copy would be gone. Not acknowledged, so the producers keep
        // and replay them (what the server took is written again, harmlessly).
        if stored {
            for b in &batches {
                b.done();
            }
        }
    }

    /// Write `lines` in requests within the endpoint's limits: one [`Round`], whose rules
    /// (splitting, when a refusal is trusted, readings held on a 5xx) are in
    /// [`crate::round`]. Readings refused for good are put in `refused` (to be
    /// dead-lettered); `Ok(kept)` are the ranges to try again later (spooled, no backoff).
    /// On a failure that is not about particular readings, `Err` holds the ranges not yet
    /// written. A cautious round bisects once [`BISECT_AFTER`] rounds in a row have failed.
    async fn deliver(&mut self, lines: &Lines, own: usize, refused: &mut Vec<Refusal>) -> Outcome {
        let (max_lines, max_bytes) = self.client.limits();
        let mut round = Round::new(
            E::NAMES,
            lines.requests(max_lines, max_bytes),
            lines.len(),
            E::CAUTIOUS,
            self.failed_rounds >= BISECT_AFTER,
        );
        loop {
            let r = match round.next(self.shutdown.is_requested()) {
                Step::Write(r) => r,
                Step::Done(verdict) => {
                    // Lines from `own` on are a witness's (see `drain_some`): not judged here.
                    for (r, reason) in verdict.refused {
                        if r.start < own {
                            refused.push(refusal(lines, &r, reason));
                        }
                    }
                    for (r, reason) in &verdict.held {
                        if r.start < own {
                            self.events.reading_held(reason, lines.slice(r));
                        }
                    }
                    return verdict.result;
                }
            };
            let n = r.len();
            let outcome = tokio::select! {
                biased;
                o = self.client.write(lines.slice(&r), n) => o,
                () = self.shutdown.wait() => {
                    // Stopping while a request hangs: it is not waited for (the grace period
                    // is shorter than a request's timeout). Its lines are spooled with the
                    // rest and sent again after the restart.
                    round.abandon(r);
                    continue;
                }
            };
            match round.answer(r, &outcome) {
                Reaction::Taken => self.events.written(n),
                // A reading already counted, sent again.
                Reaction::Probe => {}
                Reaction::Failed => self.events.request_failed(),
                Reaction::Split => {
                    self.events.request_failed();
                    match &outcome {
                        WriteOutcome::Rejected(msg) => self.events.splitting_rejected(n, msg),
                        WriteOutcome::TooLarge => self.events.splitting_too_large(n),
                        WriteOutcome::ServerError(why) => self.events.splitting_failing(n, why),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Write the oldest spooled records (merged up to `merge_lines` lines) and trim them.
    async fn drain_some(&mut self) {
        if self.queue.is_empty() {
            if !self.refill().await {
                return;
            }
        } else {
            self.top_up().await;
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
        let head = Lines::parse(body.clone()).len();
        // The last round refused everything it was sent from the spool's head. That may be a
        // run of readings the endpoint refuses (too old for it, say) longer than a round:
        // the spool's newest record goes along, so the round has a reading to try beyond it
        // (see `round.rs`). It is only a witness here: it stays in the spool, and what
        // becomes of it in this round is left out.
        if E::CAUTIOUS
            && matches!(self.down, Some(Failure::Refused(_)))
            && let Some(witness) = self.newest_after(last_seq).await
        {
            body.push_str(&String::from_utf8_lossy(&witness));
            if !body.ends_with('\n') {
                body.push('\n');
            }
        }
        let lines = Lines::parse(body);
        let mut refused = Vec::new();
        let result = self.deliver(&lines, head, &mut refused).await;
        let result = match result {
            // A witness's readings to try again stay where they are, in the spool.
            Ok(again) => Ok(again
                .into_iter()
                .filter(|r| r.start < head)
                .collect::<Vec<_>>()),
            Err(e) => Err(e),
        };
        let kept = self.dead.send_all(refused, &self.events).await;
        match result {
            // The refused points could not be dead-lettered: the spool keeps them (and what
            // InfluxDB took), and they are tried again after a backoff.
            Ok(_) if !kept => self.went_down(Failure::Unavailable(
                "the dead-letter file cannot take the points the server refused".into(),
            )),
            Ok(again) => {
                // Readings to try again go to the spool's end before the drained records
                // leave it; if they cannot, nothing is trimmed (all is sent again).
                if !again.is_empty() {
                    let mut body = String::new();
                    let mut n = 0;
                    for r in &again {
                        body.push_str(lines.slice(r));
                        n += r.len();
                    }
                    if !self.spool_append(&body, n).await {
                        self.went_down(Failure::Unavailable(
                            "the spool cannot take the readings to try again".into(),
                        ));
                        return;
                    }
                }
                self.queue.drain(..taken);
                self.trim_spool(last_seq).await;
                self.came_back();
                if !again.is_empty() {
                    self.failed_rounds = BISECT_AFTER;
                }
                if self.spooled() == 0 {
                    self.events.spool_drained();
                }
            }
            Err((_, Failure::Stopping)) => {}
            Err((_, failure)) => self.went_down(failure),
        }
    }

    /// The spool's newest record, if it comes after `seq`.
    async fn newest_after(&mut self, seq: u64) -> Option<Vec<u8>> {
        let last = self.spool.as_ref()?.last_seq()?;
        if last <= seq {
            return None;
        }
        let spool = self.spool.take()?;
        let (spool, read) = blocking(spool, move |j| {
            j.read_after_within(last - 1, 1, SPOOL_READ_BYTES, |_| false)
        })
        .await;
        self.spool = Some(spool);
        match read {
            Ok(mut records) => records.pop().map(|r| r.payload),
            Err(e) => {
                self.events.spool_read_failed(&e);
                None
            }
        }
    }

    /// Add to a queue that holds less than a request's worth what the spool holds after it:
    /// a reading kept at the queue's head (one the endpoint fails on) is then sent with what
    /// came after it, and the endpoint taking those shows that it is up.
    async fn top_up(&mut self) {
        let queued: usize = self
            .queue
            .iter()
            .map(|r| r.payload.iter().filter(|b| **b == b'\n').count())
            .sum();
        let Some(after) = self.queue.back().map(|r| r.seq) else {
            return;
        };
        if queued >= self.merge_lines || self.spooled() <= self.queue.len() as u64 {
            return;
        }
        let Some(spool) = self.spool.take() else {
            return;
        };
        let (spool, read) = blocking(spool, move |j| {
            j.read_after_within(after, usize::MAX, SPOOL_READ_BYTES, |_| false)
        })
        .await;
        self.spool = Some(spool);
        match read {
            Ok(records) => self.queue.extend(records),
            Err(e) => self.events.spool_read_failed(&e),
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
                    self.events.spool_unreadable(lost);
                    self.trim_spool(last).await;
                }
                false
            }
            Err(e) => {
                self.events.spool_read_failed(&e);
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
            self.events.spool_trim_failed(&e);
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
            let mut first = None;
            for c in chunks {
                let (seq, d) = j.append("", c.as_bytes())?;
                first.get_or_insert(seq);
                dropped += d.map_or(0, |d| d.records);
            }
            if let Some((path, file)) = j.sync_handle()? {
                file.sync_data()
                    .map_err(|source| JournalError::Io { path, source })?;
            }
            Ok::<_, JournalError>((first, dropped))
        })
        .await;
        self.spool = Some(spool);
        match r {
            Ok((first, dropped)) => {
                if let Some(seq) = first {
                    self.appended.appended(seq, std::time::Instant::now());
                }
                self.events.spooled(points, dropped);
                self.update_gauges();
                true
            }
            Err(e) => {
                self.events.spool_write_failed(&e);
                false
            }
        }
    }

    fn went_down(&mut self, failure: Failure) {
        if failure == Failure::Stopping {
            return;
        }
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        let mut wait = self.backoff.fail();
        if let Failure::Unavailable(_) = &failure
            && let Some(asked) = self.client.retry_after()
        {
            // A 429 or 503 that says when to come back: no sooner (at most `retry_max_ms`).
            wait = self.backoff.at_least(asked);
        }
        let changed = self.down.as_ref() != Some(&failure);
        let retry_in_ms = wait.as_millis() as u64;
        match &failure {
            Failure::Refused(what) => self.events.refused(what, retry_in_ms),
            Failure::Unavailable(why) => {
                self.events
                    .unavailable(why, &self.client.endpoint(), retry_in_ms, changed)
            }
            Failure::Stopping => {}
        }
        self.down = Some(failure);
    }

    fn came_back(&mut self) {
        self.backoff.reset();
        self.failed_rounds = 0;
        if self.down.take().is_some() {
            self.events.came_back(self.spooled());
        }
    }
}

/// The spool's lines are encoded as `format` from now on. If it holds lines encoded otherwise
/// (the setting `key` changed while InfluxDB was away), sending them with the new setting
/// would store them wrong (milliseconds read as nanoseconds land in 1970): refused, naming
/// the setting and the way out.
fn check_spool_format(
    dir: &Path,
    key: &'static str,
    format: &str,
    records: u64,
) -> Result<(), SinkError> {
    // Beside the spool, not in it: the journal owns its directory.
    let file = dir.with_extension("format");
    let was = match std::fs::read_to_string(&file) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(SinkError::Format { file, source }),
    };
    match was {
        // Unchanged: nothing to write (no fsync at every start).
        Some(was) if was == format => return Ok(()),
        Some(was) if records > 0 => {
            return Err(SinkError::FormatChanged {
                dir: dir.to_path_buf(),
                key,
                was,
                now: format.to_string(),
                records,
            });
        }
        _ => {}
    }
    runtime::state::replace_file(&file, format!("{format}\n").as_bytes())
        .map_err(|source| SinkError::Format { file, source })
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
    fn a_spool_written_with_another_precision_is_refused_while_it_holds_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let key = "influx_writer.influx.precision";
        check_spool_format(&dir, key, "ms", 0).unwrap();
        check_spool_format(&dir, key, "ms", 12).unwrap();
        let e = check_spool_format(&dir, key, "ns", 12)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains("\"ms\"") && e.contains("\"ns\"") && e.contains("12"),
            "{e}"
        );
        // Drained: the new precision is taken, and kept from then on.
        check_spool_format(&dir, key, "ns", 0).unwrap();
        assert!(check_spool_format(&dir, key, "ms", 3).is_err());
    }

    #[test]
    fn spool_records_are_cut_at_line_ends() {
        let body = "aaaa\nbbbb\ncccc\n";
        assert_eq!(split_at_lines(body, 10), vec!["aaaa\nbbbb\n", "cccc\n"]);
        assert_eq!(split_at_lines(body, 3), vec!["aaaa\n", "bbbb\n", "cccc\n"]);
        assert_eq!(split_at_lines(body, 100), vec![body]);
        assert!(split_at_lines("", 10).is_empty());
    }

    /// InfluxDB away: a batch goes to the spool, which shows as the core journal gauges of
    /// stream `influx-spool`: its depth, and an age that grows while nothing else happens.
    /// (The only test of this binary that spools, so the process-wide gauges are its own.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spooled_batch_shows_in_the_core_journal_gauges_and_ages() {
        use crate::batch::Item;
        use crate::config::{Config, InfluxConfig, WriteApi};
        use runtime::telemetry::core::Core;

        let seg = |s: &str| Segment::new(s).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens there: every write is refused at once (connection refused).
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let plan = Config {
            influx: Some(InfluxConfig {
                url: format!("http://127.0.0.1:{closed}"),
                api: WriteApi::V1,
                database: Some("wattbus".into()),
                retry_min_ms: 50,
                retry_max_ms: 200,
                ..InfluxConfig::default()
            }),
            ..Config::default()
        }
        .resolve("influx_writer")
        .unwrap();
        let site = seg("spool-test");
        let service = seg("influx-writer");
        let bus_cfg = runtime::config::BusConfig {
            port: closed,
            ..runtime::config::BusConfig::default()
        };
        let identity = runtime::bus::Identity {
            service: service.clone(),
            instance: seg("influx-writer"),
        };
        let (bus, _bus_task) =
            Bus::connect(&bus_cfg, &site, &identity, &runtime::Health::default()).unwrap();
        let dead = Arc::new(DeadLetters::new(
            &bus,
            &site,
            &service,
            Arc::new(DeadLetterFile::new(dir.path().join("dead.jsonl"), 1 << 20)),
        ));
        let (trigger, shutdown) = runtime::shutdown::channel();
        let target = plan.target().unwrap();
        let sink: InfluxSink = Sink::open(
            crate::http::WriteClient::new(target).unwrap(),
            target.retry,
            Duration::ZERO,
            &dir.path().join("spool"),
            &plan.spool,
            100,
            dead,
            shutdown,
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(2);
        let task = tokio::spawn(sink.run(rx));

        let (records, oldest) = Core::of("influx-writer").journal(events::SPOOL_STREAM);
        let items = (0..3)
            .map(|i| Item {
                topic: format!("wattbus/v1/spool-test/meas/m-{i}/l1"),
                measurement: proto::Measurement {
                    origin: None,
                    site: site.clone(),
                    device: seg(&format!("m-{i}")),
                    channel: seg("l1"),
                    measurement: seg("power"),
                    ts_ms: 1_796_000_000_000,
                    quality: proto::Quality::Good,
                    fields: [("power_w".to_string(), 1.0)].into_iter().collect(),
                    tags: Default::default(),
                },
            })
            .collect();
        tx.send(Arc::new(Batch::new(items, Vec::new(), None, 1)))
            .await
            .unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !(records.get() == 1.0 && oldest.get() >= 1.0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "spool gauges: {} records, oldest {} s",
            records.get(),
            oldest.get()
        );
        drop(tx);
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
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
