//! Every notable runtime event logs and counts here, in one place (like vector's
//! `internal_events`): the log line is for the person at the terminal, the counter for the
//! dashboard that notices at 3 a.m. that something is dropping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::journal::{Dropped, OpenReport};
use crate::telemetry::Counter;

pub fn journal_opened(stream: &str, dir: &std::path::Path, report: &OpenReport) {
    if report.damaged_segments > 0 {
        Counter::new(
            "wattbus_journal_recovered_segments_total",
            "Journal segments whose damaged tail was cut on open.",
            &[("stream", stream)],
        )
        .add(report.damaged_segments as u64);
        tracing::warn!(
            stream,
            dir = %dir.display(),
            damaged_segments = report.damaged_segments,
            truncated_bytes = report.truncated_bytes,
            kept_records = report.records,
            "Journal had a torn or damaged tail (crash or power cut mid-write); cut it off and kept every intact record."
        );
    } else {
        tracing::debug!(stream, dir = %dir.display(), records = report.records, "Journal opened.");
    }
}

pub fn journal_dropped(stream: &str, d: &Dropped) {
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

pub fn replaying(stream: &str, group: &str, records: usize, after: u64, waited: Duration) {
    Counter::new(
        "wattbus_replayed_records_total",
        "Records published again because a sink group did not acknowledge them in time.",
        &[("stream", stream), ("sink", group)],
    )
    .add(records as u64);
    tracing::warn!(
        stream,
        sink = group,
        records,
        after_seq = after,
        waited_s = waited.as_secs(),
        "No acknowledgement in time; publishing unacknowledged records again."
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

pub fn bus_error(client_id: &str, error: &dyn std::error::Error, retry_in: Duration, first: bool) {
    Counter::new(
        "wattbus_bus_errors_total",
        "Broker connection errors.",
        &[("client", client_id)],
    )
    .inc();
    let hint = "if this persists, check [bus] host, port, username and password";
    if first {
        tracing::warn!(client_id, error = %error, retry_in_ms = retry_in.as_millis() as u64, hint, "Broker connection lost or refused; retrying.");
    } else {
        tracing::debug!(client_id, error = %error, retry_in_ms = retry_in.as_millis() as u64, "Still cannot reach the broker.");
    }
}

/// A refused publish or subscription comes back after every reconnect, a few times a second:
/// log it once per client in this interval (the counters count every one).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

static REFUSED_SUBSCRIPTION_LOGGED: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);
static DISCONNECTED_LOGGED: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

/// Whether a line for `client_id` is due (and if so, note it).
fn due(logged: &Mutex<Option<HashMap<String, Instant>>>, client_id: &str) -> bool {
    let mut logged = logged.lock().unwrap_or_else(|p| p.into_inner());
    let logged = logged.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    match logged.get(client_id) {
        Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
        _ => {
            logged.insert(client_id.to_string(), now);
            true
        }
    }
}

/// The broker answered a SUBSCRIBE with a failure code: this service will not get that input.
/// With wattbus's broker that is its ACL (the service's user and role do not allow the filter)
/// or a filter limit.
pub fn subscription_refused(client_id: &str, filter: Option<&str>, pkid: u16) {
    Counter::new(
        "wattbus_bus_subscriptions_refused_total",
        "Subscriptions the broker refused (SUBACK failure): this service does not get that input.",
        &[("client", client_id)],
    )
    .inc();
    let filter = filter.unwrap_or("(unknown)");
    if !due(&REFUSED_SUBSCRIPTION_LOGGED, client_id) {
        return;
    }
    tracing::error!(
        client_id,
        filter,
        pkid,
        "The broker refused the subscription to {filter}: check this service's broker user and \
         role ([bus] username; [[broker.users]] role)."
    );
}

/// The broker disconnected this service on purpose (MQTT DISCONNECT). rumqttd does that when
/// it refuses a publish: then `last_publish` (topic, how long ago) is most likely the topic its
/// ACL refused. The service reconnects and, if it publishes there again, is disconnected again.
pub fn disconnected_by_broker(client_id: &str, last_publish: Option<(&str, Duration)>) {
    Counter::new(
        "wattbus_bus_disconnected_by_broker_total",
        "Times the broker closed this service's connection on purpose (a refused publish).",
        &[("client", client_id)],
    )
    .inc();
    if !due(&DISCONNECTED_LOGGED, client_id) {
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

pub fn route_overflow(filter: &str) {
    Counter::new("wattbus_bus_dropped_messages_total", "Incoming messages dropped because the consumer did not keep up (the delivery contract replays them).", &[("filter", filter)])
        .inc();
    tracing::warn!(
        filter,
        "Consumer is not keeping up; dropped an incoming message (it will be replayed by its producer)."
    );
}

pub fn malformed(service: &str, topic: &str, error: &dyn std::error::Error, journaled: bool) {
    Counter::new(
        "wattbus_malformed_messages_total",
        "Incoming messages that could not be decoded (sent to the dead-letter topic).",
        &[("service", service)],
    )
    .inc();
    if journaled {
        // It came through a producer's journal: a reading that this sink will not store.
        tracing::error!(service, topic, error = %error, "A journaled message cannot be read (a newer producer?); sent to the dead-letter topic and acknowledged, not stored.");
    } else {
        tracing::warn!(service, topic, error = %error, "Malformed message; sent to the dead-letter topic.");
    }
}
