//! Every notable runtime event logs and counts here, in one place (like vector's
//! `internal_events`): the log line is for the person at the terminal, the counter for the
//! dashboard that notices at 3 a.m. that something is dropping.

use std::collections::BTreeMap;
use std::path::Path;
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

/// `waited` is how long the group has kept records waiting without acknowledging any.
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

/// At most one WARN per key and interval; the others are counted and reported with the next
/// one, so a flood of forged messages cannot flood the log.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: BTreeMap<&'static str, (Instant, u64)>,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: BTreeMap::new(),
        }
    }

    /// `Some(suppressed since the last one)` if a WARN for `key` may be logged now.
    pub fn allow(&mut self, key: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.every => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
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

pub fn ack_refused(stream: &str, topic: &str, reason: AckRefusal, limit: &mut RateLimit) {
    Counter::new(
        "wattbus_refused_acks_total",
        "Acknowledgements (or parts of them) not applied: forged, stale, or from a group this stream does not wait for.",
        &[("stream", stream), ("reason", reason.as_str())],
    )
    .inc();
    let reason_str = reason.as_str();
    match reason {
        AckRefusal::SinkMismatch | AckRefusal::Retained => {
            if let Some(suppressed) = limit.allow(reason_str, Instant::now()) {
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
    stream: &str,
    topic: &str,
    reason: &'static str,
    limit: &mut RateLimit,
) {
    Counter::new(
        "wattbus_refused_registrations_total",
        "Sink registrations ignored because they were malformed or named another group than their topic.",
        &[("stream", stream), ("reason", reason)],
    )
    .inc();
    if let Some(suppressed) = limit.allow(reason, Instant::now()) {
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

pub fn sinks_file_damaged(path: &Path, bad_lines: &[usize]) {
    sinks_file_error();
    tracing::error!(
        file = %path.display(),
        ?bad_lines,
        "The learned sink groups file is damaged; kept its valid lines. A group on a damaged line is waited for again once its registration arrives: check that every sink group is running."
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
