//! The delivery contract: how a reading gets from the service that reads it to every sink that
//! stores it, through a broker that keeps nothing, without being lost.
//!
//! See docs/ARCHITECTURE.md for the whole contract and its invariants. In short:
//!
//! - A [`Producer`] numbers each message of a stream, appends it to its [`Journal`] and only
//!   then publishes it. When the journal cannot take a message (disk full), a device reader's
//!   [`Producer::send`] publishes it without a guarantee and counts it, and a processor's
//!   [`Producer::send_journaled`] waits for the journal, so its input stays unacknowledged.
//! - Sinks read through an [`Inbox`] and acknowledge with [`Acker::ack`] once a message is
//!   durably stored; acknowledgements are batched into ranges and published to
//!   `wattbus/v1/<site>/ack/<producer>/<stream>/<sink>`.
//! - The producer turns acknowledgements into a watermark per sink group (`acks`), trims the
//!   journal below the lowest one, and publishes again whatever a group has not acknowledged in
//!   time — after a reconnect, after its own restart, or when an acknowledgement is overdue.
//! - A processor (consumer and producer at once) acknowledges its input with
//!   [`Acker::ack_after_sync`] only once its output is journaled and fsynced, so the chain
//!   holds end to end.
//! - Sinks are idempotent, so everything here is *at least once*: a replayed message keeps its
//!   identity and timestamp, and storing it twice changes nothing.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{Ack, DeadLetter, Filter, Origin, Payload, Segment, Sequenced, Topic};
use rumqttc::QoS;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use crate::acks::{AckTracker, RangeSet};
use crate::bus::{Bus, BusError, Message, Overflow};
use crate::config::{InboxConfig, StreamConfig};
use crate::dead_letters::DeadLetterFile;
use crate::events;
use crate::health::ReadyFlag;
use crate::journal::{Journal, JournalError, Record};
use crate::shutdown::Shutdown;
use crate::telemetry::{Counter, Gauge};

/// Processor acknowledgements waiting for their output's fsync, at most.
const MAX_WAITING_FOR_SYNC: usize = 100_000;

/// After a reconnect, wait this long before replaying, so that sinks have reconnected and
/// subscribed too.
const RECONNECT_GRACE: Duration = Duration::from_secs(2);

/// How often [`Producer::send_journaled`] tries again while the journal refuses records. Nothing
/// announces that disk space came back; a second is soon enough and costs nothing.
const JOURNAL_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The journal could not take the message (disk full or failing): it has no delivery
    /// guarantee. Already logged (once per episode) and counted by the producer; a device
    /// reader goes on reading.
    #[error(
        "not journaled ({source}); {}",
        if *published { "published without a delivery guarantee" } else { "lost" }
    )]
    NotJournaled {
        #[source]
        source: JournalError,
        /// Handed to the broker without an origin: a sink that is up stores it (and cannot
        /// acknowledge it); nothing replays it.
        published: bool,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot encode: {0}")]
    Encode(#[from] proto::EncodeError),
    #[error("the producer has stopped")]
    Stopped,
}

impl DeliveryError {
    /// The journal refused the message: counted and logged by the producer already.
    pub fn is_not_journaled(&self) -> bool {
        matches!(self, DeliveryError::NotJournaled { .. })
    }
}

/// What [`Producer::send`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
}

struct State {
    journal: Journal,
    tracker: AckTracker,
    /// Highest seq appended (for fsync bookkeeping).
    appended: u64,
    /// When the journal was last fsynced.
    last_sync: Instant,
    /// Set while the journal refuses records: one ERROR when it starts, a WARN when it ends.
    outage: Option<Outage>,
    /// fsync is failing: one ERROR per episode, not one per interval.
    sync_failing: bool,
}

/// An episode of a journal refusing records.
struct Outage {
    since: Instant,
    /// Messages [`Producer::send`] could not journal, and how many of them it published anyway.
    unjournaled: u64,
    published: u64,
}

/// Why a message was not journaled.
enum Refused {
    /// The journal failed (disk full, I/O): an outage.
    Journal(JournalError),
    /// Anything else (the message cannot be encoded): that message's problem only.
    Other(DeliveryError),
}

