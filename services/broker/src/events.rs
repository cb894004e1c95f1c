//! Notable broker events, each logged and counted here and nowhere else, and the translation
//! of rumqttd's meters and alerts into the runtime's metrics.
//!
//! The broker has no bus connection, so the runtime counts nothing for it: its core metrics
//! (docs/metrics.md) come from here. `wattbus_messages_received_total{service="broker"}` is the
//! publishes the router accepted, `wattbus_messages_sent_total` the messages it appended to
//! subscription filter logs (what subscribers are sent), and every refusal, limit and loss
//! below also counts in `wattbus_errors_total{service="broker",kind}` ([`ERROR_KINDS`]).
//!
//! The broker's own metrics (all process-wide, rendered by the runtime's `/metrics`):
//! - `wattbus_broker_connections` — connected MQTT clients, as of the last second in which
//!   anything was published (rumqttd sends no router meter for a quiet second).
//! - `wattbus_broker_failed_publishes_total` — publishes it could not take; the sender was
//!   disconnected.
//! - `wattbus_broker_filter_messages_total{filter}` / `wattbus_broker_filter_bytes_total{filter}`
//!   — messages and bytes appended to the in-memory log of each subscription filter, which is
//!   what `segment_bytes` × `segment_count` has to hold.
//! - `wattbus_broker_subscriber_skips_total` — a subscriber fell further behind than that log
//!   and skipped ahead: it lost messages (the delivery contract replays them).
//! - `wattbus_broker_auth_failures_total{listener}` — refused logins (wrong password or unknown
//!   user; a CONNECT without credentials is refused by rumqttd before it can be counted).
//! - `wattbus_broker_denied_total{action="publish|subscribe|client_id"}` — what the ACL refused:
//!   a publish (the client is disconnected), a SUBSCRIBE, a login with another user's client id.
//! - `wattbus_broker_subscriptions_refused_total{limit="per_client|total"}` — SUBSCRIBEs refused
//!   for `max_filters_per_client` or `max_filters`.
//! - `wattbus_broker_retained_refused_total` — retained messages not kept (`max_retained_bytes`).

use std::time::Duration;

use rumqttd::alerts::AlertsLink;
use rumqttd::meters::MetersLink;
use rumqttd::{Alert, Meter};
use runtime::telemetry::core::Core;
use runtime::telemetry::{Counter, Gauge, LogLimit};

/// The broker's kinds of `wattbus_errors_total` (the runtime's are there too, at 0: the broker
/// has no bus connection or journal of its own).
pub const ERROR_KINDS: &[&str] = &[
    // A login refused: unknown user or wrong password.
    "login_refused",
    // The ACL refused a publish; the client was disconnected.
    "denied_publish",
    // A publish claimed the origin of another user's producer; the client was disconnected.
    "denied_origin",
    // The ACL refused a subscription.
    "denied_subscribe",
    // A login with the client id of another user was refused.
    "denied_client_id",
    // The router could not append a publish; the sender was disconnected.
    "failed_publish",
    // A subscriber fell behind its filter's in-memory log and skipped messages.
    "subscriber_skip",
    // A connection refused: its user already held broker.max_connections_per_user.
    "connection_limit",
    // A connection closed before its login, to make room for newer ones.
    "waiting_limit",
    // A SUBSCRIBE refused whole: it would pass max_filters_per_client or max_filters.
    "filter_limit",
    // A retained message delivered but not kept: retained messages at max_retained_bytes.
    "retained_limit",
];

/// The broker's core metrics.
fn core() -> Core {
    Core::of(<crate::Broker as runtime::Service>::NAME)
}

/// Why a login was refused. Only ever logged, never told to the client: rumqttd just closes
/// the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    UnknownUser,
    WrongPassword,
    /// The right password, but the client id belongs to another user (a takeover attempt, or
    /// two services sharing an instance name). Counted as denied, not as a failed login.
    ClientIdOfAnotherUser,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            Self::UnknownUser => "unknown user",
            Self::WrongPassword => "wrong password",
            Self::ClientIdOfAnotherUser => "client id of another user",
        }
    }
}

/// A refused login on one listener.
#[derive(Clone, Debug)]
pub(crate) struct AuthFailed {
    listener: String,
    count: Counter,
    error: Counter,
}

