//! The `[broker]` section, its checks, and its translation into rumqttd's configuration.
//!
//! Everything rumqttd would panic on or silently ignore is refused here, at start-up, with the
//! key that is wrong: a segment smaller than 1 KiB or a segment count of 0 panics rumqttd's
//! router thread, and a CA file is ignored by rumqttd as built here (see [`TlsConfig::ca_file`]).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use runtime::config::resolve_secret;
use runtime::{ConfigError, Secret};
use serde::{Deserialize, Serialize};

use crate::acl::{Grant, Role};
use crate::auth;

/// Section name used for error keys where no loader passes one in ([`Config::to_rumqttd`]).
pub const SECTION: &str = "broker";

/// Listener names, as rumqttd names its threads and as the `listener` metric label shows them.
pub const V4_LISTENER: &str = "v4-1";
pub const V5_LISTENER: &str = "v5-1";
pub const TLS_LISTENER: &str = "v4-tls";

/// How often rumqttd's timer asks the router for meters and alerts. rumqttd counts in whole
/// seconds; one request a second costs the router nothing measurable.
const METERS_INTERVAL_S: u64 = 1;

/// Largest MQTT remaining length (256 MiB - 1): nothing larger can be framed.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Defaults listen on loopback only: a broker reachable from the network must be asked for
/// (compose sets `0.0.0.0` explicitly, for its containers).
const fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// The `[broker]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The MQTT 3.1.1 (protocol level 4) listener every wattbus service uses. Loopback by
    /// default; a broker other hosts or containers reach is asked for (`0.0.0.0:1883`).
    pub listen: SocketAddr,
    /// MQTT 5 listener, for tools that only speak v5 (a rumqttd listener speaks exactly one
    /// protocol version, hence a second port). Off unless set.
    pub listen_v5: Option<SocketAddr>,
    /// Let clients connect without checking credentials. rumqttd cannot mix anonymous and
    /// authenticated clients: with a password table it refuses every client that sends no
    /// credentials, and without one it accepts any credentials. So `true` turns checking off
    /// completely, and `users`, if given, are not checked (a warning says so at start-up).
    pub allow_anonymous: bool,
    /// Who may connect (`[[broker.users]]`), and, by role, what each may publish and
    /// subscribe. Checked on every listener.
    pub users: Vec<User>,
    /// An extra MQTT 3.1.1 listener behind TLS, for clients outside the host.
    pub tls: Option<TlsConfig>,
    /// Most concurrent clients. rumqttd preallocates its tables for this many; a client beyond
    /// it gets no CONNACK at all and times out. Seven services and a few tools fit easily; each
    /// connection may hold up to 4 × `max_payload_bytes` + 2 × `max_queued_bytes` at worst, the
    /// largest term of the memory bound (docs/broker.md).
    pub max_connections: usize,
    /// Most connections one user may hold at once (admin users excepted), so that one login —
    /// a reader's password on a dashboard, a stolen service password — cannot take every
    /// connection and lock the services out. A service needs one per instance.
    pub max_connections_per_user: usize,
    /// Largest packet a client may send (MQTT remaining length: topic + payload). rumqttd
    /// disconnects a client that sends a larger one. Raw sample frames are large, so this
    /// matches `bus.max_packet_bytes` rather than rumqttd's small examples.
    pub max_payload_bytes: usize,
    /// rumqttd's `max_inflight_count`. Despite the name, it is how many packets rumqttd reads
    /// from one client's socket in a batch before handing them to the router; the broker's
    /// own QoS 1 window towards each subscriber is fixed at 100 inside rumqttd.
    pub max_inflight: usize,
    /// Size of one in-memory log segment. The router keeps a log per subscription filter of at
    /// most `segment_count` segments: a subscriber that falls further behind than that skips
    /// ahead and loses messages (counted in `wattbus_broker_subscriber_skips_total`). rumqttd
    /// panics below 1024.
    pub segment_bytes: usize,
    /// Segments kept per filter; see `segment_bytes`. The product bounds the log of a filter.
    pub segment_count: usize,
    /// Most bytes all filter logs hold together (each message counted with its entry, about
    /// 250 bytes, besides topic and payload). Past it the oldest segment of the largest log is
    /// dropped, and its slow subscribers skip ahead (counted like any skip). Bounds the logs
    /// whatever the number of filters and the size of their messages.
    pub max_log_bytes: usize,
    /// Most subscription filters one connection may hold. A SUBSCRIBE that would pass it is
    /// refused whole (SUBACK 0x80); a wattbus service uses a handful.
    pub max_filters_per_client: usize,
    /// Most distinct filters (logs) at once. A log is freed when its last subscriber leaves, so
    /// this counts live filters: a client that subscribed thousands and left takes nothing
    /// from the others. A SUBSCRIBE that would pass it is refused whole (SUBACK 0x80).
    pub max_filters: usize,
    /// Most bytes of retained messages. A retained message beyond it is delivered but not
    /// kept, and its topic then has none (a WARN and `wattbus_broker_retained_refused_total`).
    /// wattbus retains a status per service and a registration per sink group: kilobytes.
    pub max_retained_bytes: usize,
    /// Most bytes of messages queued for one connection (one message always fits). A client
    /// that stops reading holds at most this much, not rumqttd's 200 messages of any size.
    pub max_queued_bytes: usize,
    /// How long a new TCP connection may take to send CONNECT before it is dropped, so idle
    /// sockets cannot use up `max_connections`. rumqttd takes a u16.
    pub connection_timeout_ms: u16,
    /// Most QoS 0 messages the router hands to one subscriber in one round; bounds how long a
    /// busy subscriber can hold the router up before others get their turn.
    pub max_outgoing_packet_count: u64,
    /// Where the `wattbus` binary serves `/healthz` and `/metrics` for the broker process
    /// (loopback by default, like the listeners).
    /// This crate does not serve HTTP itself; `None` turns the endpoint off.
    pub health_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: loopback(1883),
            listen_v5: None,
            allow_anonymous: false,
            users: Vec::new(),
            tls: None,
            max_connections: 32,
            max_connections_per_user: 8,
            max_payload_bytes: 1 << 20,
            max_inflight: 100,
            segment_bytes: 2 << 20,
            segment_count: 4,
            max_log_bytes: 32 << 20,
            max_filters_per_client: 32,
            max_filters: 1024,
            max_retained_bytes: 4 << 20,
            max_queued_bytes: 1 << 20,
            connection_timeout_ms: 5000,
            max_outgoing_packet_count: 200,
            health_listen: Some(loopback(9100)),
        }
    }
}