struct Shared {
    state: Mutex<State>,
    bus: Bus,
    producer: Segment,
    stream: Segment,
    cfg: StreamConfig,
    synced_tx: watch::Sender<u64>,
    sent: Counter,
    deferred: Counter,
    unjournaled: Counter,
    journal_bytes: Gauge,
    journal_records: Gauge,
    /// Readiness check `journal:<producer>/<stream>`: false while the journal refuses records.
    ready: ReadyFlag,
    /// Ends a [`Producer::send_journaled`] waiting for the journal.
    shutdown: Shutdown,
}

/// The sending side of one stream. Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("producer", &self.shared.producer)
            .field("stream", &self.shared.stream)
            .finish()
    }
}

/// Where a stream's journal lives: `<data_dir>/journal/<producer>/<stream>`.
pub fn journal_dir(data_dir: &Path, producer: &Segment, stream: &Segment) -> PathBuf {
    data_dir
        .join("journal")
        .join(producer.as_str())
        .join(stream.as_str())
}

impl Producer {
    /// Open the stream's journal and start the task that handles acknowledgements, fsync and
    /// replay. The task ends on shutdown, after a final fsync.
    pub fn open(
        bus: &Bus,
        stream: &Segment,
        cfg: &StreamConfig,
        data_dir: &Path,
        shutdown: Shutdown,
    ) -> Result<(Producer, JoinHandle<()>), DeliveryError> {
        let producer = bus.client_id().clone();
        let dir = journal_dir(data_dir, &producer, stream);
        let (journal, report) = Journal::open(&dir, cfg)?;
        events::journal_opened(stream.as_str(), &dir, &report);
        let first = journal.ranges().first().map(|r| r[0]);
        let tracker = AckTracker::new(
            cfg.wait_for.iter().map(Segment::as_str),
            first,
            Duration::from_millis(cfg.ack_timeout_ms),
            Duration::from_millis(cfg.ack_timeout_max_ms),
        );
        let (p, st) = (producer.as_str().to_string(), stream.as_str().to_string());
        let labels: [(&'static str, &str); 2] = [("producer", &p), ("stream", &st)];
        let appended = journal.last_seq().unwrap_or(0);
        let held = (journal.bytes(), journal.records());
        let ready = bus.health().check(&format!(
            "journal:{}/{}",
            producer.as_str(),
            stream.as_str()
        ));
        ready.set(true);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                journal,
                tracker,
                appended,
                last_sync: Instant::now(),
                outage: None,
                sync_failing: false,
            }),
            bus: bus.clone(),
            producer,
            stream: stream.clone(),
            cfg: cfg.clone(),
            synced_tx: watch::channel(appended).0,
            deferred: Counter::new(
                "wattbus_deferred_messages_total",
                "Messages journaled but not published at once because the broker was unreachable (replayed later).",
                &labels,
            ),
            sent: Counter::new(
                "wattbus_produced_messages_total",
                "Messages journaled and published.",
                &labels,
            ),
            unjournaled: Counter::new(
                "wattbus_unjournaled_messages_total",
                "Messages the journal could not take (disk full or failing): published without a delivery guarantee if the broker was reachable, else lost.",
                &labels,
            ),
            journal_bytes: Gauge::new(
                "wattbus_journal_bytes",
                "Bytes held by the journal.",
                &labels,
            ),
            journal_records: Gauge::new(
                "wattbus_journal_records",
                "Records held by the journal (not yet acknowledged by every sink group).",
                &labels,
            ),
            ready,
            shutdown: shutdown.clone(),
        });
        // True from the start, not only after the first acknowledgement.
        shared.journal_bytes.set(held.0 as f64);
        shared.journal_records.set(held.1 as f64);
        let acks = bus.subscribe(
            Filter::<Ack>::acks_for(bus.site(), &shared.producer, stream)
                .as_str()
                .to_string(),
            QoS::AtLeastOnce,
            Overflow::Drop,
        );
        let task = tokio::spawn(drive(shared.clone(), acks, shutdown));
        Ok((Producer { shared }, task))
    }

    /// Number, journal and publish one message. Returns once it is journaled (and, with
    /// `fsync_interval_ms = 0`, fsynced) and queued for publishing.
    ///
    /// For device readers. When the journal cannot take it (disk full), the message is
    /// published without an origin — a sink that is up stores it without acknowledging, nothing
    /// replays it — and `Err(DeliveryError::NotJournaled)` says so; the producer has logged the
    /// episode (one ERROR, a WARN when it ends), counted the message and set its readiness check
    /// to not ready, so the caller only goes on reading. Each send tries the journal again, so
    /// production resumes by itself once space returns. A processor uses
    /// [`Producer::send_journaled`] instead.
    pub async fn send<T: Sequenced>(
        &self,
        topic: &Topic<T>,
        mut msg: T,
    ) -> Result<Sent, DeliveryError> {
        match self.shared.journal(topic.as_str(), &mut msg).await {
            Ok((seq, bytes)) => self.publish_journaled(topic.as_str(), seq, bytes).await,
            Err(Refused::Other(e)) => Err(e),
            Err(Refused::Journal(source)) => {
                // The best a reading that cannot be journaled can get: a sink that is up now
                // stores it. Without an origin, so no sink acknowledges a seq the journal never
                // held, and no reading is published twice under different identities.
                let published = match msg.encode().ok().and_then(|b| without_origin(&b)) {
                    Some(bytes) => {
                        self.shared
                            .bus
                            .publish_or_defer(topic.as_str(), bytes)
                            .await
                    }
                    None => false,
                };
                self.shared.unjournaled.inc();
                if let Some(o) = self.shared.state.lock().await.outage.as_mut() {
                    o.unjournaled += 1;
                    o.published += u64::from(published);
                }
                Err(DeliveryError::NotJournaled { source, published })
            }
        }
    }

    /// For processors: as [`Producer::send`], but a message the journal cannot take is neither
    /// published nor given up: this tries again every second until the journal takes it. The
    /// processor meanwhile takes no new input and acknowledges nothing, so its input stays in
    /// its producers' journals and is replayed if needed: the chain loses nothing (invariant 3).
    /// `Err(DeliveryError::Stopped)` if the producer's shutdown fires first — the message is
    /// then not journaled, and the caller must not acknowledge the input it came from.
    pub async fn send_journaled<T: Sequenced>(
        &self,
        topic: &Topic<T>,
        mut msg: T,
    ) -> Result<Sent, DeliveryError> {
        loop {
            match self.shared.journal(topic.as_str(), &mut msg).await {
                Ok((seq, bytes)) => {
                    return self.publish_journaled(topic.as_str(), seq, bytes).await;
                }
                Err(Refused::Other(e)) => return Err(e),
                Err(Refused::Journal(_)) => {
                    tokio::select! {
                        () = self.shared.shutdown.wait() => return Err(DeliveryError::Stopped),
                        () = tokio::time::sleep(JOURNAL_RETRY) => {}
                    }
                }
            }
        }
    }

    /// The rest of a send once the record is journaled: fsync if asked to, publish.
    async fn publish_journaled(
        &self,
        topic: &str,
        seq: u64,
        bytes: Vec<u8>,
    ) -> Result<Sent, DeliveryError> {
        let s = &self.shared;
        if s.cfg.fsync_interval_ms == 0 {
            // The record is journaled; a failed fsync is logged (once per episode) and keeps
            // the `synced` mark where it is, so no processor acknowledges on it. Publishing
            // it is still right.
            let _logged_by_sync = sync(s).await;
        }
        // Journaled is what counts from here on. If the broker is down (or rumqttc's queue is
        // stuck), the record waits in the journal and is published by replay once sinks are
        // overdue or the link is back; the caller goes back to reading its devices.
        let published = s.bus.publish_or_defer(topic, bytes).await;
        if published {
            s.sent.inc();
        } else {
            s.deferred.inc();
        }
        if s.tracker_is_empty() {
            // Nobody to wait for: handing the record to the broker is all the delivery there
            // will be, and a record the broker never got is gone (counted as deferred).
            let mut st = s.state.lock().await;
            st.journal.trim_through(seq)?;
            s.update_gauges(&st);
        }
        Ok(Sent { seq })
    }

    /// Fsync the journal now.
    pub async fn sync(&self) -> Result<(), DeliveryError> {
        sync(&self.shared).await
    }

    /// The highest seq known to be fsynced; a processor waits on it before acknowledging its
    /// input (see [`Acker::ack_after_sync`]).
    pub fn synced(&self) -> watch::Receiver<u64> {
        self.shared.synced_tx.subscribe()
    }

    /// Records held (not yet acknowledged by every group it waits for).
    pub async fn pending(&self) -> u64 {
        self.shared.state.lock().await.journal.records()
    }
}

