//! Every notable runtime event logs and counts here, in one place (like vector's
//! `internal_events`): the log line is for the person at the terminal, the counter for the
//! dashboard that notices at 3 a.m. that something is dropping.

use std::path::Path;
use std::time::Duration;

use crate::bus::BusError;
use crate::delivery::DeliveryError;
use crate::journal::{Damage, Dropped, JournalError, OpenReport};
use crate::telemetry::core::Core;
use crate::telemetry::{Counter, LogLimit, chain};

pub fn journal_opened(stream: &str, dir: &Path, report: &OpenReport) {
    if report.torn_segments > 0 {
        Counter::new(
            "wattbus_journal_recovered_segments_total",
            "Journal segments whose torn tail (the last record cut short by a crash) was cut on open.",
            &[("stream", stream)],
        )
        .add(report.torn_segments as u64);
        // Normal after a power cut or kill -9: WARN, not ERROR.
        tracing::warn!(
            stream,
            dir = %dir.display(),
            torn_segments = report.torn_segments,
            torn_bytes = report.torn_bytes,
            kept_records = report.records,
            "Journal had a torn tail (a crash or power cut mid-write); cut it off and kept every intact record."
        );
    }
    for d in &report.damaged {
        journal_damaged(stream, d);
    }
    for u in &report.untrusted {
        Counter::new(
            "wattbus_journal_corrupt_state_total",
            "Journal state files (seq, acked) found damaged or implausible on open and not trusted.",
            &[("stream", stream), ("file", u.file)],
        )
        .inc();
        tracing::error!(
            stream,
            file = %u.path.display(),
            reason = %u.reason,
            action = %u.action,
            "Journal state file is damaged or implausible and was not trusted; no reading was deleted because of it. A failing SD card?"
        );
    }
    tracing::debug!(stream, dir = %dir.display(), records = report.records, "Journal opened.");
}

fn journal_damaged(stream: &str, d: &Damage) {
    Counter::new(
        "wattbus_journal_damaged_regions_total",
        "Damaged byte ranges found in journal segments on open (skipped; copied to the journal's corrupted/ folder).",
        &[("stream", stream)],
    )
    .inc();
    let lost = d.lost_seqs.map(|[a, b]| format!("{a}-{b}"));
    match &d.saved_to {
        Some(saved) => tracing::error!(
            stream,
            segment = %d.segment.display(),
            offset = d.offset,
            bytes = d.bytes,
            whole_segment = d.whole_segment,
            lost_seqs = lost.as_deref().unwrap_or("unknown"),
            saved_to = %saved.display(),
            "Journal segment is damaged (bit rot or a failing card?): kept every intact record and moved the damaged bytes aside for inspection; readings in them are lost."
        ),
        None => tracing::error!(
            stream,
            segment = %d.segment.display(),
            offset = d.offset,
            bytes = d.bytes,
            whole_segment = d.whole_segment,
            lost_seqs = lost.as_deref().unwrap_or("unknown"),
            error = d.error.as_deref().unwrap_or(""),
            "Journal segment is damaged and its damaged bytes could not be moved aside; they stay in the segment and are skipped. Is the disk full or read-only?"
        ),
    }
}

/// The journal refused a record (disk full, I/O error): once per episode.
pub fn journal_unavailable(service: &str, stream: &str, error: &JournalError) {
    Core::of(service).error("journal").inc();
    tracing::error!(
        stream,
        error = %chain(error),
        "Cannot journal readings: is the data disk full or failing? Until it can, readings are published without a delivery guarantee (lost if no sink is up), counted in wattbus_unjournaled_messages_total, and /healthz reports not ready. Retrying with every reading."
    );
}

/// The journal takes records again after an episode.
pub fn journal_available_again(stream: &str, lasted: Duration, unjournaled: u64, published: u64) {
    tracing::warn!(
        stream,
        lasted_s = lasted.as_secs(),
        unjournaled,
        published_without_guarantee = published,
        "Journaling again; readings taken meanwhile could not be journaled (those published without a guarantee were stored only if a sink was up)."
    );
}

/// fsync of the journal failed: once per episode (it is tried again every interval).
pub fn journal_sync_failed(service: &str, stream: &str, error: &dyn std::error::Error) {
    Core::of(service).error("journal").inc();
    tracing::error!(
        stream,
        error = %chain(error),
        "Cannot fsync the journal; readings are at risk on a power cut. Retrying."
    );
}

