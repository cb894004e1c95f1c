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
//! - Every sink group registers (retained, on `wattbus/v1/<site>/sink/<group>`, by the bus of
//!   each [`Inbox`] owner) with the filters it consumes. A producer waits for the groups in its
//!   stream's `wait_for` and for every registered group whose filters overlap what the stream
//!   publishes; it keeps the learned ones beside its journal (`learned`). **With no group known
//!   nothing is trimmed**: a reading leaves the journal only once a sink has stored it.
//! - The producer turns acknowledgements into a watermark per sink group (`acks`), trims the
//!   journal below the lowest one, and publishes again whatever a group has not acknowledged in
//!   time — after a reconnect, after its own restart, or when an acknowledgement is overdue.
//!   An acknowledgement counts only if its payload names the group of its topic, it is not a
//!   retained message, the group is waited for, and for records this process published.
//! - A processor (consumer and producer at once) acknowledges its input with
//!   [`Acker::ack_after_sync`] only once its output is journaled and durable (fsynced, or
//!   stored by every sink group of its stream), so the chain holds end to end.
//! - Sinks are idempotent, so everything here is *at least once*: a replayed message keeps its
//!   identity and timestamp, and storing it twice changes nothing.

use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proto::{
    Ack, DeadLetter, Filter, Kind, Origin, Payload, Segment, Sequenced, SinkRegistration, Topic,
};
use rumqttc::QoS;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use crate::acks::{AckTracker, Due, Forgot, Handed, RangeSet};
use crate::bus::{Bus, BusError, Message, Overflow};
use crate::config::{InboxConfig, StreamConfig};
use crate::dead_letters::DeadLetterFile;
use crate::events::{self, AckRefusal};
use crate::health::ReadyFlag;
use crate::journal::{Journal, JournalError, Record};
use crate::learned;
use crate::shutdown::Shutdown;
use crate::telemetry::core::Core;
use crate::telemetry::{Counter, Gauge, LogLimit};

/// Processor acknowledgements waiting for their output to be durable (fsynced or stored), at
/// most.
const MAX_WAITING_FOR_SYNC: usize = 100_000;

/// After a reconnect, wait this long before replaying, so that sinks have reconnected and
/// subscribed too.
const RECONNECT_GRACE: Duration = Duration::from_secs(2);

/// How often [`Producer::send_journaled`] tries again while the journal refuses records. Nothing
/// announces that disk space came back; a second is soon enough and costs nothing.
const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// How long the first publish of a stream waits for the broker to confirm the stream's
/// acknowledgement subscription (once per process).
const ACKS_SUBSCRIBED_WAIT: Duration = Duration::from_secs(2);

/// How long a stream may hold readings for nobody, once connected, before it says so: the
/// retained registrations of running sinks arrive within moments of subscribing.
const NO_SINK_GRACE: Duration = Duration::from_secs(10);

/// At most one WARN per reason in this interval for refused acknowledgements and
/// registrations (all are counted).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    /// What this process handed to the broker: acknowledgements count only for those, and
    /// the round after a reconnect skips what the new connection already carried.
    handed: Handed,
    /// Highest seq appended (for fsync bookkeeping).
    appended: u64,
    /// Records appended and not yet fsynced, as groups `(first seq, when it was appended)`
    /// at least [`UNSYNCED_GROUP`] apart; a group runs to the next one's first seq. Only
    /// what is still unacknowledged when it is `fsync_interval_ms` old is fsynced.
    unsynced: VecDeque<(u64, Instant)>,
    /// When an fsync was last tried: a failing one is tried again once an interval, not every
    /// tick (a failing card is not worn harder).
    last_sync: Instant,
    /// Set while the journal refuses records: one ERROR when it starts, a WARN when it ends.
    outage: Option<Outage>,
    /// fsync is failing: one ERROR per episode, not one per interval.
    sync_failing: bool,
    /// When the records held were appended, roughly: the journal's age gauge.
    append_times: AppendTimes,
}

/// When records were appended, one mark per second at most: the age of the oldest record a
/// journal holds (`wattbus_journal_oldest_seconds`, at most a second too old) without a
/// timestamp per record. Public for journals kept outside a producer (influx-writer's spool).
#[derive(Debug, Default)]
pub struct AppendTimes {
    marks: VecDeque<(u64, Instant)>,
}

impl AppendTimes {
    /// For `journal` as opened: records it already holds count from when the segment file
    /// holding the oldest was last written (they are at least that old), or from now if that
    /// is not known (a memory journal). So a service that restarts while its records wait does
    /// not reset the age an alert watches.
    pub fn resumed(journal: &Journal) -> Self {
        let mut times = Self::default();
        if let Some(first) = journal.first_held() {
            let now = Instant::now();
            let since = journal
                .oldest_held_written()
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .and_then(|age| now.checked_sub(age))
                .unwrap_or(now);
            times.appended(first, since);
        }
        times
    }