impl Shared {
    fn tracker_is_empty(&self) -> bool {
        self.cfg.wait_for.is_empty()
    }

    /// Number, encode and append `msg`; the gauges follow. A journal failure starts (or
    /// continues) an outage, a success ends one.
    async fn journal<T: Sequenced>(
        &self,
        topic: &str,
        msg: &mut T,
    ) -> Result<(u64, Vec<u8>), Refused> {
        let mut st = self.state.lock().await;
        let seq = match st.journal.next_seq() {
            Ok(seq) => seq,
            Err(e) => return Err(self.refused(&mut st, e)),
        };
        msg.set_origin(Origin {
            producer: self.producer.clone(),
            stream: self.stream.clone(),
            seq,
        });
        let bytes = msg
            .encode()
            .map_err(|e| Refused::Other(DeliveryError::Encode(e)))?;
        let dropped = match st.journal.append_at(seq, topic, &bytes) {
            Ok(dropped) => dropped,
            Err(e) => return Err(self.refused(&mut st, e)),
        };
        if let Some(dropped) = dropped {
            events::journal_dropped(self.stream.as_str(), &dropped);
            let ranges = st.journal.ranges();
            st.tracker.journal_changed(&ranges);
        }
        st.appended = seq;
        st.tracker.published(Instant::now());
        if let Some(o) = st.outage.take() {
            events::journal_available_again(
                self.stream.as_str(),
                o.since.elapsed(),
                o.unjournaled,
                o.published,
            );
            self.ready.set(true);
        }
        self.update_gauges(&st);
        Ok((seq, bytes))
    }