pub fn journal_sync_recovered(stream: &str) {
    tracing::warn!(stream, "The journal can be fsynced again.");
}

pub fn journal_dropped(service: &str, stream: &str, d: &Dropped) {
    Core::of(service).error("journal_dropped").inc();
    Counter::new(
        "wattbus_journal_dropped_records_total",
        "Records dropped unacknowledged because the journal was full.",
        &[("stream", stream)],
    )
    .add(d.records);
    tracing::error!(
        stream,
        records = d.records,
        first_seq = d.first_seq,
        last_seq = d.last_seq,
        "Journal full: dropped the oldest unacknowledged records. Readings are lost; is a sink down, or is max_bytes too small?"
    );
}

/// `waited` is how long the group has kept records waiting without acknowledging any.
pub fn replaying(
    core: &Core,
    producer: &str,
    stream: &str,
    group: &str,
    records: usize,
    after: u64,
    waited: Duration,
) {
    core.replayed(stream, group).add(records as u64);
    tracing::warn!(
        producer,
        stream,
        sink = group,
        records,
        after_seq = after,
        waited_s = waited.as_secs(),
        "No acknowledgement in time; publishing unacknowledged records again."
    );
}

/// Why an acknowledgement was not applied (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckRefusal {
    /// The payload names another sink group than the topic.
    SinkMismatch,
    /// Delivered as a retained message: real sinks never retain acknowledgements, so it is
    /// stale or forged, and it would be applied again on every resubscription.
    Retained,
    /// From a group this stream does not wait for.
    NotWaitedFor,
    /// It covers journaled records this process never published (a sink cannot have stored
    /// them); those seqs are left out, the rest applies. Also a late acknowledgement of a
    /// record published before a restart, which is replayed and acknowledged again.
    Unpublished,
}

impl AckRefusal {
    pub const fn as_str(self) -> &'static str {
        match self {
            AckRefusal::SinkMismatch => "sink_mismatch",
            AckRefusal::Retained => "retained",
            AckRefusal::NotWaitedFor => "not_waited_for",
            AckRefusal::Unpublished => "unpublished",
        }
    }
}

pub fn ack_refused(service: &str, stream: &str, topic: &str, reason: AckRefusal, limit: &LogLimit) {
    Counter::new(
        "wattbus_refused_acks_total",
        "Acknowledgements (or parts of them) not applied: forged, stale, or from a group this stream does not wait for.",
        &[("stream", stream), ("reason", reason.as_str())],
    )
    .inc();
    let reason_str = reason.as_str();
    match reason {
        AckRefusal::SinkMismatch | AckRefusal::Retained => {
            Core::of(service).error("refused_ack").inc();
            if let Some(suppressed) = limit.allow_key(reason_str) {
                tracing::warn!(
                    stream,
                    topic,
                    reason = reason_str,
                    suppressed,
                    "Refused an acknowledgement that no sink of that group can have sent (forged or stale); nothing was trimmed for it."
                );
            }
        }
        AckRefusal::NotWaitedFor | AckRefusal::Unpublished => {
            tracing::debug!(
                stream,
                topic,
                reason = reason_str,
                "Acknowledgement not applied."
            );
        }
    }
}

pub fn registration_refused(
    service: &str,
    stream: &str,
    topic: &str,
    reason: &'static str,
    limit: &LogLimit,
) {
    Core::of(service).error("refused_registration").inc();
    Counter::new(
        "wattbus_refused_registrations_total",
        "Sink registrations ignored because they were malformed or named another group than their topic.",
        &[("stream", stream), ("reason", reason)],
    )
    .inc();
    if let Some(suppressed) = limit.allow_key(reason) {
        tracing::warn!(
            stream,
            topic,
            reason,
            suppressed,
            "Ignored a sink registration; this stream's groups are unchanged."
        );
    }
}