    pub fn appended(&mut self, seq: u64, now: Instant) {
        if self
            .marks
            .back()
            .is_none_or(|(_, t)| now.saturating_duration_since(*t) >= Duration::from_secs(1))
        {
            self.marks.push_back((seq, now));
        }
    }

    /// The age of the oldest record held, `first`; marks of trimmed records are forgotten.
    pub fn oldest(&mut self, first: Option<u64>, now: Instant) -> Duration {
        let Some(first) = first else {
            self.marks.clear();
            return Duration::ZERO;
        };
        while self.marks.len() >= 2 && self.marks[1].0 <= first {
            self.marks.pop_front();
        }
        match self.marks.front() {
            Some((seq, t)) if *seq <= first => now.saturating_duration_since(*t),
            _ => Duration::ZERO,
        }
    }
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
    /// The filter of every topic the stream publishes: a registered group whose filters
    /// overlap it is waited for.
    publishes: String,
    /// The journal's directory, where the learned groups are kept.
    dir: PathBuf,
    /// The bus's connection count, to tell which connection a publish went out on.
    epoch: watch::Receiver<u64>,
    cfg: StreamConfig,
    synced_tx: watch::Sender<u64>,
    /// The service's core metrics (`sent`) and this stream's depth and age gauges.
    core: Core,
    deferred: Counter,
    /// fsyncs of the journal: each rewrites at least one page of the SD card.
    fsyncs: Counter,
    unjournaled: Counter,
    journal_bytes: Gauge,
    journal_records: Gauge,
    journal_oldest: Gauge,
    /// Readiness check `journal:<producer>/<stream>`: false while the journal refuses records.
    ready: ReadyFlag,
    /// Ends a [`Producer::send_journaled`] waiting for the journal.
    shutdown: Shutdown,
    /// The `sinks` file does not hold what the tracker learned (its write failed, or it was
    /// damaged and stand-ins took the damaged lines' place): written again on every tick
    /// until it does, so a restart does not forget a group.
    learned_unsaved: AtomicBool,
    /// The broker has confirmed the acknowledgement subscription (or the wait for it is over).
    acks_subscribed: AtomicBool,
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
    /// Open the stream's journal and start the task that handles acknowledgements, sink
    /// registrations, fsync and replay. The task ends on shutdown, after a final fsync.
    ///
    /// `publishes` covers every topic the stream will publish on (e.g.
    /// `Filter::measurements(Some(site), None)`): sink groups whose registered filters overlap
    /// it are waited for.
    pub fn open<T>(
        bus: &Bus,
        stream: &Segment,
        publishes: &Filter<T>,
        cfg: &StreamConfig,
        data_dir: &Path,
        shutdown: Shutdown,
    ) -> Result<(Producer, JoinHandle<()>), DeliveryError> {
        let producer = bus.client_id().clone();
        let dir = journal_dir(data_dir, &producer, stream);
        let (journal, report) = Journal::open(&dir, cfg)?;
        events::journal_opened(stream.as_str(), &dir, &report);
        // What the last run wrote and had not fsynced (it was killed) is counted as synced
        // below: make it so. A failure is logged; the records are still there to replay.
        if let Err(e) = journal.sync_newest() {
            tracing::warn!(error = %crate::telemetry::chain(&e), "Cannot fsync the journal's newest segment at start; a power cut soon could take what the last run wrote.");
        }
        let first = journal.ranges().first().map(|r| r[0]);
        let mut tracker = AckTracker::new(
            cfg.wait_for.iter().map(Segment::as_str),
            first,
            cfg.replay_backoff(),
        );
        let now = Instant::now();
        let (learned_groups, damaged) = load_learned(&dir);
        for group in learned_groups {
            tracker.learn(group.as_str(), first, now, RECONNECT_GRACE);
        }
        // Labelled like the core metrics: by service and stream (a service's instances are
        // its processes, which each serve their own /metrics).
        let labels: [(&'static str, &str); 2] = [
            ("service", bus.service().as_str()),
            ("stream", stream.as_str()),
        ];
        let appended = journal.last_seq().unwrap_or(0);
        let held = (journal.bytes(), journal.records());
        let append_times = AppendTimes::resumed(&journal);
        let core = Core::of(bus.service().as_str());
        let (journal_records, journal_oldest) = core.journal(stream.as_str());
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
                handed: Handed::default(),
                appended,
                unsynced: VecDeque::new(),
                last_sync: Instant::now(),
                outage: None,
                sync_failing: false,
                append_times,
            }),
            bus: bus.clone(),
            producer,
            stream: stream.clone(),
            publishes: publishes.as_str().to_string(),
            dir,
            learned_unsaved: AtomicBool::new(damaged),
            acks_subscribed: AtomicBool::new(false),
            epoch: bus.connection(),
            cfg: cfg.clone(),
            synced_tx: watch::channel(appended).0,
            fsyncs: Counter::new(
                "wattbus_journal_fsyncs_total",
                "fsyncs of the journal for records not stored by every sink group within fsync_interval_ms, checkpoints and stops (not those of closed segments and sequence reservations); each rewrites at least a page of the card.",
                &labels,
            ),
            deferred: Counter::new(
                "wattbus_deferred_messages_total",
                "Messages journaled but not published at once because the broker was unreachable (replayed later).",
                &labels,
            ),
            core,
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
            journal_records,
            journal_oldest,
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
        // Registrations are rare and come again on every connection; waiting for room (not
        // dropping) keeps one from being missed until the next reconnect.
        let registrations = bus.subscribe(
            Filter::<SinkRegistration>::sink_registrations(bus.site())
                .as_str()
                .to_string(),
            QoS::AtLeastOnce,
            Overflow::Wait,
        );
        let task = tokio::spawn(drive(shared.clone(), acks, registrations, shutdown));
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
        // overdue or the link is back; the caller goes back to reading its devices. Nothing is
        // trimmed here, whatever the connection: only a sink's acknowledgement trims.
        if !s.acks_subscribed.load(Ordering::Acquire) && s.bus.is_up() {
            // A record published before the broker has the acknowledgement subscription is
            // stored by its sinks, but their acknowledgements reach nobody: it would be
            // replayed (a WARN and a duplicate) although it arrived. A service that publishes
            // at once on start (node-health, plug-bridge) did so on every start. Waited for
            // once, and only while the link is up (a connected broker confirms at once); with
            // the broker away the record waits in the journal as always, and the caller goes
            // straight back to its devices.
            let _subscribed = s.bus.wait_subscribed(ACKS_SUBSCRIBED_WAIT).await;
            s.acks_subscribed.store(true, Ordering::Release);
        }
        let epoch = *s.epoch.borrow();
        let published = s.bus.publish_or_defer(topic, bytes).await;
        if published {
            s.core.sent.inc();
            s.state.lock().await.handed.record(seq, epoch);
        } else {
            s.deferred.inc();
        }
        Ok(Sent { seq })
    }

    /// Fsync the journal now.
    pub async fn sync(&self) -> Result<(), DeliveryError> {
        sync(&self.shared).await
    }

    /// Fsync the journal unless every record in it is fsynced already or stored by every
    /// sink group waited for (then it is durable where it was stored).
    pub async fn sync_unstored(&self) -> Result<(), DeliveryError> {
        let owed = {
            let st = self.shared.state.lock().await;
            *self.shared.synced_tx.borrow() < st.appended
        };
        if owed {
            sync(&self.shared).await
        } else {
            Ok(())
        }
    }

    /// The highest seq known to be durable: fsynced, or stored by every sink group waited
    /// for. A processor waits on it before acknowledging its input (see
    /// [`Acker::ack_after_sync`]).
    pub fn synced(&self) -> watch::Receiver<u64> {
        self.shared.synced_tx.subscribe()
    }

    /// Records held (not yet acknowledged by every group it waits for).
    pub async fn pending(&self) -> u64 {
        self.shared.state.lock().await.journal.records()
    }
}

