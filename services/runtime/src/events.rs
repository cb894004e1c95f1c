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