/// A stream learned to wait for `group` (`learned`), or stopped (`!learned`).
pub fn sink_group_changed(
    producer: &str,
    stream: &str,
    group: &str,
    learned: bool,
    configured: bool,
) {
    Counter::new(
        "wattbus_sink_group_changes_total",
        "Sink groups a stream learned from a registration, or forgot on a withdrawal.",
        &[
            ("stream", stream),
            ("change", if learned { "learned" } else { "forgotten" }),
        ],
    )
    .inc();
    if learned {
        tracing::info!(
            producer,
            stream,
            sink = group,
            "A sink group registered for this stream; its readings are kept until it has stored them too."
        );
    } else if configured {
        tracing::info!(
            producer,
            stream,
            sink = group,
            "A sink group withdrew its registration for this stream; still waiting for it, as wait_for lists it."
        );
    } else {
        tracing::info!(
            producer,
            stream,
            sink = group,
            "A sink group withdrew its registration for this stream; its acknowledgements no longer hold readings back."
        );
    }
}

pub fn no_sink_group(producer: &str, stream: &str, held: u64, max_bytes: u64) {
    tracing::warn!(
        producer,
        stream,
        held_records = held,
        max_bytes,
        "No sink group has registered for this stream; its readings are held until one does (up to max_bytes)."
    );
}

fn sinks_file_error() {
    Counter::new(
        "wattbus_sinks_file_errors_total",
        "Learned sink group files that were damaged, or could not be read or written.",
        &[],
    )
    .inc();
}

pub fn sinks_file_damaged(path: &Path, bad_lines: &[usize], stand_ins: &[proto::Segment]) {
    sinks_file_error();
    let names: Vec<&str> = stand_ins.iter().map(proto::Segment::as_str).collect();
    tracing::error!(
        file = %path.display(),
        ?bad_lines,
        stand_ins = ?names,
        "The learned sink groups file is damaged; kept its valid lines. Which group a damaged line named is lost, so this stream waits for a stand-in in its place and trims nothing it holds for it: once every sink group has registered again (`wattbus sinks list`), withdraw the stand-in with `wattbus sinks forget <stand-in>`."
    );
}

pub fn sinks_file_unreadable(path: &Path, error: &std::io::Error, stand_in: &proto::Segment) {
    sinks_file_error();
    tracing::error!(
        file = %path.display(),
        error = %error,
        stand_in = stand_in.as_str(),
        "Cannot read the learned sink groups file. This stream waits for a stand-in group and trims nothing it holds for it: check the disk, and once every sink group has registered again (`wattbus sinks list`), withdraw it with `wattbus sinks forget {}`.",
        stand_in
    );
}

pub fn sinks_file_failed(path: &Path, action: &str, error: &std::io::Error) {
    sinks_file_error();
    tracing::error!(
        file = %path.display(),
        action,
        error = %error,
        "Cannot keep the learned sink groups on disk; after a restart they are known again only once their registrations arrive. Check the disk."
    );
}

pub fn bus_connected(client_id: &str, reconnect: bool) {
    if reconnect {
        Counter::new(
            "wattbus_bus_reconnects_total",
            "Reconnections to the broker.",
            &[("client", client_id)],
        )
        .inc();
        tracing::info!(client_id, "Reconnected to the broker.");
    } else {
        tracing::debug!(client_id, "Connected to the broker.");
    }
}

pub fn bus_error(
    service: &str,
    client_id: &str,
    error: &dyn std::error::Error,
    retry_in: Duration,
    first: bool,
) {
    Core::of(service).error("bus").inc();
    Counter::new(
        "wattbus_bus_errors_total",
        "Broker connection errors.",
        &[("client", client_id)],
    )
    .inc();
    let hint = "if this persists, check [bus] host, port, username and password";
    if first {
        tracing::warn!(client_id, error = %chain(error), retry_in_ms = retry_in.as_millis() as u64, hint, "Broker connection lost or refused; retrying.");
    } else {
        tracing::debug!(client_id, error = %chain(error), retry_in_ms = retry_in.as_millis() as u64, "Still cannot reach the broker.");
    }
}

/// A refused publish or subscription comes back after every reconnect, a few times a second:
/// log it once per client in this interval (the counters count every one).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

static REFUSED_SUBSCRIPTION_LOG: LogLimit = LogLimit::new(REFUSAL_LOG_INTERVAL);
static DISCONNECTED_LOG: LogLimit = LogLimit::new(REFUSAL_LOG_INTERVAL);