    fn refused(&self, st: &mut State, e: JournalError) -> Refused {
        if st.outage.is_none() {
            events::journal_unavailable(self.stream.as_str(), &e);
            self.ready.set(false);
            st.outage = Some(Outage {
                since: Instant::now(),
                unjournaled: 0,
                published: 0,
            });
        }
        // A failed append is cut off again, but the file may have changed size meanwhile.
        self.update_gauges(st);
        Refused::Journal(e)
    }

    fn update_gauges(&self, st: &State) {
        self.journal_bytes.set(st.journal.bytes() as f64);
        self.journal_records.set(st.journal.records() as f64);
    }
}

async fn sync(s: &Shared) -> Result<(), DeliveryError> {
    let (handle, upto) = {
        let mut st = s.state.lock().await;
        st.last_sync = Instant::now();
        (st.journal.sync_handle(), st.appended)
    };
    let result = match handle {
        Ok(Some((path, file))) => {
            // fsync on an SD card can take tens of milliseconds: keep it off the async workers.
            match tokio::task::spawn_blocking(move || file.sync_data()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(JournalError::Io { path, source }.into()),
                Err(_) => Err(DeliveryError::Stopped),
            }
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e.into()),
    };
    {
        let mut st = s.state.lock().await;
        match (&result, st.sync_failing) {
            (Err(e), false) => {
                events::journal_sync_failed(s.stream.as_str(), e);
                st.sync_failing = true;
            }
            (Ok(()), true) => {
                events::journal_sync_recovered(s.stream.as_str());
                st.sync_failing = false;
            }
            _ => {}
        }
    }
    result?;
    s.synced_tx.send_if_modified(|v| {
        let grew = upto > *v;
        *v = (*v).max(upto);
        grew
    });
    Ok(())
}