/// One `[[broker.users]]` entry: one per service, since the role and the name decide what it
/// may publish and subscribe (see `acl`; a sink's username is its sink group).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// A topic level (`[A-Za-z0-9._-]`, 1–64 characters): it appears in the topics the user
    /// may publish (`ack/.../<username>`, `dead/<username>`).
    pub username: String,
    /// The password inline; or, to keep it out of the config file (Docker secrets),
    /// `password_file` naming a file that holds it. Exactly one of the two.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// `producer`, `sink`, `processor`, `reader` or `admin`. Required. Read as text, so that a
    /// missing or misspelt role is an error naming this key and the allowed values.
    pub role: Option<String>,
    /// Producers and processors only: the devices whose readings (`meas`, `raw`) this user may
    /// publish. Absent: any device.
    pub devices: Option<Vec<String>>,
}

impl User {
    /// A user with an inline password (tests, the demo).
    pub fn new(username: &str, password: &str, role: Role) -> Self {
        Self {
            username: username.into(),
            password: Some(Secret::new(password)),
            password_file: None,
            role: Some(role.as_str().into()),
            devices: None,
        }
    }
}

/// `[broker.tls]`: a TLS listener (rustls).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain. rumqttd reads it again for every connection, so a renewed
    /// certificate is picked up without a restart (and a broken one fails every handshake).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#1, PKCS#8 or SEC1).
    pub key_file: PathBuf,
    /// Client-certificate CA. Refused when set: rumqttd as built here (without its
    /// `verify-client-cert` feature, which would also prefix every client id with a tenant
    /// taken from the certificate) ignores it and verifies nobody, and a setting that looks
    /// like mutual TLS but is not would be worse than none. Present so the error can say so.
    pub ca_file: Option<PathBuf>,
}

const fn default_tls_listen() -> SocketAddr {
    loopback(8883)
}

/// The section, checked: what [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan(Config);

impl std::ops::Deref for Plan {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

impl Config {
    /// Check the section; errors name `section.key`.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        self.check(section)?;
        Ok(Plan(self))
    }

