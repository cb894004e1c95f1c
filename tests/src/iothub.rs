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
    /// MQTT over WebSocket (`/$iothub/websocket`, subprotocol `mqtt`), as the hub serves it on
    /// 443.
    pub ws_port: u16,
    pub host_name: String,
    keys: HashMap<String, Vec<u8>>,
    state: Arc<Mutex<State>>,
    up: watch::Sender<bool>,
    pub ca_file: std::path::PathBuf,
    /// [`X509_DEVICE`]'s certificate and key (PEM).
    pub device_cert: std::path::PathBuf,
    pub device_key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A CA, a server certificate for localhost and [`X509_DEVICE`]'s client certificate (CN = its
/// device id), made by openssl: `ca.pem`, `hub.pem`/`hub.key`, `device.pem`/`device.key`.
pub fn certificates(dir: &Path) {
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
    let key = |name: &str| {
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ])
    };
    let request = |name: &str, cn: &str| {
        key(name);
        run(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &format!("{name}.csr"),
        ]);
    };
    let issue = |name: &str, ext: &str| {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    };
    request("ca", "wattbus test hub CA");
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )
    .unwrap();
    run(&[
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "2", "-extfile", "ca.ext",
        "-out", "ca.pem",
    ]);
    request("hub", "localhost");
    issue(
        "hub",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    request("device", X509_DEVICE);
    issue(
        "device",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
}

/// The device the hub knows by its certificate's thumbprint (IoT Hub's "X.509 self-signed /
/// thumbprint" authentication): `device_cert` and `device_key` are its files.
pub const X509_DEVICE: &str = "pi-x509";

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
        // A client certificate is asked for and checked against the test CA, but not required:
        // SAS devices send none.
        let mut roots = rustls::RootCertStore::empty();
        for c in
            rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("ca.pem")).unwrap()
        {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let device_der =
            rustls::pki_types::CertificateDer::pem_file_iter(dir.path().join("device.pem"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
        let thumbprint = ring::digest::digest(&ring::digest::SHA256, &device_der)
            .as_ref()
            .to_vec();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(clients)
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ws_listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let ws_port = ws_listener.local_addr().unwrap().port();
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
            ws_port,
            host_name: format!("{name}.azure-devices.net"),
            keys,
            state: Arc::default(),
            up,
            ca_file: dir.path().join("ca.pem"),
            device_cert: dir.path().join("device.pem"),
            device_key: dir.path().join("device.key"),
            _dir: dir,
        };
        let ctx = Ctx {
            host: hub.host_name.clone(),
            keys: hub.keys.clone(),
            thumbprint,
            state: hub.state.clone(),
        };
        tokio::spawn(accept(
            ws_listener,
            true,
            acceptor.clone(),
            ctx.clone(),
            up_rx.clone(),
        ));
        tokio::spawn(accept(listener, false, acceptor, ctx, up_rx));
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
    /// SHA-256 of [`X509_DEVICE`]'s certificate.
    thumbprint: Vec<u8>,
    state: Arc<Mutex<State>>,
}

impl Ctx {
    fn event(&self, e: HubEvent) {
        self.state.lock().unwrap().events.push(e);
    }

    /// The documented check of a SAS token; `Err(why)` or the token's expiry.
    fn check_login(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        client_cert: Option<&[u8]>,
    ) -> Result<u64, String> {
        if client_id == X509_DEVICE {
            let want_user = format!("{}/{client_id}/?api-version=2021-04-12", self.host);
            if username != want_user {
                return Err(format!("username {username:?}, expected {want_user:?}"));
            }
            let cert = client_cert.ok_or("no client certificate")?;
            if ring::digest::digest(&ring::digest::SHA256, cert).as_ref()
                != self.thumbprint.as_slice()
            {
                return Err("the certificate's thumbprint is not the device's".into());
            }
            // No token: the connection lasts as long as the certificate is valid.
            return Ok(u64::MAX / 2);
        }
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

/// The server side of RFC 6455 on `tls`: check the upgrade (path, subprotocol `mqtt`),
/// answer it, then carry the binary frames' payloads through a pipe whose other end is
/// returned (frames from the client must be masked; ours are not).
async fn websocket(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Option<tokio::io::DuplexStream> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut b).await.ok()?;
        head.push(b[0]);
        if head.len() > 8192 {
            return None;
        }
    }
    let text = String::from_utf8(head).ok()?;
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let ok = text.starts_with("GET /$iothub/websocket")
        && header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && header("sec-websocket-protocol")
            .is_some_and(|p| p.split(',').any(|x| x.trim() == "mqtt"));
    let Some(key) = header("sec-websocket-key").filter(|_| ok) else {
        let _ = tls
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await;
        return None;
    };
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    tls.write_all(answer.as_bytes()).await.ok()?;
    let (mine, theirs) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let (mut pipe_r, mut pipe_w) = tokio::io::split(mine);
        let (mut tls_r, mut tls_w) = tokio::io::split(tls);
        let inbound = async {
            let mut raw: Vec<u8> = Vec::new();
            let mut chunk = vec![0u8; 16384];
            loop {
                // One whole frame: header, masking key (required from a client), payload.
                while let Some((consumed, opcode, payload)) = client_frame(&raw) {
                    raw.drain(..consumed);
                    match opcode {
                        0x0..=0x2 => pipe_w.write_all(&payload).await.ok()?,
                        0x8 => return None::<()>,
                        _ => {}
                    }
                }
                let n = tls_r.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                raw.extend_from_slice(&chunk[..n]);
            }
        };
        let outbound = async {
            let mut chunk = vec![0u8; 16384];
            loop {
                let n = pipe_r.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None::<()>;
                }
                let mut frame = vec![0x82];
                if n < 126 {
                    frame.push(n as u8);
                } else {
                    frame.push(126);
                    frame.extend_from_slice(&(n as u16).to_be_bytes());
                }
                frame.extend_from_slice(&chunk[..n]);
                tls_w.write_all(&frame).await.ok()?;
            }
        };
        tokio::select! {
            _ = inbound => {}
            _ = outbound => {}
        }
    });
    Some(theirs)
}

/// Accept connections on `listener` (MQTT over WebSocket if `ws`) while the hub is up.
async fn accept(
    listener: TcpListener,
    ws: bool,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Ctx,
    up: watch::Receiver<bool>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        if !*up.borrow() {
            drop(tcp);
            continue;
        }
        let (acceptor, ctx, up) = (acceptor.clone(), ctx.clone(), up.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let cert = peer_cert(&tls);
            if ws {
                if let Some(mqtt) = websocket(tls).await {
                    serve(mqtt, cert, ctx, up).await;
                }
            } else {
                serve(tls, cert, ctx, up).await;
            }
        });
    }
}

fn peer_cert(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref()
        .1
        .peer_certificates()?
        .first()
        .map(|c| c.to_vec())
}

/// A client's frame at the start of `raw`: (bytes used, opcode, unmasked payload). A frame
/// without a mask is a protocol error the test would see as a stalled stream.
fn client_frame(raw: &[u8]) -> Option<(usize, u8, Vec<u8>)> {
    if raw.len() < 2 || raw[1] & 0x80 == 0 {
        return None;
    }
    let (len, at) = match raw[1] & 0x7f {
        126 => (u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(raw.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask = raw.get(at..at + 4)?;
    let payload = raw.get(at + 4..at + 4 + len)?;
    let data = payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Some((at + 4 + len, raw[0] & 0x0f, data))
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tls: S,
    client_cert: Option<Vec<u8>>,
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
    let expiry = match ctx.check_login(&device, &user, &pass, client_cert.as_deref()) {
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
