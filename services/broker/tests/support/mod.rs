//! What the hostile-client tests share: a broker with one user per role on free loopback
//! ports, well-behaved rumqttc clients, hand-built MQTT packets for hostile ones, the round
//! trip every test ends with, and a watch on panics inside rumqttd.
//!
//! Panics matter even where the tests do not see them: a test binary unwinds, so a panic in a
//! connection's task only ends that connection, but the release build aborts on panic
//! (`panic = "abort"`) and then one panic is the whole process. So every hostile test also
//! asserts that rumqttd did not panic at all.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Mutex, Once};
use std::time::Duration;

use broker::{Config, Role, Started, User};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Long enough for a loaded machine; every wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(10);

pub const PASSWORD: &str = "pw";
pub const SITE: &str = "site-a";

pub fn free_addr() -> SocketAddr {
    // Never the same port twice in one process, and outside the ephemeral range.
    SocketAddr::from((Ipv4Addr::LOCALHOST, wattbus_testkit::free_port()))
}

/// One user per role, named like the services of a deployment; every password is [`PASSWORD`].
pub fn users() -> Vec<User> {
    let mut modbus = User::new("modbus-ingest", PASSWORD, Role::Producer);
    modbus.devices = Some(vec!["we515-1".into()]);
    vec![
        User::new("tools", PASSWORD, Role::Admin),
        User::new("serial-ingest", PASSWORD, Role::Producer),
        modbus,
        User::new("rms-processor", PASSWORD, Role::Processor),
        User::new("influx-writer", PASSWORD, Role::Sink),
        User::new("csv-writer", PASSWORD, Role::Sink),
        User::new("grafana", PASSWORD, Role::Reader),
    ]
}

/// Both listeners on free loopback ports, the users above, no health port.
pub fn config() -> Config {
    Config {
        listen: free_addr(),
        listen_v5: Some(free_addr()),
        users: users(),
        health_listen: None,
        ..Config::default()
    }
}

pub async fn start(config: &Config) -> Started {
    let mut started = broker::start(config).unwrap();
    started.wait_ready(WAIT).await.unwrap();
    started
}

/// A topic under `wattbus/v1/site-a/`.
pub fn topic(rest: &str) -> String {
    format!("wattbus/v1/{SITE}/{rest}")
}

pub fn options(addr: SocketAddr, id: &str, user: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials(user, PASSWORD);
    opts
}

/// A rumqttc client of `user` (client id `id`), connected: its ConnAck has been seen.
pub async fn connected(addr: SocketAddr, id: &str, user: &str) -> (AsyncClient, EventLoop) {
    connected_with(options(addr, id, user)).await
}

pub async fn connected_with(opts: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let first = timeout(WAIT, eventloop.poll()).await.expect("no answer");
    assert!(
        matches!(first, Ok(Event::Incoming(Packet::ConnAck(_)))),
        "expected a ConnAck, got {first:?}"
    );
    (client, eventloop)
}

/// Subscribe and wait for the SUBACK; returns its return codes.
pub async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    filters: &[&str],
) -> Vec<rumqttc::SubscribeReasonCode> {
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
        )
        .await
        .unwrap();
    timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => return ack.return_codes,
                Ok(_) => {}
                Err(e) => panic!("connection ended before the SUBACK: {e}"),
            }
        }
    })
    .await
    .expect("no SUBACK")
}

/// The next publish the event loop yields (topic, payload); `None` if the connection ends or
/// nothing comes within `within`.
pub async fn next_publish(
    eventloop: &mut EventLoop,
    within: Duration,
) -> Option<(String, Vec<u8>)> {
    timeout(within, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    return Some((p.topic, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Publish at QoS 1 and drive the event loop until the broker acknowledges it (`true`) or
/// ends the connection (`false`).
pub async fn publish_acked(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    payload: &str,
) -> bool {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .unwrap();
    timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("neither a PUBACK nor a disconnect")
}

/// A well-behaved client subscribes, publishes and receives its own message: the broker is up
/// and serving. Retried until [`WAIT`], for a broker still tidying up after a hostile client.
pub async fn round_trip(addr: SocketAddr) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = async {
            let id = format!("round-trip-{n}");
            let (client, mut eventloop) = AsyncClient::new(options(addr, &id, "tools"), 10);
            let topic = format!("wattbus/test/round-trip/{n}");
            client.subscribe(&topic, QoS::AtLeastOnce).await.ok()?;
            client
                .publish(&topic, QoS::AtLeastOnce, false, "ping")
                .await
                .ok()?;
            let got = next_publish(&mut eventloop, Duration::from_secs(3)).await?;
            Some(got == (topic, b"ping".to_vec()))
        };
        if attempt.await == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the broker on {addr} no longer serves a publish/subscribe round trip"
        );
    }
}

/// Every panic message whose location is inside rumqttd, since the process started.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Start recording rumqttd's panics (once per process; the default hook still prints).
pub fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().contains("rumqttd"))
            {
                PANICS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(info.to_string());
            }
            default(info);
        }));
    });
}