impl Shared {
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
            epoch: Some(st.journal.epoch().clone()),
        });
        let bytes = msg
            .encode()
            .map_err(|e| Refused::Other(DeliveryError::Encode(e)))?;
        let dropped = match st.journal.append_at(seq, topic, &bytes) {
            Ok(dropped) => dropped,
            Err(e) => return Err(self.refused(&mut st, e)),
        };
        if let Some(dropped) = dropped {
            events::journal_dropped(self.core.service(), self.stream.as_str(), &dropped);
            let ranges = st.journal.ranges();
            st.tracker.journal_changed(&ranges);
        }
        st.appended = seq;
        let now = Instant::now();
        st.append_times.appended(seq, now);
        if st
            .unsynced
            .back()
            .is_none_or(|(_, t)| now.saturating_duration_since(*t) >= UNSYNCED_GROUP)
        {
            st.unsynced.push_back((seq, now));
            if st.unsynced.len() > MAX_UNSYNCED_GROUPS {
                // Only while fsyncs fail and nothing is stored: merge the second group into the
                // first, which keeps the older time (an fsync comes early, never late).
                st.unsynced.remove(1);
            }
        }
        st.tracker.published(now);
        if let Some(o) = st.outage.take() {
            events::journal_available_again(
                self.stream.as_str(),
                o.since.elapsed(),
                o.unjournaled,
                o.published,
            );
            self.ready.set(true);
        }
        self.update_gauges(&mut st);
        Ok((seq, bytes))
    }

    fn refused(&self, st: &mut State, e: JournalError) -> Refused {
        if st.outage.is_none() {
            events::journal_unavailable(self.core.service(), self.stream.as_str(), &e);
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

    fn update_gauges(&self, st: &mut State) {
        self.journal_bytes.set(st.journal.bytes() as f64);
        self.journal_records.set(st.journal.records() as f64);
        let first = st.journal.first_held();
        let oldest = st.append_times.oldest(first, Instant::now());
        self.journal_oldest.set(oldest.as_secs_f64().floor());
    }
}

async fn sync(s: &Shared) -> Result<(), DeliveryError> {
    let (handle, upto, memory) = {
        let mut st = s.state.lock().await;
        st.last_sync = Instant::now();
        (
            st.journal.sync_handle(),
            st.appended,
            st.journal.is_memory(),
        )
    };
    let result = match handle {
        Ok(Some((path, file))) => {
            // fsync on an SD card can take tens of milliseconds: keep it off the async workers.
            s.fsyncs.inc();
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
                events::journal_sync_failed(s.core.service(), s.stream.as_str(), e);
                st.sync_failing = true;
            }
            (Ok(()), true) => {
                events::journal_sync_recovered(s.stream.as_str());
                st.sync_failing = false;
            }
            _ => {}
        }
        if result.is_ok() {
            let appended = st.appended;
            forget_unsynced_through(&mut st.unsynced, appended, upto);
        }
    }
    result?;
    if !memory {
        // Nothing in memory is durable: `synced` moves only as sinks store (see `trim`).
        advance_synced(s, upto);
    }
    Ok(())
}