/// The broker answered a SUBSCRIBE with a failure code: this service will not get that input.
/// With wattbus's broker that is its ACL (the service's user and role do not allow the filter)
/// or a filter limit.
pub fn subscription_refused(
    service: &str,
    client_id: &str,
    filter: Option<&str>,
    pkid: u16,
    retry_in: Option<Duration>,
) {
    Counter::new(
        "wattbus_bus_subscriptions_refused_total",
        "Subscriptions the broker refused (SUBACK failure): this service does not get that input.",
        &[("client", client_id)],
    )
    .inc();
    Core::of(service).error("subscription_refused").inc();
    let filter = filter.unwrap_or("(unknown)");
    if REFUSED_SUBSCRIPTION_LOG.allow_key(client_id).is_none() {
        return;
    }
    let retry_in_s = retry_in.map(|d| d.as_secs());
    tracing::error!(
        client_id,
        filter,
        pkid,
        retry_in_s,
        "The broker refused the subscription to {filter}; this service gets none of that input \
         and is not ready until it is subscribed (asked for again after retry_in_s). Either \
         this service's broker user may not subscribe it ([bus] username; [[broker.users]] \
         role), or the broker's filter limits are full (its log says which: \
         broker.max_filters)."
    );
}

/// The broker disconnected this service on purpose (MQTT DISCONNECT). rumqttd does that when
/// it refuses a publish: then `last_publish` (topic, how long ago) is most likely the topic its
/// ACL refused. The service reconnects and, if it publishes there again, is disconnected again.
pub fn disconnected_by_broker(
    service: &str,
    client_id: &str,
    last_publish: Option<(&str, Duration)>,
) {
    Core::of(service).error("refused_publish").inc();
    Counter::new(
        "wattbus_bus_disconnected_by_broker_total",
        "Times the broker closed this service's connection on purpose (a refused publish).",
        &[("client", client_id)],
    )
    .inc();
    if DISCONNECTED_LOG.allow_key(client_id).is_none() {
        return;
    }
    match last_publish {
        Some((topic, ago)) => tracing::error!(
            client_id,
            topic,
            published_ms_ago = ago.as_millis() as u64,
            "The broker closed the connection right after a publish to {topic}: its ACL most \
             likely refuses that topic to this service; check this service's broker user and \
             role ([bus] username; [[broker.users]] role and devices)."
        ),
        None => tracing::error!(
            client_id,
            "The broker closed the connection on purpose; check this service's broker user and \
             role ([bus] username; [[broker.users]] role)."
        ),
    }
}

pub fn route_overflow(service: &str, filter: &str) {
    Core::of(service).error("overflow").inc();
    Counter::new("wattbus_bus_dropped_messages_total", "Incoming messages dropped because the consumer did not keep up (the delivery contract replays them).", &[("filter", filter)])
        .inc();
    tracing::warn!(
        filter,
        "Consumer is not keeping up; dropped an incoming message (it will be replayed by its producer)."
    );
}

/// Bad incoming messages are logged at most once a minute per kind.
const BAD_MESSAGE_LOG_EVERY: Duration = Duration::from_secs(60);

pub fn malformed(service: &str, topic: &str, error: &dyn std::error::Error, journaled: bool) {
    static LOG: LogLimit = LogLimit::new(BAD_MESSAGE_LOG_EVERY);
    Counter::new(
        "wattbus_malformed_messages_total",
        "Incoming messages that could not be decoded (sent to the dead-letter topic).",
        &[("service", service)],
    )
    .inc();
    let core = Core::of(service);
    core.error("malformed").inc();
    core.dead_letters.inc();
    let Some(unlogged) = LOG.allow() else {
        return;
    };
    if journaled {
        // It came through a producer's journal: a reading that this sink will not store.
        tracing::error!(service, topic, error = %chain(error), unlogged, "A journaled message cannot be read (a newer producer?); sent to the dead-letter topic and acknowledged, not stored.");
    } else {
        tracing::warn!(service, topic, error = %chain(error), unlogged, "Malformed message; sent to the dead-letter topic.");
    }
}

pub fn mislabelled(service: &str, topic: &str, reason: &str, journaled: bool) {
    static LOG: LogLimit = LogLimit::new(BAD_MESSAGE_LOG_EVERY);
    Counter::new(
        "wattbus_mislabelled_messages_total",
        "Incoming messages whose payload names another site, device or channel than their topic (dead-lettered, never stored).",
        &[("service", service)],
    )
    .inc();
    let core = Core::of(service);
    core.error("mislabelled").inc();
    core.dead_letters.inc();
    let Some(unlogged) = LOG.allow() else {
        return;
    };
    if journaled {
        // A producer's journal holds it: either that producer mislabels readings (a bug a
        // person must fix) or someone forged a producer's origin.
        tracing::error!(
            service,
            topic,
            reason,
            unlogged,
            "A reading names another identity than its topic (forged, or a producer bug); dead-lettered and acknowledged, not stored."
        );
    } else {
        tracing::warn!(
            service,
            topic,
            reason,
            unlogged,
            "A message names another identity than its topic; dead-lettered, not stored."
        );
    }
}

