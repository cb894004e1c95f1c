//! The MQTT connection every service uses.
//!
//! One task owns rumqttc's event loop and only polls it: it never awaits a publish (which can
//! deadlock the loop, rumqtt issues #263 and #1025). It
//! - reconnects with exponential backoff and jitter (rumqttc alone retries in a tight loop);
//! - re-subscribes every route on every ConnAck (rumqttc does not restore subscriptions);
//! - publishes the service's retained `online` status on every ConnAck, with a retained
//!   `offline` last will for when the connection dies;
//! - publishes, retained, the registration of every sink group a consumer on this connection
//!   belongs to (the filters it subscribes) on every ConnAck, after its subscriptions, so a
//!   producer that learns of a group from it can already reach the group;
//! - routes each incoming publish to the consumers whose filter matches.
//!
//! Sessions are clean: the broker keeps nothing across its own restart anyway, and rumqttc
//! drops its pending queue on a reconnect without a session. Nothing relies on MQTT to keep a
//! message: the delivery contract (journal, acknowledgements, replay) does.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::{Payload, Segment, ServiceState, SinkRegistration, Status, Topic};
pub use rumqttc::QoS;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, Retries};
use crate::config::{BusConfig, ConfigError};
use crate::events;
use crate::health::{Health, ReadyFlag};
use crate::telemetry::{Gauge, core::Core};

/// How long [`Bus::publish_or_defer`] waits for room in rumqttc's request queue. Long enough
/// to ride out a burst, short enough that a stalled event loop cannot stall a producer.
const PUBLISH_WAIT: Duration = Duration::from_millis(500);

/// An incoming message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Delivered as a retained message (on subscribing), not as it was published.
    pub retain: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the bus connection is closed")]
    Closed,
    #[error("cannot encode: {0}")]
    Encode(#[from] proto::EncodeError),
}

/// What to do when a consumer's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Wait up to `route_block_ms` for room, then drop (and count).
    Wait,
    /// Drop at once: for acknowledgements, which are repeated anyway.
    Drop,
}

struct Route {
    /// As subscribed (may be `$share/...`).
    filter: String,
    qos: QoS,
    tx: mpsc::Sender<Message>,
    overflow: Overflow,
}

struct Inner {
    client: AsyncClient,
    routes: Mutex<Vec<Route>>,
    /// Subscriptions not yet handed to rumqttc. Its request queue is shared with publishes
    /// and may be full (a replay after a reconnect fills it): a subscription that cannot be
    /// queued now is kept here and retried after every event, never given up.
    pending_subs: Mutex<Vec<(String, QoS)>>,
    /// (subscriptions queued, SUBACKs received): equal once the broker confirmed them all.
    subs: watch::Sender<(u64, u64)>,
    /// Which filter each SUBSCRIBE carries, so that a refusal can name it (see [`SubIds`]).
    sub_ids: Mutex<SubIds>,
    /// Subscriptions the broker refused on this connection, asked for again after a backoff
    /// (its filter limits may be full for now: another client holding every filter slot took
    /// them while this service was away, and a refused subscription once stayed refused, the
    /// service ready, until a restart). While any is refused, the `subscriptions:<client>`
    /// readiness check is false.
    refused: Mutex<Refused>,
    /// The last topic published and when: a broker that disconnects this service right after
    /// a publish has refused that topic (its ACL), and the ERROR names it.
    last_publish: Mutex<Option<(Instant, String)>>,
    /// The sink groups consumers on this connection belong to, and what to publish.
    sinks: Mutex<Registrations>,
    /// Whether the link is up (between a ConnAck and the next error). While it is down,
    /// producers journal without publishing: rumqttc's request queue is not drained then, and
    /// waiting on it would stop a service from reading its devices.
    up: AtomicBool,
    connected: watch::Receiver<u64>,
    close: Notify,
    client_id: Segment,
    site: Segment,
    service: Segment,
    /// The process's readiness checks, so what runs on this connection (a producer whose
    /// journal cannot take records) can add its own.
    health: Health,
    /// Whether this connection publishes its status (see [`Bus::observe`]).
    announce: bool,
}