impl AuthFailed {
    pub(crate) fn new(listener: &str) -> Self {
        let count = Counter::new(
            "wattbus_broker_auth_failures_total",
            "MQTT logins refused for a wrong password or an unknown user.",
            &[("listener", listener)],
        );
        Self {
            listener: listener.to_string(),
            count,
            error: core().error("login_refused"),
        }
    }

    /// Not rate-limited, as before: a login is a TCP connection and a CONNECT, which
    /// `broker.max_connections` and the waiting limits already bound.
    pub(crate) fn emit(&self, client_id: &str, username: &str, why: AuthFailure) {
        self.count.inc();
        self.error.inc();
        tracing::warn!(
            listener = %self.listener,
            client_id,
            username,
            reason = why.as_str(),
            "Refused an MQTT login; the client was disconnected."
        );
    }
}

/// At most one WARN per kind of refusal in this interval; the next says how many it skipped.
/// A misconfigured service repeats its refused publish after every reconnect, and a hostile
/// client can loop: the log must stay readable and the SD card unworn.
const DENIED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of refusal: its own counter (labelled), the core error count of its kind, and
/// its key in the log limit.
#[derive(Debug)]
struct Refusal {
    counter: Counter,
    error: Counter,
    key: &'static str,
}

impl Refusal {
    fn new(counter: Counter, kind: &'static str) -> Self {
        Self {
            counter,
            error: core().error(kind),
            key: kind,
        }
    }

    /// Count one; `Some(events not logged since the last line)` if a line is due.
    fn count(&self, log: &LogLimit) -> Option<u64> {
        self.counter.inc();
        self.error.inc();
        log.allow_key(self.key)
    }
}

/// What the ACL refused: `wattbus_broker_denied_total{action}`, and a rate-limited WARN naming
/// the user, the client id and the topic. The username is only logged, never a label: it comes
/// from the client, and a label per made-up name would grow the metrics without bound.
#[derive(Debug)]
pub(crate) struct Denied {
    publish: Refusal,
    origin: Refusal,
    subscribe: Refusal,
    client_id: Refusal,
    /// One line per action and interval.
    log: LogLimit,
}

impl Denied {
    pub(crate) fn new() -> Self {
        let refusal = |action, kind| {
            let counter = Counter::new(
                "wattbus_broker_denied_total",
                "Publishes, subscriptions and client ids the broker's ACL refused.",
                &[("action", action)],
            );
            Refusal::new(counter, kind)
        };
        Self {
            publish: refusal("publish", "denied_publish"),
            origin: refusal("origin", "denied_origin"),
            subscribe: refusal("subscribe", "denied_subscribe"),
            client_id: refusal("client_id", "denied_client_id"),
            log: LogLimit::new(DENIED_LOG_INTERVAL),
        }
    }

    pub(crate) fn publish(&self, client_id: &str, username: &str, topic: &str) {
        if let Some(skipped) = self.publish.count(&self.log) {
            tracing::warn!(
                action = "publish",
                username,
                client_id,
                topic,
                skipped,
                "Refused a publish: the user's broker role does not allow this topic; the \
                 client was disconnected."
            );
        }
    }

    /// A publish whose payload claims the origin of a producer this user does not own.
    pub(crate) fn origin(&self, client_id: &str, username: &str, topic: &str, producer: &str) {
        if let Some(skipped) = self.origin.count(&self.log) {
            tracing::warn!(
                action = "origin",
                username,
                client_id,
                topic,
                producer,
                skipped,
                "Refused a publish: its payload claims the origin of producer {producer}, which \
                 is not this user's (a producer's name is its user's name or starts with it and \
                 '-'); sinks would acknowledge that producer's readings. The client was \
                 disconnected."
            );
        }
    }

    pub(crate) fn subscribe(&self, client_id: &str, username: &str, filter: &str) {
        if let Some(skipped) = self.subscribe.count(&self.log) {
            tracing::warn!(
                action = "subscribe",
                username,
                client_id,
                filter,
                skipped,
                "Refused a subscription: the user's broker role does not allow this filter; \
                 every filter of the SUBSCRIBE got a failure code."
            );
        }
    }