/// A reading that cannot be sent at all fails the same way every time (an invalid payload from
/// a profile or channel, each poll): the first is logged, then one per device and kind this often.
const NOT_SENT_LOG_EVERY: Duration = Duration::from_secs(60);

static NOT_SENT_LOG: LogLimit = LogLimit::new(NOT_SENT_LOG_EVERY);

/// The core error kind a reading a producer did not send is counted under here, or `None`
/// when the producer has counted it already.
fn not_sent_kind(error: &DeliveryError) -> Option<&'static str> {
    match error {
        // The journal refused it: the producer counted `journal` once for the outage
        // ([`journal_unavailable`]) and this reading in wattbus_unjournaled_messages_total.
        DeliveryError::NotJournaled { .. } => None,
        DeliveryError::Journal(_) => Some("journal"),
        DeliveryError::Bus(BusError::Closed) => Some("bus"),
        DeliveryError::Encode(_)
        | DeliveryError::Bus(BusError::Encode(_))
        | DeliveryError::Stopped => Some("unsent"),
    }
}

/// A device reader's producer did not take a reading of `device` ([`crate::delivery::Producer::send`]
/// failed); the reader goes on reading either way. One the journal refused (disk full) is
/// logged once per episode, counted and reported on /healthz by the producer, which tries
/// again with the next one: here it is a DEBUG line, not one ERROR per reading. Any other
/// failure loses the reading: ERROR, counted under its kind, logged once a minute per device and kind.
pub fn reading_not_sent(core: &Core, device: &str, error: &DeliveryError) {
    let service = core.service();
    let Some(kind) = not_sent_kind(error) else {
        tracing::debug!(service, device, error = %chain(error), "A reading was not journaled.");
        return;
    };
    core.error(kind).inc();
    if let Some(unlogged) = NOT_SENT_LOG.allow_key(&format!("{service}/{device}/{kind}")) {
        tracing::error!(service, device, kind, error = %chain(error), unlogged, "Cannot send a reading; it is lost.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wattbus_testkit::capture;

    #[test]
    fn a_reading_not_sent_is_counted_once_under_its_kind_and_logged_once_a_minute_per_device() {
        let core = Core::of("not-sent-test");
        let invalid = || {
            DeliveryError::Encode(proto::EncodeError {
                kind: "Measurement",
                reason: "field power_w is NaN; only finite numbers are stored".into(),
            })
        };
        let disk_full = || DeliveryError::NotJournaled {
            source: JournalError::TopicTooLong(70_000),
            published: true,
        };
        let logged = capture(|| {
            for _ in 0..100 {
                reading_not_sent(&core, "meter-1", &invalid());
            }
            reading_not_sent(&core, "meter-2", &invalid());
            reading_not_sent(&core, "meter-1", &disk_full());
            reading_not_sent(
                &core,
                "meter-1",
                &DeliveryError::Journal(JournalError::TopicTooLong(70_000)),
            );
        });
        assert_eq!(core.error("unsent").get(), 101, "every lost reading counts");
        assert_eq!(
            core.error("journal").get(),
            1,
            "a journal error is counted here unless the producer counted it (not journaled)"
        );
        let errors = logged.at(tracing::Level::ERROR);
        assert_eq!(errors.len(), 3, "once per device and kind: {errors:#?}");
        assert!(errors[0].contains("device=\"meter-1\"") && errors[0].contains("unlogged=0"));
        assert!(errors[0].contains("power_w is NaN"), "{}", errors[0]);
        assert!(errors[1].contains("device=\"meter-2\""), "{}", errors[1]);
        assert!(errors[2].contains("kind=\"journal\""), "{}", errors[2]);
        let debug = logged.at(tracing::Level::DEBUG);
        assert!(
            debug.len() == 1 && debug[0].contains("not journaled"),
            "the producer logged the outage; a reading it refused is a DEBUG line: {debug:#?}"
        );
    }
}