async fn drive(s: Arc<Shared>, mut acks: mpsc::Receiver<Message>, shutdown: Shutdown) {
    let mut conn = s.bus.connection();
    let tick_ms = s.cfg.fsync_interval_ms.clamp(50, 500);
    let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let malformed = Counter::new(
        "wattbus_malformed_acks_total",
        "Acknowledgements that could not be decoded.",
        &[("stream", s.stream.as_str())],
    );
    {
        // Whatever the journal holds from before a restart is due once sinks are likely up.
        let mut st = s.state.lock().await;
        if st.journal.records() > 0 {
            st.tracker.published(Instant::now());
            st.tracker.reconnected(Instant::now(), RECONNECT_GRACE);
        }
        s.update_gauges(&st);
    }
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            Some(msg) = acks.recv() => {
                let Some(parsed) = proto::parse(&msg.topic) else { continue };
                let ack = match Ack::decode(&msg.payload) {
                    Ok(a) => a,
                    Err(e) => {
                        malformed.inc();
                        tracing::debug!(topic = msg.topic, error = %e, "Malformed acknowledgement ignored.");
                        continue;
                    }
                };
                // The topic names the sink; the payload repeats it. Trust the topic.
                let group = parsed.rest.get(2).map_or(ack.sink.as_str(), Segment::as_str).to_string();
                let mut st = s.state.lock().await;
                let ranges = st.journal.ranges();
                if st.tracker.ack(&group, &ack.ranges, &ranges, Instant::now())
                    && let Some(point) = st.tracker.trim_point()
                {
                    if let Err(e) = st.journal.trim_through(point) {
                        tracing::error!(error = %e, "Cannot trim the journal.");
                    }
                    s.update_gauges(&st);
                }
            }
            Ok(()) = conn.changed() => {
                let mut st = s.state.lock().await;
                st.tracker.reconnected(Instant::now(), RECONNECT_GRACE);
            }
            _ = tick.tick() => {
                let due_sync = {
                    let st = s.state.lock().await;
                    st.appended > *s.synced_tx.borrow()
                        && st.last_sync.elapsed() >= Duration::from_millis(s.cfg.fsync_interval_ms)
                };
                if due_sync && let Err(e) = sync(&s).await {
                    // Logged by `sync`, once per episode.
                    tracing::debug!(error = %e, "Journal fsync failed.");
                }
                if let Err(e) = replay_overdue(&s).await {
                    tracing::warn!(error = %e, "Replay failed; will try again.");
                }
            }
        }
    }
    if let Err(e) = sync(&s).await {
        tracing::error!(error = %e, "Final fsync of the journal failed.");
    }
    // A clean stop: remember what is acknowledged, so the next start replays only the rest.
    if let Err(e) = s.state.lock().await.journal.save_acked() {
        tracing::warn!(error = %e, "Cannot save the acknowledged point; the next start replays more than needed.");
    }
}

async fn replay_overdue(s: &Shared) -> Result<(), DeliveryError> {
    let batches: Vec<(String, u64, Duration, Vec<Record>)> = {
        let mut st = s.state.lock().await;
        let last = st.journal.last_seq();
        let now = Instant::now();
        let due = st.tracker.overdue(last, now);
        let mut out = Vec::new();
        for (group, after, acked) in due {
            let acked: RangeSet = acked;
            let records = st
                .journal
                .read_after(after, s.cfg.replay_batch, |seq| acked.contains(seq))?;
            out.push((
                group,
                after,
                Duration::from_millis(s.cfg.ack_timeout_ms),
                records,
            ));
        }
        out
    };
    for (group, after, waited, records) in batches {
        if records.is_empty() {
            continue;
        }
        events::replaying(s.stream.as_str(), &group, records.len(), after, waited);
        for r in records {
            if !s.bus.publish_or_defer(&r.topic, r.payload).await {
                // The link is down or stuck: the rest waits for the next round.
                break;
            }
        }
    }
    Ok(())
}

/// Identifies a received message for acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckToken {
    site: Segment,
    producer: Segment,
    stream: Segment,
    seq: u64,
}