/// The filter of each SUBSCRIBE, from the moment it is queued (one filter per SUBSCRIBE) to its
/// SUBACK: rumqttc reports the packet id only when it sends the SUBSCRIBE, and sends them in
/// the order they were queued. A connection error clears it: rumqttc drops what it had not
/// sent, and the ConnAck queues every route again. (A route queued by another task at the very
/// moment the connection breaks could shift the names by one; the refusal itself is never
/// missed.)
#[derive(Default)]
struct SubIds {
    queued: VecDeque<String>,
    sent: HashMap<u16, String>,
}

struct Refused {
    filters: Vec<(String, QoS)>,
    /// Refusals in a row, for the backoff; reset once every subscription is in place.
    retries: Retries,
    /// A retry is scheduled.
    retrying: bool,
}

impl Default for Refused {
    fn default() -> Self {
        Self {
            filters: Vec::new(),
            retries: Retries::new(SUBSCRIBE_RETRY),
            retrying: false,
        }
    }
}

/// A refused subscription is asked for again after 1 s, doubling to a minute: a broker whose
/// ACL is being fixed is asked soon, one that keeps refusing is not hammered.
const SUBSCRIBE_RETRY: Backoff = Backoff::constant(Duration::from_secs(1), Duration::from_secs(60));

/// Sink registrations of one connection.
#[derive(Default)]
struct Registrations {
    /// Group → the plain filters its consumers here subscribe.
    filters: BTreeMap<Segment, BTreeSet<String>>,
    /// Groups whose registration is not handed to rumqttc yet on this connection.
    due: BTreeSet<Segment>,
}

/// A cheap-to-clone handle on the connection.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
    capacity: usize,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("client_id", &self.inner.client_id)
            .finish()
    }
}

/// Identity on the bus: the service's kind and the instance (the MQTT client id). Two
/// instances of one service need different instance names.
#[derive(Debug, Clone)]
pub struct Identity {
    pub service: Segment,
    pub instance: Segment,
}

impl Bus {
    /// Start connecting. Returns at once; `connected()` tells when the link is up.
    ///
    /// The connection announces itself: retained `online` on `status/<instance>` at each
    /// ConnAck, `offline` at a clean close, and as its last will.
    pub fn connect(
        cfg: &BusConfig,
        site: &Segment,
        id: &Identity,
        health: &Health,
    ) -> Result<(Bus, JoinHandle<()>), ConfigError> {
        Self::open(cfg, site, id, health, true)
    }

    /// Like [`Bus::connect`], for a tool that only watches (`wattbus tail`, `sinks list`): no
    /// status and no last will, so a broker user with the `reader` role, which may publish
    /// nothing, can log in, and the bus does not keep a retained status of every tool run.
    pub fn observe(
        cfg: &BusConfig,
        site: &Segment,
        id: &Identity,
        health: &Health,
    ) -> Result<(Bus, JoinHandle<()>), ConfigError> {
        Self::open(cfg, site, id, health, false)
    }