    pub(crate) fn client_id(&self, client_id: &str, username: &str) {
        if let Some(skipped) = self.client_id.count(&self.log) {
            tracing::warn!(
                action = "client_id",
                username,
                client_id,
                skipped,
                "Refused a login: the client id belongs to another broker user."
            );
        }
    }
}

/// What a memory limit refused: a SUBSCRIBE past `max_filters_per_client` or `max_filters`
/// (`wattbus_broker_subscriptions_refused_total{limit}`), a retained message past
/// `max_retained_bytes` (`wattbus_broker_retained_refused_total`); each with a rate-limited
/// WARN.
#[derive(Debug)]
pub(crate) struct Limited {
    per_client: Refusal,
    total: Refusal,
    retained: Refusal,
    connections: Refusal,
    waiting_per_source: Refusal,
    waiting_total: Refusal,
    /// One line per limit and interval (each a key: as before, every limit its own line).
    log: LogLimit,
}

impl Limited {
    pub(crate) fn new() -> Self {
        let subscriptions = |limit, key| {
            let counter = Counter::new(
                "wattbus_broker_subscriptions_refused_total",
                "SUBSCRIBEs refused whole because they would pass a filter limit.",
                &[("limit", limit)],
            );
            Refusal {
                key,
                ..Refusal::new(counter, "filter_limit")
            }
        };
        let retained = Counter::new(
            "wattbus_broker_retained_refused_total",
            "Retained messages delivered but not kept: retained messages at their limit.",
            &[],
        );
        let waiting = |limit, key| {
            let counter = Counter::new(
                "wattbus_broker_waiting_closed_total",
                "Connections closed before their login to make room for newer ones: their \
                 source (limit=\"per_source\") or the broker (limit=\"total\") had too many \
                 waiting.",
                &[("limit", limit)],
            );
            Refusal {
                key,
                ..Refusal::new(counter, "waiting_limit")
            }
        };
        Self {
            waiting_per_source: waiting("per_source", "waiting_per_source"),
            waiting_total: waiting("total", "waiting_total"),
            per_client: subscriptions("per_client", "filters_per_client"),
            total: subscriptions("total", "filters_total"),
            retained: Refusal::new(retained, "retained_limit"),
            connections: Refusal::new(
                Counter::new(
                    "wattbus_broker_connections_refused_total",
                    "Connections refused because their user held broker.max_connections_per_user.",
                    &[],
                ),
                "connection_limit",
            ),
            log: LogLimit::new(DENIED_LOG_INTERVAL),
        }
    }

    pub(crate) fn connections(&self, client_id: &str, username: &str, max: usize) {
        if let Some(skipped) = self.connections.count(&self.log) {
            tracing::warn!(
                client_id,
                username,
                max,
                skipped,
                "Refused a connection: its user already holds broker.max_connections_per_user \
                 connections (no CONNACK)."
            );
        }
    }

    pub(crate) fn waiting(&self, addr: std::net::SocketAddr, limit: rumqttd::WaitingLimit) {
        let (counted, why, max) = match limit {
            rumqttd::WaitingLimit::PerSource(max) => {
                (&self.waiting_per_source, "its source had", max)
            }
            rumqttd::WaitingLimit::Total(max) => (&self.waiting_total, "the broker had", max),
        };
        if let Some(skipped) = counted.count(&self.log) {
            tracing::warn!(
                %addr,
                max,
                skipped,
                "Closed a connection that had not logged in yet, to make room for a newer one: \
                 {why} {max} waiting for their login (a client that connects and sends nothing, \
                 many times over)."
            );
        }
    }

    pub(crate) fn filters(&self, client_id: &str, filter: &str, limit: rumqttd::FilterLimit) {
        let (counted, key, max) = match limit {
            rumqttd::FilterLimit::PerConnection(max) => {
                (&self.per_client, "broker.max_filters_per_client", max)
            }
            rumqttd::FilterLimit::Total(max) => (&self.total, "broker.max_filters", max),
        };
        if let Some(skipped) = counted.count(&self.log) {
            tracing::warn!(
                client_id,
                filter,
                limit = key,
                max,
                skipped,
                "Refused a subscription: it would pass a filter limit; every filter of the \
                 SUBSCRIBE got a failure code."
            );
        }
    }