/// One received message.
#[derive(Debug)]
pub struct Delivery<T> {
    pub topic: String,
    pub message: T,
    /// `None` for a message that did not come through a journal (no origin): store it, there
    /// is nobody to acknowledge.
    pub token: Option<AckToken>,
}

enum AckMsg {
    Now(AckToken),
    AfterSync(AckToken, watch::Receiver<u64>, u64),
}

/// Acknowledges received messages. Cheap to clone; a processor can hold it across tasks.
#[derive(Clone, Debug)]
pub struct Acker {
    tx: mpsc::UnboundedSender<AckMsg>,
}

impl std::fmt::Debug for AckMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckMsg::Now(t) => write!(f, "Now({t:?})"),
            AckMsg::AfterSync(t, _, seq) => write!(f, "AfterSync({t:?}, {seq})"),
        }
    }
}

impl Acker {
    /// The message is durably stored: acknowledge it (batched, published within
    /// `ack_interval_ms`).
    pub fn ack(&self, token: &AckToken) {
        // A closed channel means the flusher is gone at shutdown: the producer will replay.
        let _ = self.tx.send(AckMsg::Now(token.clone()));
    }

    /// For processors: acknowledge once `producer` has fsynced its own output `seq`.
    pub fn ack_after_sync(&self, token: &AckToken, producer: &Producer, seq: u64) {
        let _ = self
            .tx
            .send(AckMsg::AfterSync(token.clone(), producer.synced(), seq));
    }
}

/// The receiving side of a subscription, for sinks and processors.
pub struct Inbox<T> {
    rx: mpsc::Receiver<Message>,
    acker: Acker,
    bus: Bus,
    site: Segment,
    /// Where dead letters are kept besides the dead-letter topic, if the owner keeps a file.
    dead_letter_file: Option<Arc<DeadLetterFile>>,
    _payload: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Inbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("bus", &self.bus).finish()
    }
}

