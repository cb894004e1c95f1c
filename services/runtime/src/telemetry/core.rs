//! The metrics every service has, whatever it does: one name each, labelled `service`, so that
//! one Grafana panel can show the health of all of them. docs/metrics.md is the table; a test
//! in `wattbus` runs every service of the binary's table and checks each has them all.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `wattbus_up` | gauge | service | 1 while the service runs |
//! | `wattbus_messages_received_total` | counter | service | messages taken from the bus (a sink's or processor's inbox; the broker: publishes accepted) |
//! | `wattbus_messages_sent_total` | counter | service | messages published through a journal (a producer's readings; the broker: messages queued for subscribers) |
//! | `wattbus_errors_total` | counter | service, kind | every error event, by kind; each service declares its kinds, all present from the start at 0 |
//! | `wattbus_journal_records` | gauge | service, stream | records a journal holds (not yet acknowledged by every sink group) |
//! | `wattbus_journal_oldest_seconds` | gauge | service, stream | age of the oldest record a journal holds (0 when empty) |
//! | `wattbus_replayed_records_total` | counter | service, stream, sink | records published again because a sink group did not acknowledge them in time |
//! | `wattbus_dead_letters_total` | counter | service | messages set aside as dead letters (malformed, mislabelled, refused by storage) |
//!
//! Families whose series carry more than `service` (a stream, a sink) are declared from the
//! start (HELP and TYPE shown) and get their series with their first event.
//!
//! Service-specific metrics (`wattbus_serial_…`, `wattbus_modbus_…`) keep their detail (a
//! port, a device); their errors also count here under a kind, so nothing needs both.

use super::{Counter, Gauge};

pub const UP: &str = "wattbus_up";
pub const RECEIVED: &str = "wattbus_messages_received_total";
pub const SENT: &str = "wattbus_messages_sent_total";
pub const ERRORS: &str = "wattbus_errors_total";
pub const JOURNAL_RECORDS: &str = "wattbus_journal_records";
pub const JOURNAL_OLDEST: &str = "wattbus_journal_oldest_seconds";
pub const REPLAYED: &str = "wattbus_replayed_records_total";
pub const DEAD_LETTERS: &str = "wattbus_dead_letters_total";

/// Every core metric name, for the conformance test and the docs.
pub const NAMES: [&str; 8] = [
    UP,
    RECEIVED,
    SENT,
    ERRORS,
    JOURNAL_RECORDS,
    JOURNAL_OLDEST,
    REPLAYED,
    DEAD_LETTERS,
];

/// Error kinds the runtime itself reports for any service (bus, journal, bad messages).
pub const RUNTIME_ERROR_KINDS: &[&str] = &[
    // The broker connection failed or was refused.
    "bus",
    // The broker closed the connection on purpose (its ACL refused a publish).
    "refused_publish",
    // The broker refused a subscription.
    "subscription_refused",
    // An incoming message was dropped because the consumer did not keep up (replayed later).
    "overflow",
    // The journal refused a record or could not be fsynced.
    "journal",
    // The journal was full and dropped its oldest unacknowledged records: readings lost.
    "journal_dropped",
    // A reading could not be sent at all (it failed its payload's validation, or its
    // producer had stopped): lost.
    "unsent",
    // An incoming message could not be decoded, or named another identity than its topic.
    "malformed",
    "mislabelled",
    // A forged or stale acknowledgement, or sink registration, was refused.
    "refused_ack",
    "refused_registration",
];

/// One service's core metrics. Handles to the same series are shared: asking again (the
/// runtime's producer, an inbox, the service's events) counts into the same cell.
#[derive(Debug, Clone)]
pub struct Core {
    service: String,
    pub up: Gauge,
    pub received: Counter,
    pub sent: Counter,
    pub dead_letters: Counter,
}

const HELP_ERRORS: &str =
    "Error events, by kind (each service declares its kinds; docs/metrics.md).";
const HELP_RECORDS: &str = "Records a journal holds (not yet acknowledged by every sink group).";
const HELP_OLDEST: &str = "Age in seconds of the oldest record a journal holds (0 when empty).";
const HELP_REPLAYED: &str =
    "Records published again because a sink group did not acknowledge them in time.";

impl Core {
    /// `service`'s core metrics.
    pub fn of(service: &str) -> Self {
        let l = [("service", service)];
        Self {
            service: service.to_string(),
            up: Gauge::new(UP, "1 while the service runs.", &l),
            received: Counter::new(
                RECEIVED,
                "Messages taken from the bus (an inbox; the broker: publishes accepted).",
                &l,
            ),
            sent: Counter::new(
                SENT,
                "Messages published through a journal (the broker: messages queued for subscribers).",
                &l,
            ),
            dead_letters: Counter::new(
                DEAD_LETTERS,
                "Messages set aside as dead letters (malformed, mislabelled, refused by storage).",
                &l,
            ),
        }
    }