    fn check(&self, section: &str) -> Result<(), ConfigError> {
        self.check_listeners(section)?;
        if self.users.is_empty() && !self.allow_anonymous {
            return Err(ConfigError::new(
                format!("{section}.users"),
                format!(
                    "no users configured and allow_anonymous = false: nobody could connect; add \
                     [[{section}.users]] with `username` and `password` (or `password_file`), or set \
                     allow_anonymous = true on a trusted network"
                ),
            ));
        }
        self.resolve_users(section)?;
        self.check_limits(section)?;
        if let Some(tls) = &self.tls {
            if !cfg!(feature = "tls") {
                return Err(ConfigError::new(
                    section_key(section, "tls"),
                    "this build of wattbus has no TLS listener: it is a cargo feature (`--features tls`) \
                     because rumqttd's rustls stack has open advisories (see docs/broker.md); \
                     rebuild with it, or terminate TLS in front of the broker",
                ));
            }
            tls.check(section)?;
        }
        Ok(())
    }
}

impl Config {
    /// The rumqttd configuration: validates first (so rumqttd never sees a value it would
    /// panic on), reads password files, and installs the password check on every listener.
    ///
    /// Passwords go into an auth handler, not rumqttd's `auth` table: that table is printed
    /// by rumqttd's `Debug`, and the handler is also where failed logins are counted.
    pub fn to_rumqttd(&self) -> Result<rumqttd::Config, ConfigError> {
        self.check(SECTION)?;
        let users = if self.allow_anonymous {
            None
        } else {
            Some(Arc::new(auth::Users::new(self.resolve_users(SECTION)?)))
        };
        let policy: Arc<dyn rumqttd::Policy> = Arc::new(auth::Policy::new(
            users.clone(),
            self.max_connections_per_user,
        ));
        let server = |name: &str, listen: SocketAddr, tls: Option<rumqttd::TlsConfig>| {
            let mut connections = rumqttd::ConnectionSettings {
                connection_timeout_ms: self.connection_timeout_ms,
                max_payload_size: self.max_payload_bytes,
                max_inflight_count: self.max_inflight,
                auth: None,
                external_auth: None,
                dynamic_filters: false,
            };
            if let Some(users) = &users {
                connections.set_auth_handler(auth::handler(Arc::clone(users), name));
            }
            let settings = rumqttd::ServerSettings {
                name: name.to_string(),
                listen,
                tls,
                // rumqttd pauses this long after each accept; 1 ms (its own example's value)
                // caps a reconnect storm at 1000 accepts a second without being noticeable.
                next_connection_delay_ms: 1,
                connections,
            };
            (name.to_string(), settings)
        };

        let mut v4 = HashMap::from([server(V4_LISTENER, self.listen, None)]);
        if let Some(tls) = &self.tls {
            let rustls = rumqttd::TlsConfig::Rustls {
                capath: None,
                certpath: utf8(section_key(SECTION, "tls.cert_file"), &tls.cert_file)?,
                keypath: utf8(section_key(SECTION, "tls.key_file"), &tls.key_file)?,
            };
            v4.extend([server(TLS_LISTENER, tls.listen, Some(rustls))]);
        }
        let v5 = self
            .listen_v5
            .map(|addr| HashMap::from([server(V5_LISTENER, addr, None)]));

        // Meters and alerts are pushed by rumqttd's timer thread, which only runs when
        // `metrics` is set. Both kinds must be set: the timer's `select!` evaluates
        // `interval.unwrap()` for a kind even when that branch is disabled, so configuring only
        // one panics the timer thread. The alerts also carry the subscriber skips we count.
        let metrics = HashMap::from([
            (
                rumqttd::MetricType::Meters,
                metric_settings(METERS_INTERVAL_S)?,
            ),
            (
                rumqttd::MetricType::Alerts,
                metric_settings(METERS_INTERVAL_S)?,
            ),
        ]);

        Ok(rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: self.max_connections,
                max_outgoing_packet_count: self.max_outgoing_packet_count,
                max_segment_size: self.segment_bytes,
                max_segment_count: self.segment_count,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: rumqttd::Strategy::default(),
                policy: Some(policy),
                max_filters_per_connection: Some(self.max_filters_per_client),
                max_filters: Some(self.max_filters),
                forget_sessions: true,
                max_retained_bytes: Some(self.max_retained_bytes),
                max_log_bytes: Some(self.max_log_bytes),
                max_outgoing_bytes: Some(self.max_queued_bytes),
            },
            v4: Some(v4),
            v5,
            ws: None,
            cluster: None,
            // rumqttd's console is an unauthenticated HTTP API, and its Prometheus exporter has
            // three gauges and a second HTTP port; the runtime's /metrics covers both.
            console: None,
            bridge: None,
            prometheus: None,
            metrics: Some(metrics),
        })
    }

    /// Every listener with its name and address, in the order they are probed.
    pub fn listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut out = vec![(V4_LISTENER, self.listen)];
        out.extend(self.listen_v5.map(|a| (V5_LISTENER, a)));
        out.extend(self.tls.as_ref().map(|t| (TLS_LISTENER, t.listen)));
        out
    }

    /// Every user with its password (read from its file where given) and its rights.
    fn resolve_users(&self, section: &str) -> Result<Vec<auth::Account>, ConfigError> {
        let mut out: Vec<auth::Account> = Vec::with_capacity(self.users.len());
        for (i, user) in self.users.iter().enumerate() {
            let key = format!("{section}.users[{i}]");
            if let Err(e) = proto::Segment::new(user.username.as_str()) {
                return Err(ConfigError::new(
                    format!("{key}.username"),
                    format!("{:?} {e} (it is a topic level)", user.username),
                ));
            }
            if let Some(j) = out.iter().position(|a| a.grant.username == user.username) {
                return Err(ConfigError::new(
                    format!("{key}.username"),
                    format!(
                        "{:?} is already used by {section}.users[{j}]",
                        user.username
                    ),
                ));
            }
            let role = user_role(&key, user)?;
            let devices = user_devices(&key, user, role)?;
            let password_key = format!("{key}.password");
            let password = resolve_secret(
                &password_key,
                user.password.as_ref(),
                user.password_file.as_deref(),
            )?
            .ok_or_else(|| {
                ConfigError::new(&password_key, "missing: set `password` or `password_file`")
            })?;
            if password.expose().is_empty() {
                return Err(ConfigError::new(password_key, "must not be empty"));
            }
            out.push(auth::Account {
                password,
                grant: Grant {
                    username: user.username.clone(),
                    role,
                    devices,
                },
            });
        }
        Ok(out)
    }

    fn check_listeners(&self, section: &str) -> Result<(), ConfigError> {
        let mut used: Vec<(String, SocketAddr)> = Vec::new();
        let mqtt = self
            .listeners()
            .into_iter()
            .map(|(name, addr)| (listener_key(section, name), addr, true));
        let health = self
            .health_listen
            .map(|addr| (section_key(section, "health_listen"), addr, false));
        for (key, addr, is_mqtt) in mqtt.chain(health) {
            // The broker is probed for readiness on its configured port; rumqttd does not
            // report a port it picked, so 0 cannot work for an MQTT listener.
            if is_mqtt && addr.port() == 0 {
                return Err(ConfigError::new(key, "port must not be 0"));
            }
            if let Some((other, _)) = used.iter().find(|(_, a)| overlaps(*a, addr)) {
                return Err(ConfigError::new(
                    key,
                    format!("{addr} clashes with `{other}`"),
                ));
            }
            used.push((key, addr));
        }
        Ok(())
    }

    fn check_limits(&self, section: &str) -> Result<(), ConfigError> {
        let fail =
            |key: &str, reason: &str| Err(ConfigError::new(section_key(section, key), reason));
        if self.max_connections == 0 {
            return fail("max_connections", "must be at least 1");
        }
        if self.max_connections_per_user == 0 {
            return fail("max_connections_per_user", "must be at least 1");
        }
        if !(1024..=MQTT_MAX_PACKET).contains(&self.max_payload_bytes) {
            return fail(
                "max_payload_bytes",
                "must be between 1024 and 268435455 (the largest MQTT packet)",
            );
        }
        if self.max_inflight == 0 {
            return fail("max_inflight", "must be at least 1");
        }
        if self.segment_bytes < 1024 {
            return fail(
                "segment_bytes",
                "must be at least 1024 (rumqttd panics below that)",
            );
        }
        if self.segment_count == 0 {
            return fail("segment_count", "must be at least 1 (rumqttd panics on 0)");
        }
        if self.connection_timeout_ms == 0 {
            return fail(
                "connection_timeout_ms",
                "must be > 0, or every client is dropped",
            );
        }
        if self.max_outgoing_packet_count == 0 {
            return fail("max_outgoing_packet_count", "must be at least 1");
        }
        for (key, value) in [
            ("max_filters_per_client", self.max_filters_per_client),
            ("max_filters", self.max_filters),
        ] {
            if value == 0 {
                return fail(key, "must be at least 1, or no client could subscribe");
            }
        }
        // One login (a reader's password on a dashboard) holding all its connections with all
        // their filters must leave room for the services: a reader that filled every filter
        // slot had a restarted influx-writer's subscription refused (hostile review).
        if self
            .max_connections_per_user
            .saturating_mul(self.max_filters_per_client)
            > self.max_filters / 2
        {
            return fail(
                "max_filters",
                &format!(
                    "must be at least twice max_connections_per_user × max_filters_per_client \
                     ({} × {}), so that one user cannot take more than half of the filters \
                     and lock the services out",
                    self.max_connections_per_user, self.max_filters_per_client
                ),
            );
        }
        if self.max_connections_per_user > self.max_connections / 2 {
            return fail(
                "max_connections_per_user",
                &format!(
                    "must be at most half of max_connections ({}), so that one user cannot \
                     lock the services out",
                    self.max_connections
                ),
            );
        }
        if self.max_log_bytes < self.segment_bytes {
            return fail(
                "max_log_bytes",
                "must be at least segment_bytes, or a single log could not fill one segment",
            );
        }
        if self.max_queued_bytes == 0 {
            return fail("max_queued_bytes", "must be at least 1");
        }
        Ok(())
    }
}