    pub(crate) fn retained(&self, client_id: &str, topic: &str) {
        if let Some(skipped) = self.retained.count(&self.log) {
            tracing::warn!(
                client_id,
                topic,
                skipped,
                "A retained message was delivered but not kept: retained messages are at \
                 broker.max_retained_bytes; the topic has no retained message now."
            );
        }
    }
}

/// Record what the router reports until it goes away (with the process: rumqttd's router
/// cannot be stopped). Runs on its own thread, see `crate::start`.
pub(crate) async fn record(meters: MetersLink, alerts: AlertsLink) {
    let router = Router::new();
    let meters = async {
        while let Ok(batch) = meters.next().await {
            for meter in batch {
                router.meter(meter);
            }
        }
    };
    let alerts = async {
        while let Ok(batch) = alerts.next().await {
            for alert in batch {
                router.alert(&alert);
            }
        }
    };
    tokio::join!(meters, alerts);
    tracing::debug!("The broker's router is gone; broker metrics stop.");
}

/// What the router reports: its meters (once a second with traffic) and alerts.
struct Router {
    core: Core,
    connections: Gauge,
    failed: Counter,
    failed_error: Counter,
    skips: Counter,
    skips_error: Counter,
}

impl Router {
    fn new() -> Self {
        let core = core();
        Self {
            connections: Gauge::new(
                "wattbus_broker_connections",
                "Connected MQTT clients (updated in seconds with traffic).",
                &[],
            ),
            failed: Counter::new(
                "wattbus_broker_failed_publishes_total",
                "Publishes the broker could not append; the sender was disconnected.",
                &[],
            ),
            failed_error: core.error("failed_publish"),
            skips: Counter::new(
                "wattbus_broker_subscriber_skips_total",
                "Times a subscriber fell behind the broker's in-memory log and lost messages.",
                &[],
            ),
            skips_error: core.error("subscriber_skip"),
            core,
        }
    }

    fn meter(&self, meter: Meter) {
        match meter {
            Meter::Router(_, r) => {
                self.connections.set(r.total_connections as f64);
                // Both are counts since the previous report: rumqttd resets them.
                self.core.received.add(r.total_publishes as u64);
                let failed = r.failed_publishes as u64;
                self.failed.add(failed);
                self.failed_error.add(failed);
            }
            Meter::Subscription(filter, s) => {
                // Every message appended to a filter's log goes to its subscribers.
                self.core.sent.add(s.count as u64);
                filter_counter("wattbus_broker_filter_messages_total", &filter).add(s.count as u64);
                filter_counter("wattbus_broker_filter_bytes_total", &filter)
                    .add(s.total_size as u64);
            }
        }
    }

    fn alert(&self, alert: &Alert) {
        let kind = alert.kind.name();
        // rumqttd 0.20 raises only "cursor_jump" (its `lost` field is always 0, so how many
        // messages were lost is unknown). Anything else is logged, not miscounted as a skip.
        if kind != "cursor_jump" {
            tracing::warn!(client_id = %alert.client_id, alert = %kind, detail = %alert.kind.description(), "Broker alert.");
            return;
        }
        self.skips.inc();
        self.skips_error.inc();
        tracing::warn!(
            client_id = %alert.client_id,
            detail = %alert.kind.description(),
            "A subscriber fell behind the broker's in-memory log and skipped messages; raise \
             broker.segment_bytes or broker.segment_count, or speed the subscriber up."
        );
    }
}

fn filter_counter(name: &'static str, filter: &str) -> Counter {
    let help = if name.ends_with("bytes_total") {
        "Bytes appended to the broker's in-memory log of a subscription filter."
    } else {
        "Messages appended to the broker's in-memory log of a subscription filter."
    };
    Counter::new(name, help, &[("filter", filter)])
}

#[cfg(test)]
mod tests {

    use super::*;
    use wattbus_testkit::logged;

    fn errors(kind: &str) -> u64 {
        core().error(kind).get()
    }

    // Each test below counts kinds no other test of this binary counts, so counts are exact.

