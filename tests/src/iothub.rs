//! A stand-in for Azure IoT Hub's MQTT endpoint, for azure-bridge's tests: there is no IoT
//! Hub emulator (azure-iot-sdk-c #138), so this plays the hub as Microsoft documents it
//! ("Communicate with an IoT hub using the MQTT protocol", "Control access to IoT Hub with
//! SAS"), independently of azure-bridge's own code:
//!
//! - TLS only (a CA made by openssl for the test); MQTT 3.1.1 (rumqttc's packet codec).
//! - CONNECT: the client id must be a known device, the username
//!   `{host}/{device}/?api-version=2021-04-12`, the password a SAS token for
//!   `{host}/devices/{device}` signed with that device's key and not expired; otherwise CONNACK
//!   5 (not authorized). The connection is closed when the token expires.
//! - One connection per device: a new one closes the old.
//! - A QoS 2 publish closes the connection; so does a publish outside the device's topics.
//! - At most 5 subscriptions per connection (more get SUBACK failure).
//! - Telemetry (`devices/{id}/messages/events/…`, QoS 0/1) is recorded and PUBACKed;
//!   cloud-to-device messages, direct-method calls and twin requests work as documented.
//! - It can be taken down (every connection closed, new ones refused) and brought back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// A message a device sent.
#[derive(Debug, Clone)]
pub struct Received {
    pub device: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A refused or closed connection, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    Connected { device: String, clean_session: bool },
    Refused { device: String, why: String },
    Closed { device: String, why: String },
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    events: Vec<HubEvent>,
    /// Per device: where to send it packets, and a way to close its connection.
    connections: HashMap<String, (mpsc::Sender<Packet>, u64)>,
    next_conn: u64,
    method_waiters: HashMap<String, oneshot::Sender<(u16, serde_json::Value)>>,
    twin_reported: HashMap<String, serde_json::Value>,
    twin_version: u64,
}

/// The fake hub (see the module doc).
pub struct FakeHub {
    pub port: u16,
    pub host_name: String,
    keys: HashMap<String, Vec<u8>>,
    state: Arc<Mutex<State>>,
    up: watch::Sender<bool>,
    pub ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A CA and a server certificate for localhost, made by openssl.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (tests/run.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("hub.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )
    .unwrap();
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ca.key",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=wattbus test hub CA",
        "-out",
        "ca.csr",
    ]);
    run(&[
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "2", "-extfile", "ca.ext",
        "-out", "ca.pem",
    ]);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "hub.key",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "hub.key",
        "-subj",
        "/CN=localhost",
        "-out",
        "hub.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "hub.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "hub.ext",
        "-out",
        "hub.pem",
    ]);
}