    fn open(
        cfg: &BusConfig,
        site: &Segment,
        id: &Identity,
        health: &Health,
        announce: bool,
    ) -> Result<(Bus, JoinHandle<()>), ConfigError> {
        let password = cfg.resolved_password()?;
        let reconnect = Retries::new(cfg.reconnect_backoff()?);
        let mut opts = MqttOptions::new(id.instance.as_str(), cfg.host.clone(), cfg.port);
        opts.set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_s)));
        opts.set_clean_session(true);
        opts.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
        opts.set_inflight(100);
        if let Some(user) = &cfg.username {
            opts.set_credentials(
                user.clone(),
                password
                    .as_ref()
                    .map(|p| p.expose().to_string())
                    .unwrap_or_default(),
            );
        }
        if announce {
            let status_topic = Topic::status(site, &id.instance);
            let offline = status(id, ServiceState::Offline)
                .encode()
                .unwrap_or_default();
            opts.set_last_will(LastWill::new(
                status_topic.as_str(),
                offline,
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        // Without TCP_NODELAY a small publish or acknowledgement can wait for the kernel's
        // delayed-ACK timer (~40 ms on Linux) behind the previous one: a fixed latency per
        // round trip that capped a windowed producer at ~25 round trips a second
        // (docs/BENCHMARKS.md, rms-processor). The broker link is local; coalescing buys
        // nothing here.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (conn_tx, conn_rx) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            client,
            routes: Mutex::new(Vec::new()),
            pending_subs: Mutex::new(Vec::new()),
            subs: watch::channel((0, 0)).0,
            sub_ids: Mutex::new(SubIds::default()),
            refused: Mutex::new(Refused::default()),
            last_publish: Mutex::new(None),
            sinks: Mutex::new(Registrations::default()),
            up: AtomicBool::new(false),
            connected: conn_rx,
            close: Notify::new(),
            client_id: id.instance.clone(),
            site: site.clone(),
            service: id.service.clone(),
            health: health.clone(),
            announce,
        });
        let ready = health.check(&format!("bus:{}", id.instance));
        let subscribed = health.check(&format!("subscriptions:{}", id.instance));
        subscribed.set(true);
        let task = tokio::spawn(poll_loop(
            inner.clone(),
            eventloop,
            conn_tx,
            cfg.clone(),
            reconnect,
            id.clone(),
            (ready, subscribed),
        ));
        Ok((
            Bus {
                inner,
                capacity: cfg.route_capacity,
            },
            task,
        ))
    }

    pub fn site(&self) -> &Segment {
        &self.inner.site
    }

    pub fn client_id(&self) -> &Segment {
        &self.inner.client_id
    }

    pub fn service(&self) -> &Segment {
        &self.inner.service
    }

    /// The readiness checks of the process this connection belongs to.
    pub fn health(&self) -> &Health {
        &self.inner.health
    }

    /// Increments on every ConnAck; wait on `changed()` to learn of (re)connections.
    pub fn connection(&self) -> watch::Receiver<u64> {
        self.inner.connected.clone()
    }

    /// Whether the link to the broker is up now.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Wait until connected, at most `timeout`. Returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connection();
        tokio::time::timeout(timeout, rx.wait_for(|epoch| *epoch > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Wait until every subscription made so far is confirmed by the broker (or `timeout`).
    /// Returns whether they are.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.subs.subscribe();
        let inner = &self.inner;
        let done = rx.wait_for(|(requested, acked)| {
            acked >= requested && lock(&inner.pending_subs).is_empty()
        });
        tokio::time::timeout(timeout, done)
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Subscribe `filter` (which may be a `$share/...` filter) and get its messages. The
    /// subscription is renewed on every reconnect.
    pub fn subscribe(
        &self,
        filter: impl Into<String>,
        qos: QoS,
        overflow: Overflow,
    ) -> mpsc::Receiver<Message> {
        let filter = filter.into();
        let (tx, rx) = mpsc::channel(self.capacity);
        {
            let mut routes = lock(&self.inner.routes);
            routes.push(Route {
                filter: filter.clone(),
                qos,
                tx,
                overflow,
            });
            // Always pending, connected or not: deciding by the connection state here would
            // race with the ConnAck handler's snapshot. A duplicate subscription is harmless.
            lock(&self.inner.pending_subs).push((filter, qos));
        }
        queue_subscriptions(&self.inner);
        rx
    }

    /// Every service's status on `site` (retained ones first), for a sink that stores them.
    /// Not acknowledged and dropped when the consumer lags: the next status, 10 s later,
    /// replaces a lost one.
    pub fn watch_statuses(&self, site: &Segment) -> mpsc::Receiver<Message> {
        self.subscribe(
            proto::Filter::statuses(Some(site)).as_str(),
            QoS::AtLeastOnce,
            Overflow::Drop,
        )
    }

    /// Announce that a consumer on this connection belongs to sink group `group` and subscribes
    /// `filter` (plain, not `$share/...`): the group's retained registration
    /// (`wattbus/v1/<site>/sink/<group>`, every filter of the group on this connection) is
    /// published now and on every ConnAck, after the subscriptions, so producers learn to wait
    /// for the group's acknowledgements.
    pub fn register_sink(&self, group: &Segment, filter: &str) {
        {
            let mut sinks = lock(&self.inner.sinks);
            let added = sinks
                .filters
                .entry(group.clone())
                .or_default()
                .insert(filter.to_string());
            if added {
                sinks.due.insert(group.clone());
            }
        }
        queue_registrations(&self.inner);
    }

    /// Publish at QoS 1. Returns once rumqttc has queued it, which means nothing about
    /// delivery: that is what acknowledgements are for.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<(), BusError> {
        self.inner.published(topic);
        self.inner
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .map_err(|_| BusError::Closed)
    }

    /// Publish if the link is up and rumqttc takes the message within `PUBLISH_WAIT`;
    /// otherwise leave it (returns false). For journaled messages, which the delivery contract
    /// publishes again later: a producer must keep reading its devices during a broker outage.
    pub async fn publish_or_defer(&self, topic: &str, payload: Vec<u8>) -> bool {
        if !self.inner.up.load(Ordering::Relaxed) {
            return false;
        }
        self.inner.published(topic);
        let queued = self
            .inner
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload);
        matches!(tokio::time::timeout(PUBLISH_WAIT, queued).await, Ok(Ok(())))
    }

    /// Publish a typed payload.
    pub async fn send<T: Payload>(
        &self,
        topic: &Topic<T>,
        msg: &T,
        retain: bool,
    ) -> Result<(), BusError> {
        let bytes = msg.encode()?;
        self.publish(topic.as_str(), bytes, retain).await
    }

    /// Publish the retained `offline` status, disconnect, and let the poll task end.
    pub async fn close(&self, task: JoinHandle<()>) {
        self.inner.close.notify_one();
        if tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .is_err()
        {
            tracing::debug!("Bus task did not end within 3 s of close.");
        }
    }
}