/// Raise `synced` to `durable` (it never goes down): processors waiting on it may acknowledge.
fn advance_synced(s: &Shared, durable: u64) {
    s.synced_tx.send_if_modified(|v| {
        let grew = durable > *v;
        *v = (*v).max(durable);
        grew
    });
}

/// The groups learned before, from the file beside the journal. What cannot be read is
/// logged and waited for as a stand-in group ([`learned::stand_in`]): a group forgotten to
/// damage would have its readings trimmed as soon as the others stored them.
///
/// Also whether the file needs writing again (stand-ins took damaged lines' place).
fn load_learned(dir: &Path) -> (Vec<Segment>, bool) {
    match learned::load(dir) {
        Ok(mut loaded) => {
            let stand_ins: Vec<Segment> = loaded
                .bad_lines
                .iter()
                .map(|n| learned::stand_in(Some(*n)))
                .collect();
            if !stand_ins.is_empty() {
                events::sinks_file_damaged(&learned::path(dir), &loaded.bad_lines, &stand_ins);
            }
            let damaged = !stand_ins.is_empty();
            for s in stand_ins {
                if !loaded.groups.contains(&s) {
                    loaded.groups.push(s);
                }
            }
            (loaded.groups, damaged)
        }
        Err(e) => {
            let stand_in = learned::stand_in(None);
            events::sinks_file_unreadable(&learned::path(dir), &e, &stand_in);
            (vec![stand_in], true)
        }
    }
}

