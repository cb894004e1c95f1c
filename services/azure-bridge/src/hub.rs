//! The connection to IoT Hub: MQTT 3.1.1 over TLS, as Microsoft documents it for devices
//! ("Communicate with an IoT hub using the MQTT protocol").
//!
//! Our own small client on rumqttc's packet codec rather than rumqttc's event loop: its TLS
//! feature brings rustls-webpki 0.102 (open advisories), and the bridge must tie each packet
//! id to its outbox record, send in order within a window and a rate, drop nothing it was
//! given on a reconnect (rumqttc clears its queue without a saved session), and reconnect on
//! its own schedule (a new SAS token at 80 % of its lifetime).
//!
//! One [`run`] loop: connect (TCP, TLS, CONNECT with the device's SAS token or its X.509
//! certificate, a persistent session), subscribe cloud-to-device messages, direct methods and
//! twin responses (3 of the hub's 5 subscriptions), then send the outbox in order, QoS 1, at
//! most `inflight` unacknowledged and `max_messages_per_second`; trim it as the hub
//! acknowledges. A refused login is an ERROR naming what to check, retried after
//! `auth_retry_ms` doubling to an hour; anything else is retried with jittered backoff.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use runtime::backoff::Retries;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::config::HubPlan;
use crate::events::Events;
use crate::outbox::{Outbox, Stored};
use crate::sas::{Credential, url_encode};

/// Largest packet accepted from the hub (a C2D message is at most 64 KB; a method payload 128 KB).
const MAX_INCOMING: usize = 256 * 1024 + 1024;
/// Largest packet sent (a message of 256 KB plus its topic).
const MAX_OUTGOING: usize = 256 * 1024 + 4096;
/// Connecting (TCP, TLS, CONNECT, CONNACK) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that does not finish in this long means the connection is dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Before a planned reconnect (token renewal, shutdown), unacknowledged messages get this
/// long to be acknowledged.
const DRAIN: Duration = Duration::from_secs(10);
/// Messages read from the outbox at a time.
const READ_BATCH_BYTES: u64 = 1024 * 1024;

/// Something the cloud sent this device.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// Something to send the cloud besides telemetry (method responses, twin patches): QoS 0, as
/// the hub documents for those topics; lost with the connection.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What the loop shares with the rest of the bridge.
pub struct Link {
    pub outbox: Arc<Mutex<Outbox>>,
    /// Woken when a message is appended.
    pub appended: Arc<Notify>,
    /// Where cloud-to-device messages, method calls and twin responses go.
    pub incoming: mpsc::Sender<Incoming>,
    pub outgoing: mpsc::Receiver<Outgoing>,
    /// The site, as an application property on every message.
    pub site: String,
    /// Messages whose newest reading is older than this are dropped, not sent.
    pub ttl: Duration,
}

/// The hub's topics for one device.
pub fn telemetry_topic(device: &str, id: &str, site: &str) -> String {
    format!(
        "devices/{device}/messages/events/$.mid={}&$.ct=application%2Fjson&$.ce=utf-8&site={}&kind=readings&format=wattbus-1",
        url_encode(id),
        url_encode(site)
    )
}

pub fn c2d_filter(device: &str) -> String {
    format!("devices/{device}/messages/devicebound/#")
}

pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";
pub const TWIN_RESPONSES_FILTER: &str = "$iothub/twin/res/#";

/// Why a session ended.
#[derive(Debug)]
enum End {
    Shutdown,
    /// The token is due for renewal: reconnect at once.
    Renew,
    /// The hub refused the login.
    Refused(ConnectReturnCode),
    Lost(String),
}

/// Messages sent and not yet acknowledged, in order. Pure.
#[derive(Debug, Default)]
pub struct Window {
    entries: VecDeque<Entry>,
    next_pkid: u16,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// 0 for a message not sent (expired): acknowledged already.
    pkid: u16,
    seq: u64,
    acked: bool,
}