impl Inner {
    fn published(&self, topic: &str) {
        *lock(&self.last_publish) = Some((Instant::now(), topic.to_string()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hand pending subscriptions to rumqttc, keeping those its full queue cannot take yet.
fn queue_subscriptions(inner: &Inner) {
    let mut pending = lock(&inner.pending_subs);
    pending.retain(|(filter, qos)| {
        let queued = inner.client.try_subscribe(filter.clone(), *qos).is_ok();
        if queued {
            lock(&inner.sub_ids).queued.push_back(filter.clone());
            inner.subs.send_modify(|(requested, _)| *requested += 1);
        }
        !queued
    });
}

/// Record the broker's answer to the subscription of `filter`; the wait before it is asked
/// for again if it was refused.
fn subscription_answered(inner: &Inner, filter: Option<&str>, failed: bool) -> Option<Duration> {
    let filter = filter?;
    let mut refused = lock(&inner.refused);
    refused.filters.retain(|(f, _)| f != filter);
    if !failed {
        if refused.filters.is_empty() {
            refused.retries.succeeded();
        }
        return None;
    }
    let qos = lock(&inner.routes)
        .iter()
        .find(|r| r.filter == filter)
        .map(|r| r.qos)?;
    refused.filters.push((filter.to_string(), qos));
    Some(refused.retries.failed_exactly())
}

/// After `delay`, ask again for every subscription still refused (if the bus is still there).
async fn retry_refused(inner: std::sync::Weak<Inner>, delay: Duration) {
    tokio::time::sleep(delay).await;
    let Some(inner) = inner.upgrade() else {
        return;
    };
    // Asked for again; they stay in `refused` until the broker says otherwise.
    let again = {
        let mut refused = lock(&inner.refused);
        refused.retrying = false;
        refused.filters.clone()
    };
    if again.is_empty() {
        return;
    }
    lock(&inner.pending_subs).extend(again);
    queue_subscriptions(&inner);
}

/// Hand due sink registrations to rumqttc once the link is up and every subscription is queued
/// (a producer that learns of a group must find its subscriptions in place); those its full
/// queue cannot take now are retried after the next event.
fn queue_registrations(inner: &Inner) {
    // Called after every event: nothing due is the common case, and costs one lock.
    let mut sinks = lock(&inner.sinks);
    if sinks.due.is_empty()
        || !inner.up.load(Ordering::Relaxed)
        || !lock(&inner.pending_subs).is_empty()
    {
        return;
    }
    let Registrations { filters, due } = &mut *sinks;
    due.retain(|group| {
        let registration = SinkRegistration {
            group: group.clone(),
            filters: filters
                .get(group)
                .map(|f| f.iter().cloned().collect())
                .unwrap_or_default(),
            ts_ms: proto::now_ms(),
        };
        let bytes = match registration.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(group = %group, error = %crate::telemetry::chain(&e), "Cannot encode this sink group's registration; producers will not learn to wait for it.");
                return false;
            }
        };
        let topic = Topic::sink_registration(&inner.site, group);
        inner
            .client
            .try_publish(topic.as_str(), QoS::AtLeastOnce, true, bytes)
            .is_err()
    });
}

fn status(id: &Identity, state: ServiceState) -> Status {
    Status {
        service: id.service.clone(),
        instance: id.instance.clone(),
        state,
        version: env!("CARGO_PKG_VERSION").to_string(),
        ts_ms: proto::now_ms(),
        health: None,
    }
}

async fn poll_loop(
    inner: Arc<Inner>,
    mut eventloop: EventLoop,
    conn_tx: watch::Sender<u64>,
    cfg: BusConfig,
    mut reconnect: Retries,
    id: Identity,
    (ready, subscribed): (ReadyFlag, ReadyFlag),
) {
    let status_topic = Topic::status(&inner.site, &id.instance);
    let connected_gauge = Gauge::new(
        "wattbus_bus_connected",
        "1 while connected to the broker.",
        &[("client", id.instance.as_str())],
    );
    // When the current connection's ConnAck came, and the failures before it: a broker that
    // closes the connection on purpose soon after (its ACL refusing a topic this service
    // publishes again on every connection) is not a success that resets the backoff.
    let mut connected: Option<(Instant, u32)> = None;
    let mut epoch = 0u64;
    // The status with the service's core metrics, every STATUS_INTERVAL_S while connected:
    // how a service's health reaches InfluxDB (influx-writer stores it) and Grafana.
    let started = Instant::now();
    let core = Core::of(id.service.as_str());
    let mut health_tick = tokio::time::interval(Duration::from_secs(proto::STATUS_INTERVAL_S));
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            ev = eventloop.poll() => ev,
            () = inner.close.notified() => {
                shut_down(&inner, &mut eventloop, &status_topic, &id).await;
                break;
            }
            _ = health_tick.tick(), if inner.announce => {
                if inner.up.load(Ordering::Relaxed) {
                    publish_health(&inner, &status_topic, &id, &core, started);
                }
                continue;
            }
        };
        if event.is_ok() {
            queue_subscriptions(&inner);
            queue_registrations(&inner);
        }
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = Some((Instant::now(), reconnect.failures()));
                reconnect.succeeded();
                epoch += 1;
                events::bus_connected(id.instance.as_str(), epoch > 1);
                {
                    // Under the routes lock, so a route added meanwhile is either in this
                    // snapshot or adds itself to `pending_subs` after it (lock order: routes,
                    // then pending_subs).
                    let routes = lock(&inner.routes);
                    *lock(&inner.pending_subs) =
                        routes.iter().map(|r| (r.filter.clone(), r.qos)).collect();
                }
                // Every route is asked for again on this connection; what the broker refuses
                // now is refused anew.
                *lock(&inner.refused) = Refused::default();
                subscribed.set(true);
                queue_subscriptions(&inner);
                if inner.announce
                    && let Ok(online) = status(&id, ServiceState::Online).encode()
                    && inner
                        .client
                        .try_publish(status_topic.as_str(), QoS::AtLeastOnce, true, online)
                        .is_err()
                {
                    tracing::debug!("Could not queue the online status.");
                }
                if inner.announce {
                    inner.published(status_topic.as_str());
                }
                ready.set(true);
                inner.up.store(true, Ordering::Relaxed);
                {
                    let mut sinks = lock(&inner.sinks);
                    sinks.due = sinks.filters.keys().cloned().collect();
                }
                queue_registrations(&inner);
                connected_gauge.set(1.0);
                conn_tx.send_replace(epoch);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                route(
                    &inner,
                    &cfg,
                    Message {
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                    },
                )
                .await
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Subscribe(pkid))) => {
                let mut ids = lock(&inner.sub_ids);
                if let Some(filter) = ids.queued.pop_front() {
                    ids.sent.insert(pkid, filter);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                inner.subs.send_modify(|(_, acked)| *acked += 1);
                let filter = lock(&inner.sub_ids).sent.remove(&ack.pkid);
                let failed = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                let retry_in = subscription_answered(&inner, filter.as_deref(), failed);
                if failed {
                    events::subscription_refused(
                        id.service.as_str(),
                        id.instance.as_str(),
                        filter.as_deref(),
                        ack.pkid,
                        retry_in,
                    );
                }
                let mut refused = lock(&inner.refused);
                subscribed.set(refused.filters.is_empty());
                if let Some(delay) = retry_in
                    && !refused.retrying
                {
                    refused.retrying = true;
                    tokio::spawn(retry_refused(Arc::downgrade(&inner), delay));
                }
            }
            Ok(_) => {}
            Err(e) => {
                ready.set(false);
                inner.up.store(false, Ordering::Relaxed);
                connected_gauge.set(0.0);
                *lock(&inner.sub_ids) = SubIds::default();
                // rumqttd sends DISCONNECT (which rumqttc reports as an unexpected packet)
                // when it refuses a publish; a lost connection is an I/O error instead.
                let by_broker = matches!(
                    e,
                    rumqttc::ConnectionError::MqttState(rumqttc::StateError::WrongPacket)
                );
                reconnect.set_failures(failures_after_disconnect(
                    reconnect.failures(),
                    connected.take().map(|(at, before)| (at.elapsed(), before)),
                    by_broker,
                ));
                if by_broker {
                    let last = lock(&inner.last_publish).clone();
                    events::disconnected_by_broker(
                        id.service.as_str(),
                        id.instance.as_str(),
                        last.as_ref()
                            .map(|(at, topic)| (topic.as_str(), at.elapsed())),
                    );
                }
                let first = reconnect.failures() == 0;
                let delay = reconnect.failed();
                events::bus_error(id.service.as_str(), id.instance.as_str(), &e, delay, first);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = inner.close.notified() => break,
                }
            }
        }
    }
    ready.set(false);
    inner.up.store(false, Ordering::Relaxed);
    connected_gauge.set(0.0);
    // Nothing will arrive any more: let every consumer's `recv` end.
    lock(&inner.routes).clear();
}