    /// Register every core series at its zero value, the runtime's error kinds and the
    /// service's own among them, so dashboards and alerts see them before anything happens.
    pub fn register(service: &str, error_kinds: &[&str]) -> Self {
        let core = Self::of(service);
        for kind in RUNTIME_ERROR_KINDS.iter().chain(error_kinds) {
            core.error(kind);
        }
        Counter::declare(ERRORS, HELP_ERRORS);
        Gauge::declare(JOURNAL_RECORDS, HELP_RECORDS);
        Gauge::declare(JOURNAL_OLDEST, HELP_OLDEST);
        Counter::declare(REPLAYED, HELP_REPLAYED);
        core
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The error counter of `kind` (`garbled`, `timeout`, `crc`, `port`, …).
    pub fn error(&self, kind: &str) -> Counter {
        Counter::new(
            ERRORS,
            HELP_ERRORS,
            &[("service", &self.service), ("kind", kind)],
        )
    }

    /// Records of `stream` replayed to sink group `sink`.
    pub fn replayed(&self, stream: &str, sink: &str) -> Counter {
        Counter::new(
            REPLAYED,
            HELP_REPLAYED,
            &[
                ("service", &self.service),
                ("stream", stream),
                ("sink", sink),
            ],
        )
    }

    /// The core metrics as the status a running service publishes ([`proto::ServiceHealth`]):
    /// counters summed over their kinds, streams and sinks, journal depth summed, the oldest
    /// record's age the largest. `started` is when the service started.
    pub fn health(&self, started: std::time::Instant) -> proto::ServiceHealth {
        let sum = |name| super::values_of(name, &self.service).iter().sum::<f64>();
        let max = |name| {
            super::values_of(name, &self.service)
                .into_iter()
                .fold(0.0_f64, f64::max)
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // non-negative counts
        let n = |v: f64| v.max(0.0).round() as u64;
        proto::ServiceHealth {
            uptime_s: started.elapsed().as_secs(),
            received: self.received.get(),
            sent: self.sent.get(),
            errors: n(sum(ERRORS)),
            dead_letters: self.dead_letters.get(),
            replayed: n(sum(REPLAYED)),
            journal_records: n(sum(JOURNAL_RECORDS)),
            journal_oldest_s: n(max(JOURNAL_OLDEST)),
        }
    }

    /// The depth and age gauges of journal `stream`.
    pub fn journal(&self, stream: &str) -> (Gauge, Gauge) {
        let l = [("service", self.service.as_str()), ("stream", stream)];
        (
            Gauge::new(JOURNAL_RECORDS, HELP_RECORDS, &l),
            Gauge::new(JOURNAL_OLDEST, HELP_OLDEST, &l),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_shows_every_family_at_zero_with_the_declared_kinds() {
        let core = Core::register("core-test", &["garbled"]);
        let text = super::super::render();
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        for name in [UP, RECEIVED, SENT, DEAD_LETTERS] {
            assert!(
                text.contains(&format!("{name}{{service=\"core-test\"}} 0")),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains("wattbus_errors_total{service=\"core-test\",kind=\"garbled\"} 0"));
        assert!(text.contains("wattbus_errors_total{service=\"core-test\",kind=\"bus\"} 0"));
        core.error("garbled").inc();
        Core::of("core-test").sent.add(2);
        let text = super::super::render();
        assert!(text.contains("wattbus_errors_total{service=\"core-test\",kind=\"garbled\"} 1"));
        assert!(text.contains("wattbus_messages_sent_total{service=\"core-test\"} 2"));
    }

    #[test]
    fn health_sums_every_kind_and_stream_and_takes_the_oldest_journal() {
        let core = Core::register("health-test", &["garbled"]);
        core.error("garbled").add(3);
        core.error("bus").inc();
        Core::register("other-test", &[]).error("bus").add(100);
        let (records_a, oldest_a) = core.journal("meas");
        let (records_b, oldest_b) = core.journal("raw");
        records_a.set(5.0);
        records_b.set(2.0);
        oldest_a.set(12.4);
        oldest_b.set(90.6);
        core.replayed("meas", "influx-writer").add(4);
        core.replayed("raw", "rms-processor").add(6);
        core.sent.add(7);
        core.received.add(8);
        core.dead_letters.add(1);
        let h = core.health(std::time::Instant::now());
        assert_eq!(
            h,
            proto::ServiceHealth {
                uptime_s: 0,
                received: 8,
                sent: 7,
                errors: 4,
                dead_letters: 1,
                replayed: 10,
                journal_records: 7,
                journal_oldest_s: 91,
            }
        );
    }
}