async fn drive(
    s: Arc<Shared>,
    mut acks: mpsc::Receiver<Message>,
    mut registrations: mpsc::Receiver<Message>,
    shutdown: Shutdown,
) {
    let mut conn = s.bus.connection();
    let tick_ms = s.cfg.fsync_interval_ms.clamp(50, 500);
    let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let malformed = Counter::new(
        "wattbus_malformed_acks_total",
        "Acknowledgements that could not be decoded.",
        &[("stream", s.stream.as_str())],
    );
    let groups = Gauge::new(
        "wattbus_sink_groups",
        "Sink groups a stream waits for, configured and learned (0: nothing is trimmed).",
        &[
            ("producer", s.producer.as_str()),
            ("stream", s.stream.as_str()),
        ],
    );
    let limit = LogLimit::new(REFUSAL_LOG_INTERVAL);
    // Since the first connection: before it, no registration can have arrived.
    let mut connected_at: Option<Instant> = None;
    let mut warned_no_sink = false;
    {
        // Whatever the journal holds from before a restart is due once sinks are likely up.
        let mut st = s.state.lock().await;
        if st.journal.records() > 0 {
            st.tracker.published(Instant::now());
            st.tracker.reconnected(Instant::now(), RECONNECT_GRACE);
        }
        s.update_gauges(&mut st);
    }
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            Some(msg) = acks.recv() => on_ack(&s, &msg, &malformed, &limit).await,
            Some(msg) = registrations.recv() => on_registration(&s, &msg, &limit).await,
            Ok(()) = conn.changed() => {
                let epoch = *conn.borrow_and_update();
                let now = Instant::now();
                connected_at.get_or_insert(now);
                let mut st = s.state.lock().await;
                st.handed.connected(epoch);
                st.tracker.reconnected(now, RECONNECT_GRACE);
            }
            _ = tick.tick() => {
                let due_sync = {
                    let mut st = s.state.lock().await;
                    let synced = *s.synced_tx.borrow();
                    sync_due(&mut st, synced, Duration::from_millis(s.cfg.fsync_interval_ms))
                };
                if due_sync && let Err(e) = sync(&s).await {
                    // Logged by `sync`, once per episode.
                    tracing::debug!(error = %crate::telemetry::chain(&e), "Journal fsync failed.");
                }
                if let Err(e) = replay_overdue(&s).await {
                    tracing::warn!(error = %crate::telemetry::chain(&e), "Replay failed; will try again.");
                }
                if s.learned_unsaved.load(Ordering::Relaxed) {
                    let learned = {
                        let st = s.state.lock().await;
                        st.tracker.learned().map(str::to_string).collect::<Vec<_>>()
                    };
                    save_learned(&s, learned).await;
                }
                let mut st = s.state.lock().await;
                // The age gauge grows while nothing happens.
                s.update_gauges(&mut st);
                groups.set(st.tracker.len() as f64);
                if !st.tracker.is_empty() {
                    warned_no_sink = false;
                } else if !warned_no_sink
                    && connected_at.is_some_and(|t| t.elapsed() >= NO_SINK_GRACE)
                    && st.journal.records() > 0
                {
                    warned_no_sink = true;
                    events::no_sink_group(
                        s.producer.as_str(),
                        s.stream.as_str(),
                        st.journal.records(),
                        s.cfg.max_bytes,
                    );
                }
            }
        }
    }
    if let Err(e) = sync(&s).await {
        tracing::error!(error = %crate::telemetry::chain(&e), "Final fsync of the journal failed.");
    }
    // A clean stop: remember what is acknowledged, so the next start replays only the rest.
    if let Err(e) = s.state.lock().await.journal.save_acked() {
        tracing::warn!(error = %crate::telemetry::chain(&e), "Cannot save the acknowledged point; the next start replays more than needed.");
    }
}

/// Apply an acknowledgement, unless it is one no real sink of its group can have sent.
async fn on_ack(s: &Shared, msg: &Message, malformed: &Counter, limit: &LogLimit) {
    let stream = s.stream.as_str();
    let Some(group) = proto::parse(&msg.topic)
        .filter(|p| p.kind == Kind::Ack)
        .and_then(|p| p.rest.into_iter().nth(2))
    else {
        return;
    };
    if msg.retain {
        // Real sinks never retain acknowledgements; a retained one would be applied again on
        // every resubscription, to whatever records then carry those seqs.
        events::ack_refused(
            s.core.service(),
            stream,
            &msg.topic,
            AckRefusal::Retained,
            limit,
        );
        return;
    }
    let ack = match Ack::decode(&msg.payload) {
        Ok(a) => a,
        Err(e) => {
            malformed.inc();
            tracing::debug!(topic = msg.topic, error = %crate::telemetry::chain(&e), "Malformed acknowledgement ignored.");
            return;
        }
    };
    // With the broker's ACLs only the group's own user can publish on its topic; the payload
    // must agree with it.
    if ack.sink != group {
        events::ack_refused(
            s.core.service(),
            stream,
            &msg.topic,
            AckRefusal::SinkMismatch,
            limit,
        );
        return;
    }
    let mut st = s.state.lock().await;
    if !st.tracker.waits_for(group.as_str()) {
        events::ack_refused(
            s.core.service(),
            stream,
            &msg.topic,
            AckRefusal::NotWaitedFor,
            limit,
        );
        return;
    }
    let journal = st.journal.ranges();
    // A sink can only have stored what it received: seqs this process never published do not
    // count (deferred records during an outage, or anything a forger names).
    let published = st.handed.published(&ack.ranges);
    if overlap(&published, &journal) < overlap(&ack.ranges, &journal) {
        events::ack_refused(
            s.core.service(),
            stream,
            &msg.topic,
            AckRefusal::Unpublished,
            limit,
        );
    }
    if st
        .tracker
        .ack(group.as_str(), &published, &journal, Instant::now())
    {
        trim(s, &mut st);
    }
}

