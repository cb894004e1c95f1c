//! Every notable runtime event logs and counts here, in one place (like vector's
//! `internal_events`): the log line is for the person at the terminal, the counter for the
//! dashboard that notices at 3 a.m. that something is dropping.

use std::time::Duration;

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

pub fn route_overflow(filter: &str) {
    Counter::new("wattbus_bus_dropped_messages_total", "Incoming messages dropped because the consumer did not keep up (the delivery contract replays them).", &[("filter", filter)])
        .inc();
    tracing::warn!(
        filter,
        "Consumer is not keeping up; dropped an incoming message (it will be replayed by its producer)."
    );
}

/// Logs one event in a flood: the first, then at most one per `every`, each saying how many
/// went unlogged since (a client can send thousands of bad messages a second; the counter
/// counts every one, the log must stay readable).
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    unlogged: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: std::sync::Mutex::new(None),
            unlogged: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(events not logged since the last line)` when this one is to be logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(std::time::Instant::now())
    }

    fn allow_at(&self, now: std::time::Instant) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
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
    let Some(unlogged) = LOG.allow() else {
        return;
    };
    if journaled {
        // It came through a producer's journal: a reading that this sink will not store.
        tracing::error!(service, topic, error = %error, unlogged, "A journaled message cannot be read (a newer producer?); sent to the dead-letter topic and acknowledged, not stored.");
    } else {
        tracing::warn!(service, topic, error = %error, unlogged, "Malformed message; sent to the dead-letter topic.");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_once_per_interval_with_the_count_of_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        assert_eq!(limit.allow_at(t0), Some(0), "the first is logged");
        for s in 1..=59 {
            assert_eq!(limit.allow_at(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(
            limit.allow_at(t0 + Duration::from_secs(60)),
            Some(59),
            "the next line says how many went unlogged"
        );
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(61)), None);
    }
}