/// `urllib.parse.quote(s, safe="")`.
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl FakeHub {
    /// A hub named `{name}.azure-devices.net` that knows `devices` (id, base64 key), up.
    pub async fn start(name: &str, devices: &[(&str, &str)]) -> FakeHub {
        let dir = tempfile::tempdir().unwrap();
        certificates(dir.path());
        let _ = rustls::crypto::ring::default_provider().install_default();
        use rustls::pki_types::pem::PemObject as _;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("hub.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(dir.path().join("hub.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let keys: HashMap<String, Vec<u8>> = devices
            .iter()
            .map(|(d, k)| {
                (
                    d.to_string(),
                    base64::engine::general_purpose::STANDARD.decode(k).unwrap(),
                )
            })
            .collect();
        let (up, up_rx) = watch::channel(true);
        let hub = FakeHub {
            port,
            host_name: format!("{name}.azure-devices.net"),
            keys,
            state: Arc::default(),
            up,
            ca_file: dir.path().join("ca.pem"),
            _dir: dir,
        };
        let ctx = Ctx {
            host: hub.host_name.clone(),
            keys: hub.keys.clone(),
            state: hub.state.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                if !*up_rx.borrow() {
                    drop(tcp);
                    continue;
                }
                let (acceptor, ctx, up_rx) = (acceptor.clone(), ctx.clone(), up_rx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, peer, ctx, up_rx).await;
                    }
                });
            }
        });
        hub
    }

    /// A connection string for `device`.
    pub fn connection_string(&self, device: &str, key_b64: &str) -> String {
        format!(
            "HostName={};DeviceId={device};SharedAccessKey={key_b64}",
            self.host_name
        )
    }

    /// Take the hub down (every connection closed, new ones closed at once) or bring it back.
    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn events(&self) -> Vec<HubEvent> {
        self.state.lock().unwrap().events.clone()
    }

    pub fn twin_reported(&self, device: &str) -> Option<serde_json::Value> {
        self.state
            .lock()
            .unwrap()
            .twin_reported
            .get(device)
            .cloned()
    }

    /// Call a direct method; the device's answer `(status, payload)`, or `None` when the
    /// device is not connected or does not answer within `timeout`.
    pub async fn invoke_method(
        &self,
        device: &str,
        method: &str,
        payload: serde_json::Value,
        timeout: Duration,
    ) -> Option<(u16, serde_json::Value)> {
        let rid = format!("{:x}", rand_u64());
        let (tx, rx) = oneshot::channel();
        let conn = {
            let mut s = self.state.lock().unwrap();
            s.method_waiters.insert(rid.clone(), tx);
            s.connections.get(device).map(|(c, _)| c.clone())?
        };
        let p = Publish::new(
            format!("$iothub/methods/POST/{method}/?$rid={rid}"),
            QoS::AtMostOnce,
            payload.to_string(),
        );
        conn.send(Packet::Publish(p)).await.ok()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }

    /// Send a cloud-to-device message (QoS 1) with message id `mid`.
    pub async fn send_c2d(&self, device: &str, mid: &str, payload: serde_json::Value) -> bool {
        let conn = self
            .state
            .lock()
            .unwrap()
            .connections
            .get(device)
            .map(|(c, _)| c.clone());
        let Some(conn) = conn else { return false };
        let mut p = Publish::new(
            format!(
                "devices/{device}/messages/devicebound/%24.mid={mid}&%24.to=%2Fdevices%2F{device}%2Fmessages%2FdeviceBound"
            ),
            QoS::AtLeastOnce,
            payload.to_string(),
        );
        p.pkid = 7;
        conn.send(Packet::Publish(p)).await.is_ok()
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_s());
    h.finish()
}

#[derive(Clone)]
struct Ctx {
    host: String,
    keys: HashMap<String, Vec<u8>>,
    state: Arc<Mutex<State>>,
}

impl Ctx {
    fn event(&self, e: HubEvent) {
        self.state.lock().unwrap().events.push(e);
    }

    /// The documented check of a SAS token; `Err(why)` or the token's expiry.
    fn check_login(&self, client_id: &str, username: &str, password: &str) -> Result<u64, String> {
        let key = self.keys.get(client_id).ok_or("unknown device id")?;
        let want_user = format!("{}/{client_id}/?api-version=2021-04-12", self.host);
        if username != want_user {
            return Err(format!("username {username:?}, expected {want_user:?}"));
        }
        let rest = password
            .strip_prefix("SharedAccessSignature ")
            .ok_or("the password is not a SharedAccessSignature")?;
        let mut parts: HashMap<&str, &str> = HashMap::new();
        for kv in rest.split('&') {
            let (k, v) = kv.split_once('=').ok_or("a SAS part is not key=value")?;
            parts.insert(k, v);
        }
        let sr = parts.get("sr").ok_or("no sr")?;
        let se: u64 = parts
            .get("se")
            .ok_or("no se")?
            .parse()
            .map_err(|_| "se is not a number")?;
        let sig = parts.get("sig").ok_or("no sig")?;
        let want_sr = quote(&format!("{}/devices/{client_id}", self.host));
        if *sr != want_sr {
            return Err(format!("sr {sr:?}, expected {want_sr:?}"));
        }
        if se <= now_s() {
            return Err("the token has expired".into());
        }
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            format!("{want_sr}\n{se}").as_bytes(),
        );
        let want_sig = quote(&base64::engine::general_purpose::STANDARD.encode(mac.as_ref()));
        if *sig != want_sig {
            return Err("the signature does not match the device's key".into());
        }
        Ok(se)
    }
}