/// How many seqs two sorted lists of disjoint inclusive ranges share.
fn overlap(a: &[[u64; 2]], b: &[[u64; 2]]) -> u128 {
    let mut n = 0u128;
    for &[a0, a1] in a {
        for &[b0, b1] in b {
            let (lo, hi) = (a0.max(b0), a1.min(b1));
            if lo <= hi {
                n += u128::from(hi - lo) + 1;
            }
        }
    }
    n
}

/// Trim through the lowest watermark of the groups waited for (nothing without a group).
fn trim(s: &Shared, st: &mut State) {
    let Some(point) = st.tracker.trim_point() else {
        return;
    };
    if let Err(e) = st.journal.trim_through(point) {
        tracing::error!(error = %crate::telemetry::chain(&e), "Cannot trim the journal.");
    }
    st.handed.forget_through(point);
    // What every group has stored is as durable as an fsync would make it: a processor
    // waiting on `synced` may acknowledge its input for it (and no fsync is owed for it).
    advance_synced(s, point.min(st.appended));
    s.update_gauges(st);
}

/// Records appended within this long of each other share one entry in `State::unsynced`: a
/// fast producer keeps at most `fsync_interval_ms / UNSYNCED_GROUP` entries, and a record's
/// age is overstated by at most this much (so it is fsynced a little early, never late).
const UNSYNCED_GROUP: Duration = Duration::from_millis(10);

/// At most this many entries in `State::unsynced` (200 at the default interval; more only
/// while fsyncs fail and nothing is stored).
const MAX_UNSYNCED_GROUPS: usize = 1024;

/// Forget the groups of `unsynced` whose every record is `<= through` (`appended` is the
/// highest seq, where the last group ends).
fn forget_unsynced_through(unsynced: &mut VecDeque<(u64, Instant)>, appended: u64, through: u64) {
    while !unsynced.is_empty() {
        let end = unsynced
            .get(1)
            .map_or(appended, |(next, _)| next.saturating_sub(1));
        if end <= through {
            unsynced.pop_front();
        } else {
            break;
        }
    }
}

/// Whether the journal must be fsynced now: some record that is neither fsynced nor stored
/// by every sink group has waited `interval`. A record every group acknowledges sooner is
/// durable where it was stored, so in a healthy system this never fsyncs and the journal's
/// pages reach the card with the kernel's writeback (a killed process loses nothing either
/// way: every record is written to the kernel before it is published). A failing fsync is
/// tried again once an interval.
fn sync_due(st: &mut State, synced: u64, interval: Duration) -> bool {
    let stored = st.tracker.trim_point().unwrap_or(0);
    let appended = st.appended;
    // Records the journal no longer holds (stored, or dropped when it was full) are owed
    // nothing either.
    let gone = st
        .journal
        .first_held()
        .map_or(appended, |first| first.saturating_sub(1));
    forget_unsynced_through(&mut st.unsynced, appended, synced.max(stored).max(gone));
    if st.sync_failing && st.last_sync.elapsed() < interval {
        return false;
    }
    st.unsynced
        .front()
        .is_some_and(|(_, t)| t.elapsed() >= interval)
}

/// Learn or forget a sink group from its (retained) registration.
async fn on_registration(s: &Shared, msg: &Message, limit: &LogLimit) {
    let stream = s.stream.as_str();
    let Some(group) = proto::parse(&msg.topic)
        .filter(|p| p.kind == Kind::Sink)
        .and_then(|p| p.rest.into_iter().next())
    else {
        return;
    };
    // An empty retained message (how an MQTT client deletes one) withdraws the group like a
    // registration without filters does.
    let consumes = if msg.payload.is_empty() {
        false
    } else {
        match SinkRegistration::decode(&msg.payload) {
            Err(_) => {
                events::registration_refused(
                    s.core.service(),
                    stream,
                    &msg.topic,
                    "malformed",
                    limit,
                );
                return;
            }
            Ok(r) if r.group != group => {
                events::registration_refused(
                    s.core.service(),
                    stream,
                    &msg.topic,
                    "group_mismatch",
                    limit,
                );
                return;
            }
            Ok(r) => r
                .filters
                .iter()
                .any(|f| proto::filters_overlap(f, &s.publishes)),
        }
    };
    let (producer, name) = (s.producer.as_str(), group.as_str());
    let learned = {
        let mut st = s.state.lock().await;
        let changed = if consumes {
            let before = st.tracker.learned().any(|g| g == name);
            let first = st.journal.ranges().first().map(|r| r[0]);
            if st
                .tracker
                .learn(name, first, Instant::now(), RECONNECT_GRACE)
            {
                events::sink_group_changed(producer, stream, name, true, false);
            }
            !before
        } else {
            match st.tracker.forget(name) {
                Forgot::Forgotten => {
                    events::sink_group_changed(producer, stream, name, false, false);
                    // The slowest group may be gone: the rest may trim now.
                    trim(s, &mut st);
                    true
                }
                Forgot::Configured => {
                    events::sink_group_changed(producer, stream, name, false, true);
                    true
                }
                Forgot::Unknown => false,
            }
        };
        if !changed {
            return;
        }
        st.tracker.learned().map(str::to_string).collect::<Vec<_>>()
    };
    save_learned(s, learned).await;
}

