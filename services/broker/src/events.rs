//! Notable broker events, each logged and counted here and nowhere else, and the translation
//! of rumqttd's meters and alerts into the runtime's metrics.
//!
//! Metrics (all process-wide, rendered by the runtime's `/metrics`):
//! - `wattbus_broker_up` — 1 while [`crate::run`] has a ready broker; 0 before and after.
//! - `wattbus_broker_connections` — connected MQTT clients, as of the last second in which
//!   anything was published (rumqttd sends no router meter for a quiet second).
//! - `wattbus_broker_publishes_total` — publishes the router received.
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

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rumqttd::alerts::AlertsLink;
use rumqttd::meters::MetersLink;
use rumqttd::{Alert, Meter};
use runtime::telemetry::{Counter, Gauge};

pub(crate) fn up() -> Gauge {
    Gauge::new(
        "wattbus_broker_up",
        "1 while the embedded MQTT broker is running and ready.",
        &[],
    )
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
        }
    }

    pub(crate) fn emit(&self, client_id: &str, username: &str, why: AuthFailure) {
        self.count.inc();
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

/// What the ACL refused: `wattbus_broker_denied_total{action}`, and a rate-limited WARN naming
/// the user, the client id and the topic. The username is only logged, never a label: it comes
/// from the client, and a label per made-up name would grow the metrics without bound.
#[derive(Debug)]
pub(crate) struct Denied {
    publish: (Counter, Throttle),
    origin: (Counter, Throttle),
    subscribe: (Counter, Throttle),
    client_id: (Counter, Throttle),
}

impl Denied {
    pub(crate) fn new() -> Self {
        let counter = |action| {
            let counter = Counter::new(
                "wattbus_broker_denied_total",
                "Publishes, subscriptions and client ids the broker's ACL refused.",
                &[("action", action)],
            );
            (counter, Throttle::default())
        };
        Self {
            publish: counter("publish"),
            origin: counter("origin"),
            subscribe: counter("subscribe"),
            client_id: counter("client_id"),
        }
    }

    pub(crate) fn publish(&self, client_id: &str, username: &str, topic: &str) {
        if let Some(skipped) = count(&self.publish) {
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
        if let Some(skipped) = count(&self.origin) {
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
        if let Some(skipped) = count(&self.subscribe) {
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
        if let Some(skipped) = count(&self.client_id) {
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
    per_client: (Counter, Throttle),
    total: (Counter, Throttle),
    retained: (Counter, Throttle),
    connections: (Counter, Throttle),
    waiting_per_source: (Counter, Throttle),
    waiting_total: (Counter, Throttle),
}

impl Limited {
    pub(crate) fn new() -> Self {
        let subscriptions = |limit| {
            let counter = Counter::new(
                "wattbus_broker_subscriptions_refused_total",
                "SUBSCRIBEs refused whole because they would pass a filter limit.",
                &[("limit", limit)],
            );
            (counter, Throttle::default())
        };
        let retained = Counter::new(
            "wattbus_broker_retained_refused_total",
            "Retained messages delivered but not kept: retained messages at their limit.",
            &[],
        );
        let waiting = |limit| {
            let counter = Counter::new(
                "wattbus_broker_waiting_closed_total",
                "Connections closed before their login to make room for newer ones: their \
                 source (limit=\"per_source\") or the broker (limit=\"total\") had too many \
                 waiting.",
                &[("limit", limit)],
            );
            (counter, Throttle::default())
        };
        Self {
            waiting_per_source: waiting("per_source"),
            waiting_total: waiting("total"),
            per_client: subscriptions("per_client"),
            total: subscriptions("total"),
            retained: (retained, Throttle::default()),
            connections: (
                Counter::new(
                    "wattbus_broker_connections_refused_total",
                    "Connections refused because their user held broker.max_connections_per_user.",
                    &[],
                ),
                Throttle::default(),
            ),
        }
    }

    pub(crate) fn connections(&self, client_id: &str, username: &str, max: usize) {
        if let Some(skipped) = count(&self.connections) {
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
        if let Some(skipped) = count(counted) {
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
        if let Some(skipped) = count(counted) {
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
        if let Some(skipped) = count(&self.retained) {
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

/// Count one event; `Some(events not logged since the last line)` if a line is due.
fn count((counter, throttle): &(Counter, Throttle)) -> Option<u64> {
    counter.inc();
    throttle.due()
}

/// At most one line per interval ([`DENIED_LOG_INTERVAL`]); the next says how many it skipped.
#[derive(Debug, Default)]
struct Throttle(Mutex<(Option<Instant>, u64)>);

impl Throttle {
    fn due(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (last, skipped) = &mut *state;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < DENIED_LOG_INTERVAL) {
            *skipped += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(skipped))
    }
}

/// Record what the router reports until it goes away (with the process: rumqttd's router
/// cannot be stopped). Runs on its own thread, see `crate::start`.
pub(crate) async fn record(meters: MetersLink, alerts: AlertsLink) {
    let connections = Gauge::new(
        "wattbus_broker_connections",
        "Connected MQTT clients (updated in seconds with traffic).",
        &[],
    );
    let publishes = Counter::new(
        "wattbus_broker_publishes_total",
        "Publishes the broker received.",
        &[],
    );
    let failed = Counter::new(
        "wattbus_broker_failed_publishes_total",
        "Publishes the broker could not append; the sender was disconnected.",
        &[],
    );
    let skips = Counter::new(
        "wattbus_broker_subscriber_skips_total",
        "Times a subscriber fell behind the broker's in-memory log and lost messages.",
        &[],
    );

    let meters = async {
        while let Ok(batch) = meters.next().await {
            for meter in batch {
                match meter {
                    Meter::Router(_, r) => {
                        connections.set(r.total_connections as f64);
                        // Both are counts since the previous report: rumqttd resets them.
                        publishes.add(r.total_publishes as u64);
                        failed.add(r.failed_publishes as u64);
                    }
                    Meter::Subscription(filter, s) => {
                        filter_counter("wattbus_broker_filter_messages_total", &filter)
                            .add(s.count as u64);
                        filter_counter("wattbus_broker_filter_bytes_total", &filter)
                            .add(s.total_size as u64);
                    }
                }
            }
        }
    };
    let alerts = async {
        while let Ok(batch) = alerts.next().await {
            for alert in batch {
                subscriber_skipped(&skips, &alert);
            }
        }
    };
    tokio::join!(meters, alerts);
    tracing::debug!("The broker's router is gone; broker metrics stop.");
}

fn filter_counter(name: &'static str, filter: &str) -> Counter {
    let help = if name.ends_with("bytes_total") {
        "Bytes appended to the broker's in-memory log of a subscription filter."
    } else {
        "Messages appended to the broker's in-memory log of a subscription filter."
    };
    Counter::new(name, help, &[("filter", filter)])
}

fn subscriber_skipped(skips: &Counter, alert: &Alert) {
    let kind = alert.kind.name();
    // rumqttd 0.20 raises only "cursor_jump" (its `lost` field is always 0, so how many
    // messages were lost is unknown). Anything else is logged, not miscounted as a skip.
    if kind != "cursor_jump" {
        tracing::warn!(client_id = %alert.client_id, alert = %kind, detail = %alert.kind.description(), "Broker alert.");
        return;
    }
    skips.inc();
    tracing::warn!(
        client_id = %alert.client_id,
        detail = %alert.kind.description(),
        "A subscriber fell behind the broker's in-memory log and skipped messages; raise \
         broker.segment_bytes or broker.segment_count, or speed the subscriber up."
    );
}