async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    _peer: SocketAddr,
    ctx: Ctx,
    mut up: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::new();
    let Some(Packet::Connect(connect)) = read_packet(&mut tls, &mut buf).await else {
        return;
    };
    let device = connect.client_id.clone();
    let (user, pass) = connect
        .login
        .as_ref()
        .map(|l| (l.username.clone(), l.password.clone()))
        .unwrap_or_default();
    let expiry = match ctx.check_login(&device, &user, &pass) {
        Ok(se) => se,
        Err(why) => {
            ctx.event(HubEvent::Refused {
                device: device.clone(),
                why,
            });
            let _ = write_packet(
                &mut tls,
                &Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
            )
            .await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Packet>(64);
    let me = {
        let mut s = ctx.state.lock().unwrap();
        s.next_conn += 1;
        let me = s.next_conn;
        // One connection per device: the old one is closed (its sender dropped).
        s.connections.insert(device.clone(), (tx, me));
        s.events.push(HubEvent::Connected {
            device: device.clone(),
            clean_session: connect.clean_session,
        });
        me
    };
    if write_packet(
        &mut tls,
        &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    )
    .await
    .is_err()
    {
        return;
    }
    let expires = tokio::time::Instant::now() + Duration::from_secs(expiry.saturating_sub(now_s()));
    let mut subscriptions = 0usize;
    let close = |why: String| HubEvent::Closed {
        device: device.clone(),
        why,
    };
    let why = loop {
        tokio::select! {
            _ = up.changed() => {
                if !*up.borrow() {
                    break "the hub went down".to_string();
                }
            }
            () = tokio::time::sleep_until(expires) => break "the SAS token expired".into(),
            out = rx.recv() => match out {
                Some(p) => {
                    if write_packet(&mut tls, &p).await.is_err() {
                        break "write failed".into();
                    }
                }
                None => break "another connection with this device id".into(),
            },
            p = read_packet(&mut tls, &mut buf) => {
                let Some(p) = p else { break "the device closed the connection".into() };
                match p {
                    Packet::Publish(p) => {
                        if p.qos == QoS::ExactlyOnce {
                            break "QoS 2 publish".into();
                        }
                        let events_prefix = format!("devices/{device}/messages/events/");
                        if p.topic.starts_with(&events_prefix) {
                            ctx.state.lock().unwrap().received.push(Received {
                                device: device.clone(),
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                            });
                        } else if let Some(rest) = p.topic.strip_prefix("$iothub/methods/res/") {
                            let (status, q) = rest.split_once("/?$rid=").unwrap_or(("0", ""));
                            let body = serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                            if let Some(w) = ctx.state.lock().unwrap().method_waiters.remove(q) {
                                let _ = w.send((status.parse().unwrap_or(0), body));
                            }
                        } else if let Some(q) = p.topic.strip_prefix("$iothub/twin/PATCH/properties/reported/?$rid=") {
                            let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                            let version = {
                                let mut s = ctx.state.lock().unwrap();
                                s.twin_version += 1;
                                s.twin_reported.insert(device.clone(), body);
                                s.twin_version
                            };
                            let r = Publish::new(format!("$iothub/twin/res/204/?$rid={q}&$version={version}"), QoS::AtMostOnce, Vec::new());
                            if write_packet(&mut tls, &Packet::Publish(r)).await.is_err() {
                                break "write failed".into();
                            }
                        } else {
                            break format!("publish to {:?}, not a device topic", p.topic);
                        }
                        if p.qos == QoS::AtLeastOnce
                            && write_packet(&mut tls, &Packet::PubAck(PubAck::new(p.pkid))).await.is_err()
                        {
                            break "write failed".into();
                        }
                    }
                    Packet::Subscribe(s) => {
                        let codes = s
                            .filters
                            .iter()
                            .map(|f| {
                                subscriptions += 1;
                                if subscriptions > 5 {
                                    SubscribeReasonCode::Failure
                                } else {
                                    SubscribeReasonCode::Success(if f.qos == QoS::ExactlyOnce { QoS::AtLeastOnce } else { f.qos })
                                }
                            })
                            .collect();
                        if write_packet(&mut tls, &Packet::SubAck(SubAck::new(s.pkid, codes))).await.is_err() {
                            break "write failed".into();
                        }
                    }
                    Packet::PingReq => {
                        if write_packet(&mut tls, &Packet::PingResp).await.is_err() {
                            break "write failed".into();
                        }
                    }
                    Packet::PubAck(_) => {}
                    Packet::Disconnect => break "DISCONNECT".into(),
                    other => break format!("unexpected {other:?}"),
                }
            }
        }
    };
    {
        let mut s = ctx.state.lock().unwrap();
        if s.connections.get(&device).is_some_and(|(_, id)| *id == me) {
            s.connections.remove(&device);
        }
        s.events.push(close(why));
    }
    let _ = tls.shutdown().await;
}

async fn read_packet<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Option<Packet> {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return Some(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn write_packet<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    p: &Packet,
) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    p.write(&mut b, 1 << 20)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    s.write_all(&b).await?;
    s.flush().await
}