/// Write `learned` to the `sinks` file. A failure is logged (once per episode) and leaves
/// `learned_unsaved` set, so that every tick tries again: registrations come again only on a
/// change, and a file that never caught up would forget the group at the next restart.
async fn save_learned(s: &Shared, learned: Vec<String>) {
    let dir = s.dir.clone();
    let saved = tokio::task::spawn_blocking(move || {
        learned::save(&dir, learned.iter().map(String::as_str))
    })
    .await;
    match saved {
        Ok(Ok(())) => {
            if s.learned_unsaved.swap(false, Ordering::Relaxed) {
                tracing::debug!("The learned sink groups are on disk again.");
            }
        }
        Ok(Err(e)) => {
            if !s.learned_unsaved.swap(true, Ordering::Relaxed) {
                events::sinks_file_failed(&learned::path(&s.dir), "write", &e);
            }
        }
        Err(_) => {
            s.learned_unsaved.store(true, Ordering::Relaxed);
            tracing::debug!("The task saving the learned sink groups did not finish.");
        }
    }
}

async fn replay_overdue(s: &Shared) -> Result<(), DeliveryError> {
    let batches: Vec<(Due, Vec<Record>)> = {
        let mut st = s.state.lock().await;
        let last = st.journal.last_seq();
        let due = st.tracker.overdue(last, Instant::now());
        let mut out = Vec::new();
        for d in due {
            let handed = &st.handed;
            // The first round after a reconnect leaves out what the new connection carried.
            let skip = |seq| d.acked.contains(seq) || (d.after_reconnect && handed.on_current(seq));
            let records = st.journal.read_after(d.after, s.cfg.replay_batch, skip)?;
            out.push((d, records));
        }
        out
    };
    for (due, records) in batches {
        if records.is_empty() {
            continue;
        }
        events::replaying(
            &s.core,
            s.producer.as_str(),
            s.stream.as_str(),
            &due.group,
            records.len(),
            due.after,
            due.waited,
        );
        let epoch = *s.epoch.borrow();
        let mut published = Vec::with_capacity(records.len());
        for r in records {
            if !s.bus.publish_or_defer(&r.topic, r.payload).await {
                // The link is down or stuck: the rest waits for the next round.
                break;
            }
            published.push(r.seq);
        }
        let mut st = s.state.lock().await;
        for seq in published {
            st.handed.record(seq, epoch);
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

    /// For processors: acknowledge once `producer`'s own output `seq` is durable: fsynced, or
    /// stored by every sink group its stream waits for.
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
    /// The service's `wattbus_messages_received_total`.
    received: Counter,
    _payload: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Inbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("bus", &self.bus).finish()
    }
}

impl<T: Sequenced> Inbox<T> {
    /// Subscribe `filter` as sink group `sink` and register the group (retained, on every
    /// connection: producers whose streams overlap `filter` then wait for this group's
    /// acknowledgements, and keep every reading until it has stored them). The returned task
    /// publishes acknowledgements and ends once the inbox and every [`Acker`] are dropped,
    /// after a last flush; await it before closing the bus.
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
        bus.register_sink(sink, filter.as_str());
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
            received: Core::of(bus.service().as_str()).received,
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
            self.received.inc();
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
                    let token = Origin::claimed(&msg.payload).map(|o| AckToken {
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
                    tracing::error!(error = %crate::telemetry::chain(&e), "Cannot write the dead-letter file; the message is not acknowledged, and its producer will send it again.");
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let topic = Topic::dead_letter(&self.site, self.bus.service());
        match self.bus.send(&topic, &dl, false).await {
            // Without a file, the topic is where a dead letter is kept. With one, the file
            // is its copy: published only (nobody may be subscribed), it is not kept, and the
            // message is not acknowledged.
            Ok(()) if self.dead_letter_file.is_none() => kept = true,
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %crate::telemetry::chain(&e), "Could not publish a dead letter.")
            }
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
                    tracing::debug!(error = %crate::telemetry::chain(&e), "Could not publish an acknowledgement.");
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

    /// Groups of unsynced records are forgotten only once every record in them is covered:
    /// one record of a group still owed keeps the group (and its age) in place.
    #[test]
    fn unsynced_groups_are_forgotten_only_when_wholly_covered() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(20);
        let t2 = t0 + Duration::from_millis(40);
        let groups = || VecDeque::from([(1, t0), (5, t1), (9, t2)]);
        let mut u = groups();
        forget_unsynced_through(&mut u, 12, 3);
        assert_eq!(u, groups(), "records 4 of the first group is still owed");
        forget_unsynced_through(&mut u, 12, 4);
        assert_eq!(u, VecDeque::from([(5, t1), (9, t2)]));
        forget_unsynced_through(&mut u, 12, 11);
        assert_eq!(u, VecDeque::from([(9, t2)]), "record 12 is still owed");
        forget_unsynced_through(&mut u, 12, 12);
        assert!(u.is_empty());
        let mut u = groups();
        forget_unsynced_through(&mut u, 12, 0);
        assert_eq!(u, groups());
    }

    /// Records a restarted service finds in its journal are as old as their segment file's
    /// last write, not as young as the restart: a watchdog restarting a service every few
    /// minutes must not keep resetting the age an alert watches. The age then grows from there
    /// and falls to 0 once everything is acknowledged.
    #[test]
    fn the_oldest_age_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StreamConfig {
            journal: crate::config::JournalKind::Disk,
            ..StreamConfig::default()
        };
        let (mut journal, _) = Journal::open(dir.path(), &cfg).unwrap();
        let (first, _) = journal.append("t", b"{}").unwrap();
        journal.append("t", b"{}").unwrap();
        drop(journal);
        // Written an hour ago, as far as the file system knows.
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "seg") {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(hour_ago)
                    .unwrap();
            }
        }
        let (mut journal, _) = Journal::open(dir.path(), &cfg).unwrap();
        let mut times = AppendTimes::resumed(&journal);
        let now = Instant::now();
        let age = times.oldest(journal.first_held(), now);
        assert!(
            (3595..3700).contains(&age.as_secs()),
            "a record written an hour ago aged {age:?}"
        );
        // Acknowledged and trimmed: nothing is held, nothing is old.
        journal.trim_through(first + 1).unwrap();
        assert_eq!(times.oldest(journal.first_held(), now), Duration::ZERO);

        // A memory journal keeps no file times: its records count from the start.
        let mem = StreamConfig {
            journal: crate::config::JournalKind::Memory,
            ..StreamConfig::default()
        };
        let (mut journal, _) = Journal::open(&dir.path().join("m"), &mem).unwrap();
        journal.append("t", b"{}").unwrap();
        let mut times = AppendTimes::resumed(&journal);
        assert!(times.oldest(journal.first_held(), Instant::now()) < Duration::from_secs(5));
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

    /// A `meas` stream of site `home` waiting for `influx`, journal of `kind` in `dir`.
    fn home_meas(
        bus: &Bus,
        kind: crate::config::JournalKind,
        dir: &Path,
    ) -> (Producer, JoinHandle<()>) {
        let cfg = StreamConfig {
            journal: kind,
            wait_for: vec![seg("influx")],
            ..StreamConfig::default()
        };
        Producer::open(
            bus,
            &seg("meas"),
            &Filter::measurements(Some(&seg("home")), None),
            &cfg,
            dir,
            Shutdown::never(),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_outage_does_not_stop_a_producer_from_journaling() {
        let (bus, _task) = unreachable_bus("p");
        let dir = tempfile::tempdir().unwrap();
        let (producer, _t) = home_meas(&bus, crate::config::JournalKind::Disk, dir.path());
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

    /// `synced` tells a processor its output is durable: an fsync of a disk journal moves
    /// it, an "fsync" of a memory journal must not (nothing there survives a restart, so
    /// only sinks storing the records may), and a failing disk journal must not either.
    #[tokio::test]
    async fn only_what_is_durable_counts_as_synced() {
        let (bus, _task) = unreachable_bus("p");
        let topic = Topic::measurement(&seg("home"), &seg("d"), &seg("c"));
        for (kind, durable) in [
            (crate::config::JournalKind::Disk, true),
            (crate::config::JournalKind::Memory, false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (producer, _t) = home_meas(&bus, kind, dir.path());
            let mut last = 0;
            for i in 0..3 {
                last = producer.send(&topic, reading(i)).await.unwrap().seq;
            }
            producer.sync().await.unwrap();
            let synced = *producer.synced().borrow();
            assert_eq!(
                synced == last,
                durable,
                "{kind:?}: synced {synced}, last {last}"
            );
            // Nothing is owed once fsynced, so a checkpoint's fsync is skipped.
            producer.sync_unstored().await.unwrap();
        }
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