/// Queue the retained `online` status with the service's health. Not journaled: a status
/// lost to a dropped connection is replaced by the next one.
fn publish_health(
    inner: &Inner,
    status_topic: &Topic<Status>,
    id: &Identity,
    core: &Core,
    started: Instant,
) {
    let status = Status {
        health: Some(core.health(started)),
        ..status(id, ServiceState::Online)
    };
    match status.encode() {
        Ok(bytes) => {
            if inner
                .client
                .try_publish(status_topic.as_str(), QoS::AtLeastOnce, true, bytes)
                .is_ok()
            {
                inner.published(status_topic.as_str());
            } else {
                tracing::debug!("Could not queue the status with the service's health.");
            }
        }
        Err(e) => {
            tracing::debug!(error = %crate::telemetry::chain(&e), "Cannot encode the service's health.")
        }
    }
}

async fn shut_down(
    inner: &Inner,
    eventloop: &mut EventLoop,
    status_topic: &Topic<Status>,
    id: &Identity,
) {
    if inner.announce
        && let Ok(offline) = status(id, ServiceState::Offline).encode()
    {
        let _queued =
            inner
                .client
                .try_publish(status_topic.as_str(), QoS::AtLeastOnce, true, offline);
    }
    let _queued = inner.client.try_disconnect();
    // Poll until the disconnect has gone out (or the link is gone), for at most 2 s.
    let drain = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _timed_out = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// How long a connection must last for the broker's closing it to count as a fresh start
/// of the backoff rather than one more failure.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);

/// The failure count after the link failed, given the count so far (`failures`, 0 once
/// connected), how long the connection had been up and the failures before its ConnAck.
///
/// A broker that closes the connection on purpose (a refused publish, rumqttd's DISCONNECT)
/// within [`STABLE_CONNECTION`] of accepting it will do so again on the next connection, since
/// the service replays the same topic: that counts as one more failure after the ones before
/// the ConnAck, so the retries back off to `reconnect_max_ms` instead of reconnecting every
/// `reconnect_min_ms` for as long as nobody fixes the ACL. Any other end of the link (an I/O
/// error, a broker restart) counts from the connection's own start, as before.
fn failures_after_disconnect(
    failures: u32,
    connection: Option<(Duration, u32)>,
    by_broker: bool,
) -> u32 {
    match connection {
        Some((up_for, before)) if by_broker && up_for < STABLE_CONNECTION => {
            before.saturating_add(failures)
        }
        _ => failures,
    }
}

async fn route(inner: &Inner, cfg: &BusConfig, msg: Message) {
    let targets: Vec<(mpsc::Sender<Message>, Overflow, String)> = {
        let mut routes = inner.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.retain(|r| !r.tx.is_closed());
        routes
            .iter()
            .filter(|r| proto_matches(&r.filter, &msg.topic))
            .map(|r| (r.tx.clone(), r.overflow, r.filter.clone()))
            .collect()
    };
    for (tx, overflow, filter) in targets {
        match tx.try_send(msg.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                let delivered = overflow == Overflow::Wait
                    && tokio::time::timeout(Duration::from_millis(cfg.route_block_ms), tx.send(m))
                        .await
                        .is_ok_and(|r| r.is_ok());
                if !delivered {
                    events::route_overflow(inner.service.as_str(), &filter);
                }
            }
        }
    }
}