impl TlsConfig {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        if self.ca_file.is_some() {
            return Err(ConfigError::new(
                section_key(section, "tls.ca_file"),
                "client certificates cannot be verified: rumqttd is built without \
                 `verify-client-cert` and would ignore the CA; remove the key and rely on \
                 broker.users",
            ));
        }
        for (key, path) in [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ] {
            let key = section_key(section, key);
            readable_file(&key, path)?;
            utf8(key, path)?;
        }
        Ok(())
    }
}

/// The user's role, or an error naming `<key>.role` and the roles there are.
fn user_role(key: &str, user: &User) -> Result<Role, ConfigError> {
    let allowed = Role::ALL.map(Role::as_str).join(", ");
    let Some(name) = &user.role else {
        return Err(ConfigError::new(
            format!("{key}.role"),
            format!(
                "missing: every user needs a role, one of {allowed} (each service its own user; \
                 see docs/broker.md)"
            ),
        ));
    };
    Role::ALL
        .into_iter()
        .find(|role| role.as_str() == name)
        .ok_or_else(|| {
            ConfigError::new(
                format!("{key}.role"),
                format!("{name:?} is not a role; one of {allowed}"),
            )
        })
}

/// The devices a producer or processor is restricted to.
fn user_devices(
    key: &str,
    user: &User,
    role: Role,
) -> Result<Option<HashSet<String>>, ConfigError> {
    let Some(devices) = &user.devices else {
        return Ok(None);
    };
    let key = format!("{key}.devices");
    if !role.publishes_readings() {
        return Err(ConfigError::new(
            key,
            format!(
                "only a producer or processor publishes readings; a {} has no devices",
                role.as_str()
            ),
        ));
    }
    let mut out = HashSet::with_capacity(devices.len());
    for device in devices {
        if let Err(e) = proto::Segment::new(device.as_str()) {
            return Err(ConfigError::new(&key, format!("{device:?} {e}")));
        }
        out.insert(device.clone());
    }
    Ok(Some(out))
}