impl<T: Sequenced> Inbox<T> {
    /// Subscribe `filter` as sink group `sink` (the name producers list in `wait_for`). The
    /// returned task publishes acknowledgements and ends once the inbox and every [`Acker`]
    /// are dropped, after a last flush; await it before closing the bus.
    pub fn subscribe(
        bus: &Bus,
        filter: &Filter<T>,
        sink: &Segment,
        cfg: &InboxConfig,
    ) -> (Self, JoinHandle<()>) {
        let f = if cfg.shared {
            filter.shared(sink)
        } else {
            filter.as_str().to_string()
        };
        let rx = bus.subscribe(f, QoS::AtLeastOnce, Overflow::Wait);
        let (tx, ack_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(flush_acks(
            bus.clone(),
            sink.clone(),
            ack_rx,
            Duration::from_millis(cfg.ack_interval_ms.max(10)),
        ));
        let inbox = Inbox {
            rx,
            acker: Acker { tx },
            bus: bus.clone(),
            site: bus.site().clone(),
            dead_letter_file: None,
            _payload: PhantomData,
        };
        (inbox, task)
    }

    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// Also keep dead letters in `file` (fsynced before a dead-lettered message is
    /// acknowledged), for a person to find when nobody watched the dead-letter topic.
    pub fn keep_dead_letters(&mut self, file: Arc<DeadLetterFile>) {
        self.dead_letter_file = Some(file);
    }

    /// The next valid message. Malformed ones, and ones whose payload names another identity
    /// than their topic, go to the dead-letter topic (and file) and are skipped. `None` once
    /// the bus is closed.
    pub async fn recv(&mut self) -> Option<Delivery<T>> {
        loop {
            let msg = self.rx.recv().await?;
            match T::decode(&msg.payload) {
                Ok(message) => {
                    if let Err(reason) = message.check_topic(&msg.topic) {
                        self.mislabelled(&msg, reason, message.origin()).await;
                        continue;
                    }
                    let site =
                        proto::parse(&msg.topic).map_or_else(|| self.site.clone(), |p| p.site);
                    let token = message.origin().map(|o| AckToken {
                        site,
                        producer: o.producer.clone(),
                        stream: o.stream.clone(),
                        seq: o.seq,
                    });
                    return Some(Delivery {
                        topic: msg.topic,
                        message,
                        token,
                    });
                }
                Err(e) => {
                    // A journaled message (it has an origin) that we cannot read is answered
                    // with an acknowledgement once it is dead-lettered: unacknowledged, it would
                    // pin its producer's journal forever, be replayed every few minutes, and
                    // end with the journal full and good readings dropped.
                    let token = lenient_origin(&msg.payload).map(|o| AckToken {
                        site: proto::parse(&msg.topic)
                            .map_or_else(|| self.site.clone(), |p| p.site),
                        producer: o.producer,
                        stream: o.stream,
                        seq: o.seq,
                    });
                    events::malformed(self.bus.service().as_str(), &msg.topic, &e, token.is_some());
                    self.dead_letter(&msg, e.to_string(), token.as_ref()).await;
                }
            }
        }
    }

    /// A payload that names another site, device or channel than its topic is never handed
    /// to the sink: stored, it would be a reading under an identity the broker never let its
    /// publisher use (forged), or one a producer bug put on the wrong series. A journaled one
    /// is acknowledged once dead-lettered, like a malformed one (invariant 13).
    async fn mislabelled(&self, msg: &Message, reason: String, origin: Option<&Origin>) {
        let token = origin.map(|o| AckToken {
            site: proto::parse(&msg.topic).map_or_else(|| self.site.clone(), |p| p.site),
            producer: o.producer.clone(),
            stream: o.stream.clone(),
            seq: o.seq,
        });
        events::mislabelled(
            self.bus.service().as_str(),
            &msg.topic,
            &reason,
            token.is_some(),
        );
        self.dead_letter(msg, reason, token.as_ref()).await;
    }

    /// Keep `msg` for a person (the dead-letter file, if any, and topic), then acknowledge it
    /// if it came through a journal. Kept nowhere (no file, broker gone): not acknowledged,
    /// so its producer replays it and it is dead-lettered again later.
    async fn dead_letter(&self, msg: &Message, reason: String, token: Option<&AckToken>) {
        let dl = DeadLetter::new(self.bus.service().clone(), reason, &msg.topic, &msg.payload);
        let mut kept = false;
        if let Some(file) = self.dead_letter_file.clone() {
            let letter = dl.clone();
            let written = tokio::task::spawn_blocking(move || file.append(&[letter])).await;
            match written {
                Ok(Ok(())) => kept = true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "Cannot write the dead-letter file.");
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let topic = Topic::dead_letter(&self.site, self.bus.service());
        match self.bus.send(&topic, &dl, false).await {
            Ok(()) => kept = true,
            Err(e) => tracing::warn!(error = %e, "Could not publish a dead letter."),
        }
        if kept && let Some(t) = token {
            self.acker.ack(t);
        }
    }
}

/// `payload` (a JSON object) without its `origin`: for a message published although it could
/// not be journaled. `None` if it is not a JSON object (a future compact encoding): then it is
/// not published at all rather than published with the origin of a record that does not exist.
fn without_origin(payload: &[u8]) -> Option<Vec<u8>> {
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(payload).ok()?;
    value.remove("origin");
    serde_json::to_vec(&value).ok()
}

/// The origin of a payload that failed to decode as a whole, if it has a readable one.
fn lenient_origin(payload: &[u8]) -> Option<Origin> {
    #[derive(serde::Deserialize)]
    struct OnlyOrigin {
        origin: Origin,
    }
    serde_json::from_slice::<OnlyOrigin>(payload)
        .ok()
        .map(|o| o.origin)
}

type StreamKey = (Segment, Segment, Segment);

async fn flush_acks(
    bus: Bus,
    sink: Segment,
    mut rx: mpsc::UnboundedReceiver<AckMsg>,
    interval: Duration,
) {
    let mut ready: BTreeMap<StreamKey, RangeSet> = BTreeMap::new();
    let mut waiting: Vec<(AckToken, watch::Receiver<u64>, u64)> = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let closed = tokio::select! {
            msg = rx.recv() => match msg {
                Some(AckMsg::Now(t)) => { add(&mut ready, t); continue; }
                Some(AckMsg::AfterSync(t, synced, seq)) => {
                    if waiting.len() >= MAX_WAITING_FOR_SYNC {
                        // The output journal has not synced for a long while (failing disk?).
                        // Forgetting the oldest costs a replay of their input, not a reading.
                        waiting.remove(0);
                    }
                    waiting.push((t, synced, seq));
                    continue;
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        // Release processor acks whose output is on disk.
        waiting.retain(|(t, synced, seq)| {
            let on_disk = *synced.borrow() >= *seq;
            if on_disk {
                add(&mut ready, t.clone());
            }
            !on_disk
        });
        for ((site, producer, stream), set) in std::mem::take(&mut ready) {
            let topic = Topic::ack(&site, &producer, &stream, &sink);
            let ranges: Vec<[u64; 2]> = set.iter().collect();
            for chunk in ranges.chunks(proto::MAX_ACK_RANGES) {
                let ack = Ack {
                    sink: sink.clone(),
                    ranges: chunk.to_vec(),
                    ts_ms: proto::now_ms(),
                };
                if let Err(e) = bus.send(&topic, &ack, false).await {
                    // A lost acknowledgement costs a replay, never a reading.
                    tracing::debug!(error = %e, "Could not publish an acknowledgement.");
                }
            }
        }
        if closed {
            break;
        }
    }
}

fn add(ready: &mut BTreeMap<StreamKey, RangeSet>, t: AckToken) {
    ready
        .entry((t.site, t.producer, t.stream))
        .or_default()
        .insert(t.seq, t.seq);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Identity;
    use crate::config::BusConfig;
    use crate::health::Health;
    use proto::{Measurement, Quality};

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    /// A bus whose broker is down: connecting to a port nobody listens on.
    fn unreachable_bus(name: &str) -> (Bus, JoinHandle<()>) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = BusConfig {
            port,
            reconnect_min_ms: 50,
            reconnect_max_ms: 200,
            ..BusConfig::default()
        };
        Bus::connect(
            &cfg,
            &seg("home"),
            &Identity {
                service: seg("t"),
                instance: seg(name),
            },
            &Health::default(),
        )
        .unwrap()
    }

    fn reading(i: i64) -> Measurement {
        Measurement {
            origin: None,
            site: seg("home"),
            device: seg("d"),
            channel: seg("c"),
            measurement: seg("power"),
            ts_ms: 1_764_000_000_000 + i,
            quality: Quality::Good,
            fields: [("power_w".to_string(), i as f64)].into(),
            tags: Default::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_outage_does_not_stop_a_producer_from_journaling() {
        let (bus, _task) = unreachable_bus("p");
        let dir = tempfile::tempdir().unwrap();
        let cfg = StreamConfig {
            wait_for: vec![seg("influx")],
            ..StreamConfig::default()
        };
        let (producer, _t) =
            Producer::open(&bus, &seg("meas"), &cfg, dir.path(), Shutdown::never()).unwrap();
        let topic = Topic::measurement(&seg("home"), &seg("d"), &seg("c"));
        // Far more than rumqttc's request queue (1024) holds.
        for i in 0..3000 {
            let sent =
                tokio::time::timeout(Duration::from_secs(2), producer.send(&topic, reading(i)))
                    .await;
            assert!(
                matches!(sent, Ok(Ok(_))),
                "send #{i} blocked or failed during the outage"
            );
        }
        assert_eq!(
            producer.pending().await,
            3000,
            "every reading is kept for when the broker returns"
        );
    }

    #[tokio::test]
    async fn inbox_recv_ends_once_the_bus_is_closed() {
        let (bus, task) = unreachable_bus("s");
        let (mut inbox, acks) = Inbox::<Measurement>::subscribe(
            &bus,
            &Filter::measurements(None, None),
            &seg("sink"),
            &InboxConfig::default(),
        );
        bus.close(task).await;
        let got = tokio::time::timeout(Duration::from_secs(3), inbox.recv()).await;
        assert!(matches!(got, Ok(None)), "recv did not end after close");
        drop(inbox);
        tokio::time::timeout(Duration::from_secs(3), acks)
            .await
            .unwrap()
            .unwrap();
    }
}