impl Window {
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| !e.acked).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A packet id not in use (1..=65535).
    pub fn sent(&mut self, seq: u64) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let id = self.next_pkid;
            if !self.entries.iter().any(|e| e.pkid == id && !e.acked) {
                self.entries.push_back(Entry {
                    pkid: id,
                    seq,
                    acked: false,
                });
                return id;
            }
        }
    }

    /// A message not sent at all (expired) still holds its place in the order.
    pub fn skipped(&mut self, seq: u64) {
        self.entries.push_back(Entry {
            pkid: 0,
            seq,
            acked: true,
        });
    }

    /// The hub acknowledged `pkid`. Returns the seq through which every message is done, if
    /// that moved (what the outbox may trim), and whether the packet id was ours.
    pub fn acked(&mut self, pkid: u16) -> (Option<u64>, bool) {
        let ours = match self.entries.iter_mut().find(|e| e.pkid == pkid && !e.acked) {
            Some(e) => {
                e.acked = true;
                true
            }
            None => false,
        };
        (self.drain_done(), ours)
    }

    fn drain_done(&mut self) -> Option<u64> {
        let mut through = None;
        while self.entries.front().is_some_and(|e| e.acked) {
            through = self.entries.pop_front().map(|e| e.seq);
        }
        through
    }

    /// A connection ended: what was not acknowledged is sent again on the next one.
    pub fn reset(&mut self) -> Option<u64> {
        let done = self.drain_done();
        self.entries.clear();
        done
    }

    /// The last seq handed to the wire (or skipped).
    pub fn last(&self) -> Option<u64> {
        self.entries.back().map(|e| e.seq)
    }
}

/// A token bucket: `rate` per second, bursts up to `rate`.
#[derive(Debug)]
struct Rate {
    per_s: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(per_s: u32) -> Self {
        Self {
            per_s: f64::from(per_s),
            tokens: f64::from(per_s),
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s)
            .min(self.per_s.max(1.0));
        self.at = now;
    }

    /// Take one; or how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_s))
        }
    }
}

/// The TLS settings: the system's roots (and `ca_file`), the device's certificate for X.509.
pub fn tls_config(plan: &HubPlan) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let extra: Vec<CertificateDer<'static>> = match &plan.ca_pem {
        None => Vec::new(),
        Some(pem) => CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ca_file: {e}"))?,
    };
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| format!("cannot load the system's root certificates: {e}"))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match &plan.client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("certificate_file: {e}"))?;
            if chain.is_empty() {
                return Err("certificate_file holds no certificate".into());
            }
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("private_key_file: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("certificate_file/private_key_file: {e}"))?
        }
    };
    Ok(Arc::new(config))
}