fn proto_matches(filter: &str, topic: &str) -> bool {
    proto::topic_matches(filter, topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service whose ACL refuses a topic it replays is closed by the broker right after each
    /// ConnAck: its reconnects must back off as failures do, not restart at the minimum.
    #[test]
    fn a_broker_closing_each_new_connection_on_purpose_makes_the_retries_back_off() {
        let cfg = BusConfig {
            reconnect_min_ms: 100,
            reconnect_max_ms: 60_000,
            ..BusConfig::default()
        };
        let mut reconnect = Retries::new(cfg.reconnect_backoff().unwrap());
        for round in 0..10u32 {
            // ConnAck: the count before it is kept, the count restarts.
            let before = reconnect.failures();
            reconnect.succeeded();
            // DISCONNECT from the broker a moment later.
            reconnect.set_failures(failures_after_disconnect(
                reconnect.failures(),
                Some((Duration::from_millis(50), before)),
                true,
            ));
            assert_eq!(reconnect.failures(), round, "round {round}");
            let nominal = (100u64 << round).min(60_000);
            assert!(reconnect.failed().as_millis() as u64 >= nominal / 2);
        }
        assert!(
            reconnect.failed() >= Duration::from_secs(30),
            "capped at the maximum"
        );
    }

    #[test]
    fn a_link_lost_otherwise_or_after_a_stable_connection_starts_the_backoff_again() {
        // A broker restart (an I/O error) right after connecting: the usual fresh start.
        assert_eq!(
            failures_after_disconnect(0, Some((Duration::from_millis(50), 7)), false),
            0
        );
        // Closed on purpose, but after a long stable connection: a fresh start too.
        assert_eq!(
            failures_after_disconnect(0, Some((STABLE_CONNECTION, 7)), true),
            0
        );
        // Failures while not connected keep counting.
        assert_eq!(failures_after_disconnect(3, None, true), 3);
        assert_eq!(failures_after_disconnect(3, None, false), 3);
    }
}