/// Fails if rumqttd panicked anywhere in this process (in the release build, an abort).
pub fn assert_rumqttd_never_panicked() {
    let panics = PANICS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(panics.is_empty(), "rumqttd panicked: {panics:#?}");
}

/// Hand-built MQTT packets, for clients no library would be.
pub mod raw {
    use super::*;

    /// The remaining-length varint.
    pub fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
    }

    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        remaining_length(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// MQTT 3.1.1 CONNECT (clean session, keep-alive 30 s) with a login and an optional will.
    pub fn connect(client_id: &str, user: &str, will: Option<(&str, &str)>) -> Vec<u8> {
        connect_with(client_id, user, will, 30, 4)
    }

    pub fn connect_with(
        client_id: &str,
        user: &str,
        will: Option<(&str, &str)>,
        keep_alive: u16,
        level: u8,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(level);
        let mut flags = 0b1100_0010;
        if will.is_some() {
            flags |= 0b0000_1100; // will, QoS 1
        }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        string(client_id.as_bytes(), &mut body);
        if let Some((topic, payload)) = will {
            string(topic.as_bytes(), &mut body);
            string(payload.as_bytes(), &mut body);
        }
        string(user.as_bytes(), &mut body);
        string(PASSWORD.as_bytes(), &mut body);
        packet(0x10, &body)
    }

    /// MQTT 5 CONNECT (clean start, no properties) with a login.
    pub fn connect_v5(client_id: &str, user: &str) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(5);
        body.push(0b1100_0010);
        body.extend_from_slice(&30u16.to_be_bytes());
        body.push(0); // properties
        string(client_id.as_bytes(), &mut body);
        string(user.as_bytes(), &mut body);
        string(PASSWORD.as_bytes(), &mut body);
        packet(0x10, &body)
    }

    /// QoS 0 PUBLISH (MQTT 3.1.1).
    pub fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        body.extend_from_slice(payload);
        packet(0x30, &body)
    }

    /// SUBSCRIBE (MQTT 3.1.1) of `filters` at QoS 0.
    pub fn subscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        for f in filters {
            string(f.as_bytes(), &mut body);
            body.push(0);
        }
        packet(0x82, &body)
    }

    pub async fn dial(addr: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Read one packet: (first byte, body). `None` once the broker closed the connection (or
    /// reset it), or after `within`.
    pub async fn read_packet(stream: &mut TcpStream, within: Duration) -> Option<(u8, Vec<u8>)> {
        timeout(within, async {
            let first = stream.read_u8().await.ok()?;
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let byte = stream.read_u8().await.ok()?;
                len |= usize::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
            let mut body = vec![0; len];
            stream.read_exact(&mut body).await.ok()?;
            Some((first, body))
        })
        .await
        .ok()
        .flatten()
    }

    /// Whether the broker closes `stream` within `within` (EOF or reset), reading and
    /// discarding whatever comes first.
    pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        timeout(within, async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Connect and read the CONNACK's return code; `None` if the broker closed the connection
    /// without one.
    pub async fn connack(addr: SocketAddr, connect: &[u8]) -> (TcpStream, Option<u8>) {
        let mut stream = dial(addr).await;
        stream.write_all(connect).await.unwrap();
        let code = match read_packet(&mut stream, WAIT).await {
            Some((0x20, body)) if body.len() >= 2 => Some(body[1]),
            _ => None,
        };
        (stream, code)
    }
}