/// Run until `shutdown`: connect, send, reconnect.
pub async fn run(plan: HubPlan, mut link: Link, events: Arc<Events>, shutdown: runtime::Shutdown) {
    let tls = match tls_config(&plan) {
        Ok(t) => t,
        Err(e) => {
            events.tls_unusable(&e);
            shutdown.wait().await;
            return;
        }
    };
    let mut retries = Retries::new(plan.reconnect);
    let mut refusals = Retries::new(plan.auth_retry);
    let mut window = Window::default();
    loop {
        if shutdown.is_requested() {
            return;
        }
        let end = session(&plan, &tls, &mut link, &mut window, &events, &shutdown).await;
        if let Some(through) = window.reset() {
            trim(&link, through, &events).await;
        }
        let wait = match end {
            End::Shutdown => return,
            End::Renew => {
                retries.succeeded();
                refusals.succeeded();
                events.token_renewed();
                continue;
            }
            End::Refused(code) => {
                let wait = refusals.failed();
                events.refused(&plan, code, wait);
                wait
            }
            End::Lost(why) => {
                let wait = retries.failed();
                events.connection_lost(&plan, &why, wait);
                wait
            }
        };
        expire_front(&link, &events).await;
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// While the hub is away: drop the messages at the front of the outbox whose readings are
/// older than the TTL (ERROR and counter each), so an outage longer than the TTL does not
/// hold them until the next connection.
async fn expire_front(link: &Link, events: &Events) {
    let outbox = link.outbox.clone();
    let ttl_ms = i64::try_from(link.ttl.as_millis()).unwrap_or(i64::MAX);
    let expired = tokio::task::spawn_blocking(move || {
        let mut o = outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = proto::now_ms();
        // Ids and counts only: an outage of weeks must not read the outbox into memory.
        let mut gone = Vec::new();
        loop {
            let batch = o.read_after(0, 64, READ_BATCH_BYTES)?;
            let mut fresh = batch.is_empty();
            for m in batch {
                if m.meta.newest_ms == i64::MAX || now.saturating_sub(m.meta.newest_ms) <= ttl_ms {
                    fresh = true;
                    break;
                }
                o.trim_through(m.seq)?;
                gone.push(Stored {
                    body: Vec::new(),
                    ..m
                });
            }
            if fresh {
                return Ok::<_, runtime::journal::JournalError>((gone, o.records(), o.bytes()));
            }
        }
    })
    .await;
    match expired {
        Ok(Ok((gone, records, bytes))) => {
            for m in &gone {
                events.expired(m);
            }
            events.outbox(records, bytes);
        }
        Ok(Err(e)) => events.outbox_failed(&e),
        Err(e) => events.task_failed("outbox expiry", &e),
    }
}

async fn trim(link: &Link, through: u64, events: &Events) {
    let outbox = link.outbox.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut o = outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        o.trim_through(through)?;
        Ok::<_, runtime::journal::JournalError>((o.records(), o.bytes()))
    })
    .await;
    match done {
        Ok(Ok((records, bytes))) => events.outbox(records, bytes),
        Ok(Err(e)) => events.outbox_failed(&e),
        Err(e) => events.task_failed("outbox trim", &e),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn open(plan: &HubPlan, tls: &Arc<rustls::ClientConfig>) -> Result<Box<dyn Stream>, String> {
    let tcp = tokio::net::TcpStream::connect((plan.host.as_str(), plan.port))
        .await
        .map_err(|e| format!("cannot reach {}:{}: {e}", plan.host, plan.port))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(plan.host.clone())
        .map_err(|e| format!("{}: {e}", plan.host))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}:{} failed: {e}", plan.host, plan.port))?;
    match plan.transport {
        crate::config::Transport::Mqtt => Ok(Box::new(stream)),
        crate::config::Transport::Websocket => {
            // Microsoft's path; with a SAS token the hub is told not to ask for a certificate.
            let path = match plan.device.credential {
                Credential::X509 => "/$iothub/websocket",
                _ => "/$iothub/websocket?iothub-no-client-cert=true",
            };
            let ws = crate::ws::connect(stream, &plan.host, path)
                .await
                .map_err(|e| format!("WebSocket upgrade with {}:{}: {e}", plan.host, plan.port))?;
            Ok(Box::new(ws))
        }
    }
}

/// Seconds since the epoch, for token expiry.
fn now_s() -> u64 {
    u64::try_from(proto::now_ms() / 1000).unwrap_or(0)
}

async fn write(stream: &mut Box<dyn Stream>, packet: &Packet) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(packet.size() + 8);
    packet
        .write(&mut buf, MAX_OUTGOING)
        .map_err(|e| format!("cannot encode a packet: {e}"))?;
    match tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&buf).await?;
        stream.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!(
            "a write did not finish in {} s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

/// The next packet in `buf`, reading more as needed. Cancel-safe (`read_buf` is).
async fn read(stream: &mut Box<dyn Stream>, buf: &mut BytesMut) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, MAX_INCOMING) {
            Ok(p) => return Ok(p),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("the hub sent what is not MQTT 3.1.1: {e}")),
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err("the hub closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

async fn session(
    plan: &HubPlan,
    tls: &Arc<rustls::ClientConfig>,
    link: &mut Link,
    window: &mut Window,
    events: &Events,
    shutdown: &runtime::Shutdown,
) -> End {
    let device = plan.device.device_id.clone();
    let expiry = now_s() + plan.token_ttl.as_secs();
    let mut connect = Connect::new(device.clone());
    // X.509: the certificate is the credential; an empty password is not sent at all.
    connect.keep_alive = u16::try_from(plan.keep_alive.as_secs()).unwrap_or(60);
    // A persistent session: the hub keeps cloud-to-device messages for us while we are away.
    connect.clean_session = false;
    match &plan.device.credential {
        Credential::X509 => {
            connect.set_login(plan.device.username(), "");
        }
        _ => {
            let password = plan.device.password(expiry).unwrap_or_default();
            connect.set_login(plan.device.username(), password);
        }
    }
    let mut buf = BytesMut::with_capacity(8192);
    let opened = tokio::select! {
        () = shutdown.wait() => return End::Shutdown,
        r = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut stream = open(plan, tls).await?;
            write(&mut stream, &Packet::Connect(connect)).await?;
            let ack = read(&mut stream, &mut buf).await?;
            Ok::<_, String>((stream, ack))
        }) => r,
    };
    let (mut stream, ack) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return End::Lost(e),
        Err(_) => return End::Lost(format!("no CONNACK within {} s", CONNECT_TIMEOUT.as_secs())),
    };
    match ack {
        Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            session_present,
        }) => events.connected(plan, session_present, expiry),
        Packet::ConnAck(ConnAck { code, .. }) => return End::Refused(code),
        other => return End::Lost(format!("the hub answered CONNECT with {other:?}")),
    }
    let connected_at = Instant::now();
    // Renew at 80 % of the token's life (X.509 has no token: renew never).
    let renew_at = match plan.device.credential {
        Credential::X509 => None,
        _ => Some(connected_at + plan.token_ttl.mul_f64(0.8)),
    };
    let subscribe = Subscribe::new_many([
        rumqttc::mqttbytes::v4::SubscribeFilter::new(c2d_filter(&device), QoS::AtLeastOnce),
        rumqttc::mqttbytes::v4::SubscribeFilter::new(METHODS_FILTER.into(), QoS::AtMostOnce),
        rumqttc::mqttbytes::v4::SubscribeFilter::new(TWIN_RESPONSES_FILTER.into(), QoS::AtMostOnce),
    ]);
    let mut subscribe = subscribe;
    subscribe.pkid = 65535;
    if let Err(e) = write(&mut stream, &Packet::Subscribe(subscribe)).await {
        return End::Lost(e);
    }
    let mut rate = Rate::new(plan.rate);
    let mut pending: VecDeque<Stored> = VecDeque::new();
    let mut last_sent = Instant::now();
    let mut last_heard = Instant::now();
    let mut ping_out = false;
    let mut draining: Option<(Instant, End)> = None;
    let mut exhausted = false;
    loop {
        // Done draining: every message acknowledged, or the drain ran out.
        if let Some((until, _)) = &draining
            && (window.is_empty() || Instant::now() >= *until)
        {
            let _ = write(&mut stream, &Packet::Disconnect).await;
            let (_, end) = draining.take().unwrap_or((Instant::now(), End::Renew));
            return end;
        }
        // Fill the queue of messages to send from the outbox.
        if draining.is_none() && pending.is_empty() && !exhausted && window.len() < plan.inflight {
            let after = window.last().unwrap_or(0);
            let outbox = link.outbox.clone();
            let limit = plan.inflight;
            let read = tokio::task::spawn_blocking(move || {
                let o = outbox
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                o.read_after(after, limit, READ_BATCH_BYTES)
            })
            .await;
            match read {
                Ok(Ok(v)) => {
                    exhausted = v.is_empty();
                    pending.extend(v);
                }
                Ok(Err(e)) => {
                    events.outbox_failed(&e);
                    exhausted = true;
                }
                Err(e) => {
                    events.task_failed("outbox read", &e);
                    exhausted = true;
                }
            }
        }
        // Send what the window and the rate allow.
        let mut rate_wait = None;
        while draining.is_none() && window.len() < plan.inflight {
            let Some(m) = pending.front() else { break };
            let age_ms = proto::now_ms().saturating_sub(m.meta.newest_ms);
            if m.meta.newest_ms != i64::MAX
                && u128::try_from(age_ms).unwrap_or(0) > link.ttl.as_millis()
            {
                let m = pending.pop_front();
                if let Some(m) = m {
                    events.expired(&m);
                    window.skipped(m.seq);
                }
                continue;
            }
            if let Err(wait) = rate.take() {
                rate_wait = Some(wait);
                break;
            }
            let Some(m) = pending.pop_front() else { break };
            let mut publish = Publish::new(
                telemetry_topic(&device, &m.id, &link.site),
                QoS::AtLeastOnce,
                m.body,
            );
            publish.pkid = window.sent(m.seq);
            if let Err(e) = write(&mut stream, &Packet::Publish(publish)).await {
                return End::Lost(e);
            }
            events.sent(m.meta.readings);
            last_sent = Instant::now();
        }
        if let Some(through) = window.drain_done() {
            trim(link, through, events).await;
        }
        let keep_alive = plan.keep_alive;
        let ping_at = last_sent.max(last_heard) + keep_alive;
        let dead_at = last_heard + keep_alive.mul_f64(1.5);
        let renew = renew_at.filter(|_| draining.is_none());
        let rate_at = rate_wait.map(|w| Instant::now() + w);
        let drain_until = draining.as_ref().map(|(u, _)| *u);
        tokio::select! {
            () = shutdown.wait(), if draining.is_none() => {
                draining = Some((Instant::now() + DRAIN.min(Duration::from_secs(3)), End::Shutdown));
            }
            () = tokio::time::sleep_until(renew.unwrap_or(connected_at)), if renew.is_some() => {
                draining = Some((Instant::now() + DRAIN, End::Renew));
            }
            () = tokio::time::sleep_until(drain_until.unwrap_or(connected_at)), if drain_until.is_some() => {}
            () = link.appended.notified(), if exhausted => {
                exhausted = false;
            }
            () = tokio::time::sleep_until(rate_at.unwrap_or(connected_at)), if rate_at.is_some() => {}
            () = tokio::time::sleep_until(ping_at), if !ping_out => {
                if let Err(e) = write(&mut stream, &Packet::PingReq).await {
                    return End::Lost(e);
                }
                ping_out = true;
                last_sent = Instant::now();
            }
            () = tokio::time::sleep_until(dead_at) => {
                return End::Lost(format!("nothing from the hub for {} s", keep_alive.mul_f64(1.5).as_secs()));
            }
            Some(out) = link.outgoing.recv() => {
                let p = Publish::new(out.topic, QoS::AtMostOnce, out.payload);
                if let Err(e) = write(&mut stream, &Packet::Publish(p)).await {
                    return End::Lost(e);
                }
            }
            packet = read(&mut stream, &mut buf) => {
                let packet = match packet {
                    Ok(p) => p,
                    Err(e) => return End::Lost(e),
                };
                last_heard = Instant::now();
                match packet {
                    Packet::PubAck(PubAck { pkid }) => {
                        let (through, ours) = window.acked(pkid);
                        if !ours {
                            events.unknown_ack(pkid);
                        }
                        if let Some(through) = through {
                            trim(link, through, events).await;
                        }
                    }
                    Packet::PingResp => ping_out = false,
                    Packet::SubAck(ack) => {
                        if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                            events.subscription_refused(&ack.return_codes);
                        }
                    }
                    Packet::Publish(p) => {
                        let (qos, pkid) = (p.qos, p.pkid);
                        let msg = Incoming { topic: p.topic, payload: p.payload };
                        if link.incoming.try_send(msg).is_err() {
                            // Not acknowledged: the hub sends a cloud-to-device message again.
                            events.incoming_dropped();
                            continue;
                        }
                        if qos == QoS::AtLeastOnce
                            && let Err(e) = write(&mut stream, &Packet::PubAck(PubAck::new(pkid))).await
                        {
                            return End::Lost(e);
                        }
                    }
                    Packet::Disconnect => return End::Lost("the hub sent DISCONNECT".into()),
                    other => events.unexpected_packet(&format!("{other:?}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_is_trimmed_only_through_what_is_acknowledged_in_order() {
        let mut w = Window::default();
        let a = w.sent(10);
        let b = w.sent(11);
        w.skipped(12);
        let c = w.sent(13);
        assert_eq!(w.len(), 3);
        assert_eq!(w.acked(b), (None, true));
        assert_eq!(w.acked(a), (Some(12), true));
        assert_eq!(
            w.acked(a),
            (None, false),
            "a repeated PUBACK is not ours any more"
        );
        assert_eq!(w.last(), Some(13));
        assert_eq!(w.reset(), None);
        assert_eq!(
            w.last(),
            None,
            "after a reconnect everything unacknowledged is sent again"
        );
        let _ = c;
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_use() {
        let mut w = Window {
            next_pkid: 65534,
            ..Window::default()
        };
        assert_eq!(w.sent(1), 65535);
        assert_eq!(w.sent(2), 1);
    }

    #[test]
    fn the_topic_carries_the_documented_property_bag() {
        assert_eq!(
            telemetry_topic("pi-1", "ab-7", "home"),
            "devices/pi-1/messages/events/$.mid=ab-7&$.ct=application%2Fjson&$.ce=utf-8&site=home&kind=readings&format=wattbus-1"
        );
    }
}