fn section_key(section: &str, key: &str) -> String {
    format!("{section}.{key}")
}

/// The config key that sets a listener's address.
fn listener_key(section: &str, listener: &str) -> String {
    match listener {
        V5_LISTENER => section_key(section, "listen_v5"),
        TLS_LISTENER => section_key(section, "tls.listen"),
        _ => section_key(section, "listen"),
    }
}

/// Two addresses cannot both be bound: same port, and the same IP or a wildcard on either side.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn readable_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(md) if md.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::new(
            key,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(ConfigError::new(
            key,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

/// rumqttd takes paths as `String`.
fn utf8(key: String, path: &Path) -> Result<String, ConfigError> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| ConfigError::new(key, format!("{} is not valid UTF-8", path.display())))
}

/// `MetricSettings` has a private field and no constructor; serde is its only way in.
fn metric_settings(push_interval_s: u64) -> Result<rumqttd::MetricSettings, ConfigError> {
    use serde::de::value::{Error as ValueError, MapDeserializer};
    let fields = [("push_interval", push_interval_s)];
    rumqttd::MetricSettings::deserialize(MapDeserializer::<_, ValueError>::new(fields.into_iter()))
        .map_err(|e| ConfigError::new(SECTION, format!("internal: rumqttd metric settings: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> User {
        User::new("alice", "pw", Role::Admin)
    }

    #[test]
    fn defaults_with_a_user_translate_to_loopback_listeners_with_auth_and_a_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "x").unwrap();
        std::fs::write(&key, "x").unwrap();
        let config = Config {
            users: vec![alice()],
            // Without the `tls` feature a TLS section is refused (tested in tests/broker.rs).
            tls: cfg!(feature = "tls").then(|| TlsConfig {
                listen: default_tls_listen(),
                cert_file: cert,
                key_file: key,
                ca_file: None,
            }),
            ..Config::default()
        };
        let r = config.to_rumqttd().unwrap();
        let v4 = r.v4.as_ref().unwrap();
        assert_eq!(v4[V4_LISTENER].listen, "127.0.0.1:1883".parse().unwrap());
        assert!(v4[V4_LISTENER].connections.external_auth.is_some());
        assert!(
            v4[V4_LISTENER].connections.auth.is_none(),
            "no plaintext table"
        );
        if cfg!(feature = "tls") {
            assert_eq!(v4[TLS_LISTENER].listen.port(), 8883);
            assert!(matches!(
                v4[TLS_LISTENER].tls,
                Some(rumqttd::TlsConfig::Rustls { .. })
            ));
        } else {
            assert!(!v4.contains_key(TLS_LISTENER));
        }
        assert!(r.v5.is_none(), "the v5 listener is off unless configured");
        assert!(r.router.policy.is_some());
        assert_eq!(r.router.max_segment_size, 2 << 20);
        assert_eq!(r.router.max_segment_count, 4);
        assert!(r.prometheus.is_none() && r.console.is_none());
        assert_eq!(r.metrics.as_ref().map(HashMap::len), Some(2));
        // Nothing secret in what rumqttd can print.
        assert!(!format!("{r:?}").contains("\"pw\""));
    }

    #[test]
    fn anonymous_means_no_auth_on_any_listener() {
        let config = Config {
            allow_anonymous: true,
            users: vec![alice()],
            ..Config::default()
        };
        let r = config.to_rumqttd().unwrap();
        let conns = &r.v4.as_ref().unwrap()[V4_LISTENER].connections;
        assert!(conns.auth.is_none() && conns.external_auth.is_none());
    }

    #[test]
    fn one_user_may_hold_at_most_half_of_the_filters_and_connections() {
        let config = Config {
            allow_anonymous: true,
            max_filters: 256,
            ..Config::default()
        };
        let e = config.check("broker").unwrap_err();
        assert_eq!(e.key, "broker.max_filters");
        assert!(e.to_string().contains("8 × 32"), "{e}");
        let config = Config {
            allow_anonymous: true,
            max_connections: 12,
            ..Config::default()
        };
        let e = config.check("broker").unwrap_err();
        assert_eq!(e.key, "broker.max_connections_per_user");
        let defaults = Config {
            allow_anonymous: true,
            ..Config::default()
        };
        assert!(defaults.check("broker").is_ok());
    }

    #[test]
    fn clashing_ports_name_the_later_key() {
        let config = Config {
            allow_anonymous: true,
            listen_v5: Some("127.0.0.1:1883".parse().unwrap()),
            ..Config::default()
        };
        let e = config.check("broker").unwrap_err();
        assert_eq!(e.key, "broker.listen_v5");
    }

    #[test]
    #[cfg(feature = "tls")]
    fn a_ca_file_is_refused_rather_than_ignored() {
        let config = Config {
            allow_anonymous: true,
            tls: Some(TlsConfig {
                listen: default_tls_listen(),
                cert_file: "c".into(),
                key_file: "k".into(),
                ca_file: Some("ca".into()),
            }),
            ..Config::default()
        };
        assert_eq!(
            config.check("broker").unwrap_err().key,
            "broker.tls.ca_file"
        );
    }
}