    #[test]
    fn acl_refusals_count_under_their_kinds_and_log_once_per_action_and_interval() {
        let denied = Denied::new();
        let kinds = ["denied_publish", "denied_subscribe", "denied_client_id"];
        let before: Vec<u64> = kinds.iter().map(|k| errors(k)).collect();
        let log = logged(|| {
            for _ in 0..3 {
                denied.publish("evil", "evil", "wattbus/v1/home/meas/x/y");
                denied.subscribe("evil", "evil", "#");
                denied.client_id("influx-writer", "evil");
            }
        });
        for (k, b) in kinds.iter().zip(before) {
            assert_eq!(errors(k), b + 3, "{k}");
        }
        for line in [
            "Refused a publish",
            "Refused a subscription",
            "the client id belongs",
        ] {
            assert_eq!(log.matches(line).count(), 1, "{line}: {log}");
        }
    }

    #[test]
    fn limits_count_under_their_kinds_and_each_limit_logs_on_its_own() {
        let limited = Limited::new();
        let kinds = [
            "filter_limit",
            "waiting_limit",
            "retained_limit",
            "connection_limit",
        ];
        let before: Vec<u64> = kinds.iter().map(|k| errors(k)).collect();
        let addr = std::net::SocketAddr::from(([192, 0, 2, 1], 40_000));
        let log = logged(|| {
            for _ in 0..2 {
                limited.filters("c", "a/#", rumqttd::FilterLimit::PerConnection(32));
                limited.filters("c", "b/#", rumqttd::FilterLimit::Total(1024));
                limited.waiting(addr, rumqttd::WaitingLimit::PerSource(8));
                limited.waiting(addr, rumqttd::WaitingLimit::Total(64));
                limited.retained("c", "t");
                limited.connections("c", "u", 8);
            }
        });
        for ((k, b), n) in kinds.iter().zip(before).zip([4, 4, 2, 2]) {
            assert_eq!(errors(k), b + n, "{k}");
        }
        // The filter limits and the waiting limits each log apart, once an interval.
        assert_eq!(log.matches("Refused a subscription").count(), 2, "{log}");
        assert_eq!(log.matches("Closed a connection").count(), 2, "{log}");
        assert_eq!(
            log.matches("was delivered but not kept").count(),
            1,
            "{log}"
        );
        assert_eq!(log.matches("Refused a connection").count(), 1, "{log}");
    }

    #[test]
    fn refused_logins_count_every_one() {
        let failed = AuthFailed::new("test-listener");
        let before = errors("login_refused");
        let log = logged(|| {
            failed.emit("m1", "alice", AuthFailure::WrongPassword);
            failed.emit("m2", "mallory", AuthFailure::UnknownUser);
        });
        assert_eq!(errors("login_refused"), before + 2);
        assert_eq!(log.matches("Refused an MQTT login").count(), 2, "{log}");
    }

    #[test]
    fn router_meters_are_the_core_received_and_sent_counts() {
        let router = Router::new();
        let core = core();
        let (received, sent, failed) = (
            core.received.get(),
            core.sent.get(),
            errors("failed_publish"),
        );
        let mut meter = Meter::Router(0, Default::default());
        if let Meter::Router(_, r) = &mut meter {
            r.total_publishes = 5;
            r.failed_publishes = 1;
        }
        router.meter(meter);
        // One publish to two filters: two messages to send.
        for filter in ["a/#", "a/+"] {
            let mut meter = Meter::Subscription(filter.into(), Default::default());
            if let Meter::Subscription(_, s) = &mut meter {
                s.count = 4;
                s.total_size = 400;
            }
            router.meter(meter);
        }
        assert_eq!(core.received.get(), received + 5);
        assert_eq!(core.sent.get(), sent + 8);
        assert_eq!(errors("failed_publish"), failed + 1);
    }

    #[test]
    fn every_error_kind_is_declared_once_and_apart_from_the_runtimes() {
        for (i, k) in ERROR_KINDS.iter().enumerate() {
            assert!(!ERROR_KINDS[..i].contains(k), "{k} twice");
            assert!(
                !runtime::telemetry::core::RUNTIME_ERROR_KINDS.contains(k),
                "{k} is the runtime's"
            );
        }
    }
}
