//! The `[azure_bridge]` section, and its resolution into the [`Plan`] `run` uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::Segment;
use runtime::Secret;
use runtime::backoff::Backoff;
use runtime::config::{ConfigError, InboxConfig, resolve_secret};
use serde::Deserialize;

use crate::sas::{ConnectionString, Credential};

/// The largest body sent: IoT Hub takes device-to-cloud messages up to 256 KB, properties
/// included; 1 KiB is left for the property bag.
pub const HUB_MAX_MESSAGE: usize = 255 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Its sink group, broker user and state directory (`<data_dir>/azure-bridge/<instance>`).
    pub instance: Segment,
    /// The device's connection string (`HostName=…;DeviceId=…;SharedAccessKey=…`, or
    /// `…;x509=true` with `certificate_file`/`private_key_file`). Better as a file (Docker
    /// secret) or `WATTBUS_AZURE_BRIDGE__CONNECTION_STRING`.
    pub connection_string: Option<Secret>,
    pub connection_string_file: Option<PathBuf>,
    /// Instead of a connection string: the hub's host name, the device id and the device's
    /// key on its own (base64, as the portal shows it; `key` from the environment or
    /// `key_file`).
    pub host_name: Option<String>,
    pub device_id: Option<String>,
    pub key: Option<Secret>,
    pub key_file: Option<PathBuf>,
    /// X.509 authentication: the device's certificate (PEM, its chain after it) and key.
    pub certificate_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    /// `mqtt` (MQTT over TLS, port 8883) or `websocket` (MQTT over WebSocket on 443, for
    /// networks that block 8883).
    pub transport: Transport,
    /// Connect here instead of the connection string's `HostName` (an IoT Edge gateway, a
    /// test hub), as `host:port`. The token still names `HostName`.
    pub endpoint: Option<String>,
    /// Trust this CA (PEM) besides the system's roots: an IoT Edge gateway, a test hub.
    pub ca_file: Option<PathBuf>,
    /// Only readings of these devices are sent (others are acknowledged and skipped)
    /// [default: every device of the site].
    pub devices: Option<Vec<Segment>>,
    /// Only readings of these measurements are sent [default: all].
    pub measurements: Option<Vec<Segment>>,
    /// A message is sent once it holds this many bytes (≤ 256 KB). The hub bills 4 KB units:
    /// 64 KiB (16 units) spreads each series' header over a minute or two of rows
    /// (docs/BENCHMARKS.md: ~1.5× the readings per unit of 4 KB messages).
    pub max_message_bytes: usize,
    /// …or once its oldest reading waited this long.
    pub max_age_ms: u64,
    /// Readings the hub has not taken after this long are dropped (ERROR, counted), 7 days by
    /// default (IoT Edge keeps 2 h).
    pub ttl_s: u64,
    /// The outbox (what the hub has not acknowledged) holds at most this much; beyond it the
    /// oldest messages are dropped (ERROR, counted).
    pub outbox_max_bytes: u64,
    /// Lifetime of each SAS token; the bridge reconnects with a new one at 80 % of it.
    pub token_ttl_s: u64,
    /// Messages sent per second at most (a backlog after an outage drains at this rate; an
    /// S1 hub takes ~100/s per unit from all its devices together).
    pub max_messages_per_second: u32,
    /// Messages sent and not yet acknowledged by the hub, at most.
    pub inflight: usize,
    /// MQTT keep-alive (the hub closes an idle connection after 1.5 times this).
    pub keep_alive_s: u16,
    /// Reconnect backoff, with jitter.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// After the hub refuses the credentials: wait this long (doubling to 1 h) before trying
    /// again, not a tight loop that gets the device throttled.
    pub auth_retry_ms: u64,
    /// Carry out cloud-to-device messages and direct methods (commands to plugs).
    pub commands: bool,
    /// How long a direct method waits for the plug's confirmed state.
    pub command_timeout_ms: u64,
    /// How often the device twin's reported properties (the site's status) are updated.
    pub twin_interval_s: u64,
    pub inbox: InboxConfig,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Mqtt,
    Websocket,
}

impl Transport {
    pub const fn default_port(self) -> u16 {
        match self {
            Transport::Mqtt => 8883,
            Transport::Websocket => 443,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: Segment::new("azure-bridge")
                .unwrap_or_else(|_| unreachable!("valid literal")),
            connection_string: None,
            connection_string_file: None,
            host_name: None,
            device_id: None,
            key: None,
            key_file: None,
            certificate_file: None,
            private_key_file: None,
            transport: Transport::Mqtt,
            endpoint: None,
            ca_file: None,
            devices: None,
            measurements: None,
            max_message_bytes: 64 * 1024,
            max_age_ms: 60_000,
            ttl_s: 7 * 24 * 3600,
            outbox_max_bytes: 512 * 1024 * 1024,
            token_ttl_s: 3600,
            max_messages_per_second: 10,
            inflight: 8,
            keep_alive_s: 60,
            reconnect_min_ms: 1000,
            reconnect_max_ms: 100_000,
            auth_retry_ms: 60_000,
            commands: true,
            command_timeout_ms: 10_000,
            twin_interval_s: 300,
            inbox: InboxConfig::default(),
            health_listen: Some(([127, 0, 0, 1], 9117).into()),
        }
    }
}

/// The section resolved: what `run` uses.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instance: Segment,
    pub hub: HubPlan,
    pub devices: Option<Vec<Segment>>,
    pub measurements: Option<Vec<Segment>>,
    pub max_message_bytes: usize,
    pub max_age: Duration,
    pub ttl: Duration,
    pub outbox_max_bytes: u64,
    pub commands: bool,
    pub command_timeout: Duration,
    pub twin_interval: Duration,
    pub inbox: InboxConfig,
    pub health_listen: Option<SocketAddr>,
}

/// How to reach the hub and who to be there.
#[derive(Debug, Clone)]
pub struct HubPlan {
    pub device: ConnectionString,
    /// Where to connect (host, port); the TLS name is the host.
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    pub ca_pem: Option<Vec<u8>>,
    /// X.509: certificate chain and key (PEM).
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
    pub token_ttl: Duration,
    pub rate: u32,
    pub inflight: usize,
    pub keep_alive: Duration,
    pub reconnect: Backoff,
    pub auth_retry: Backoff,
}

impl Plan {
    /// `<data_dir>/azure-bridge/<instance>`.
    pub fn state_dir(&self, data_dir: &Path) -> PathBuf {
        data_dir.join("azure-bridge").join(self.instance.as_str())
    }
}

fn read_file(key: String, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

impl Config {
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let text = resolve_secret(
            &key("connection_string"),
            self.connection_string.as_ref(),
            self.connection_string_file.as_deref(),
        )?;
        let device_key = resolve_secret(&key("key"), self.key.as_ref(), self.key_file.as_deref())?;
        let parts = self.host_name.is_some() || self.device_id.is_some() || device_key.is_some();
        let (text, which) = match (text, parts) {
            (Some(_), true) => {
                return Err(ConfigError::new(
                    key("connection_string"),
                    "both a connection string and host_name/device_id/key are given; use one",
                ));
            }
            (Some(t), false) => {
                let which = if self.connection_string_file.is_some() {
                    key("connection_string_file")
                } else {
                    key("connection_string")
                };
                (t.expose().to_string(), which)
            }
            (None, true) => {
                let host = self.host_name.as_deref().ok_or_else(|| {
                    ConfigError::new(
                        key("host_name"),
                        "device_id or key is given without host_name (`<hub>.azure-devices.net`)",
                    )
                })?;
                let device = self.device_id.as_deref().ok_or_else(|| {
                    ConfigError::new(
                        key("device_id"),
                        "host_name or key is given without device_id",
                    )
                })?;
                let k = device_key.ok_or_else(|| {
                    ConfigError::new(key("key_file"), "host_name and device_id are given without the device's key (key_file, or WATTBUS_AZURE_BRIDGE__KEY)")
                })?;
                (
                    format!(
                        "HostName={host};DeviceId={device};SharedAccessKey={}",
                        k.expose()
                    ),
                    key("key_file"),
                )
            }
            (None, false) => {
                return Err(ConfigError::new(
                    key("connection_string_file"),
                    "no device connection string: set connection_string_file (a Docker secret) or \
                     WATTBUS_AZURE_BRIDGE__CONNECTION_STRING; the portal shows it under the device, \
                     or `az iot hub device-identity connection-string show`",
                ));
            }
        };
        let device = ConnectionString::parse(&text)
            .map_err(|e| ConfigError::new(which.clone(), e.to_string()))?;
        let x509 = device.credential == Credential::X509;
        let client_auth = match (&self.certificate_file, &self.private_key_file) {
            (Some(c), Some(k)) => Some((
                read_file(key("certificate_file"), c)?,
                read_file(key("private_key_file"), k)?,
            )),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    key("private_key_file"),
                    "certificate_file is set without private_key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    key("certificate_file"),
                    "private_key_file is set without certificate_file",
                ));
            }
        };
        if x509 && client_auth.is_none() {
            return Err(ConfigError::new(
                key("certificate_file"),
                "the connection string says x509=true: give the device's certificate_file and private_key_file",
            ));
        }
        if !x509 && client_auth.is_some() {
            return Err(ConfigError::new(
                key("certificate_file"),
                "a certificate is given, but the connection string has a SharedAccessKey: use one (x509=true for certificates)",
            ));
        }
        let (host, port) = match &self.endpoint {
            None => (device.host_name.clone(), self.transport.default_port()),
            Some(e) => {
                let (h, p) = e.rsplit_once(':').ok_or_else(|| {
                    ConfigError::new(key("endpoint"), format!("{e:?} is not host:port"))
                })?;
                let p: u16 = p.parse().map_err(|_| {
                    ConfigError::new(key("endpoint"), format!("{e:?}: the port is not a number"))
                })?;
                if h.is_empty() || p == 0 {
                    return Err(ConfigError::new(
                        key("endpoint"),
                        format!("{e:?} is not host:port"),
                    ));
                }
                (h.to_string(), p)
            }
        };
        let ca_pem = match &self.ca_file {
            Some(p) => Some(read_file(key("ca_file"), p)?),
            None => None,
        };
        if !(512..=HUB_MAX_MESSAGE).contains(&self.max_message_bytes) {
            return Err(ConfigError::new(
                key("max_message_bytes"),
                format!(
                    "{} is outside 512–{HUB_MAX_MESSAGE} (IoT Hub takes messages up to 256 KB with their properties; it bills 4 KB units, 0.5 KB on the free tier)",
                    self.max_message_bytes
                ),
            ));
        }
        if self.max_age_ms < 100 {
            return Err(ConfigError::new(key("max_age_ms"), "must be at least 100"));
        }
        if self.ttl_s < 60 {
            return Err(ConfigError::new(key("ttl_s"), "must be at least 60"));
        }
        if self.outbox_max_bytes < 1024 * 1024 {
            return Err(ConfigError::new(
                key("outbox_max_bytes"),
                "must be at least 1 MiB",
            ));
        }
        if !(10..=365 * 24 * 3600).contains(&self.token_ttl_s) {
            return Err(ConfigError::new(
                key("token_ttl_s"),
                "must be between 10 s and a year (3600 is what Microsoft's SDKs use)",
            ));
        }
        if self.max_messages_per_second == 0 || self.max_messages_per_second > 1000 {
            return Err(ConfigError::new(
                key("max_messages_per_second"),
                "must be 1–1000",
            ));
        }
        if !(1..=1000).contains(&self.inflight) {
            return Err(ConfigError::new(key("inflight"), "must be 1–1000"));
        }
        // The hub times out at 1.5 × keep-alive, capped at 1767 s.
        if !(5..=1177).contains(&self.keep_alive_s) {
            return Err(ConfigError::new(
                key("keep_alive_s"),
                "must be 5–1177 (the hub drops a connection idle for 1.5 × keep-alive, at most 1767 s)",
            ));
        }
        let reconnect = Backoff::from_config_ms(
            &key("reconnect_min_ms"),
            self.reconnect_min_ms,
            &key("reconnect_max_ms"),
            self.reconnect_max_ms,
        )?;
        let auth_retry = Backoff::from_config_ms(
            &key("auth_retry_ms"),
            self.auth_retry_ms,
            &key("auth_retry_ms"),
            self.auth_retry_ms.max(3_600_000),
        )?;
        if self.command_timeout_ms < 100 || self.command_timeout_ms > 300_000 {
            return Err(ConfigError::new(
                key("command_timeout_ms"),
                "must be 100–300000 (a direct method times out at the hub after at most 300 s)",
            ));
        }
        if self.twin_interval_s < 10 {
            return Err(ConfigError::new(
                key("twin_interval_s"),
                "must be at least 10",
            ));
        }
        Ok(Plan {
            instance: self.instance,
            hub: HubPlan {
                device,
                host,
                port,
                transport: self.transport,
                ca_pem,
                client_auth,
                token_ttl: Duration::from_secs(self.token_ttl_s),
                rate: self.max_messages_per_second,
                inflight: self.inflight,
                keep_alive: Duration::from_secs(u64::from(self.keep_alive_s)),
                reconnect,
                auth_retry,
            },
            devices: self.devices,
            measurements: self.measurements,
            max_message_bytes: self.max_message_bytes,
            max_age: Duration::from_millis(self.max_age_ms),
            ttl: Duration::from_secs(self.ttl_s),
            outbox_max_bytes: self.outbox_max_bytes,
            commands: self.commands,
            command_timeout: Duration::from_millis(self.command_timeout_ms),
            twin_interval: Duration::from_secs(self.twin_interval_s),
            inbox: self.inbox,
            health_listen: self.health_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml: &str) -> Result<Plan, ConfigError> {
        let c: Config =
            runtime::ConfigSource::from_parts(None, Some(&format!("[azure_bridge]\n{toml}")))
                .and_then(|s| s.section("azure_bridge"))?;
        c.resolve("azure_bridge")
    }

    fn message(r: Result<Plan, ConfigError>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn the_device_comes_from_a_connection_string_or_from_its_parts_not_both() {
        let p = resolve(
            "connection_string = \"HostName=h.azure-devices.net;DeviceId=d;SharedAccessKey=YWJj\"",
        )
        .unwrap();
        assert_eq!(
            (p.hub.host.as_str(), p.hub.port),
            ("h.azure-devices.net", 8883)
        );
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "YWJj\n").unwrap();
        let parts = format!(
            "host_name = \"h.azure-devices.net\"\ndevice_id = \"d\"\nkey_file = \"{}\"\n",
            key.display()
        );
        let q = resolve(&parts).unwrap();
        assert_eq!(q.hub.device, p.hub.device, "the same device either way");
        let both = message(resolve(&format!(
            "{parts}connection_string = \"HostName=h;DeviceId=d;SharedAccessKey=YWJj\"\n"
        )));
        assert!(both.contains("use one"), "{both}");
        let half = message(resolve(
            "host_name = \"h.azure-devices.net\"\ndevice_id = \"d\"\n",
        ));
        assert!(half.contains("azure_bridge.key_file"), "{half}");
    }

    #[test]
    fn a_bad_device_is_refused_naming_the_key_and_never_the_secret() {
        let none = message(resolve(""));
        assert!(
            none.contains("azure_bridge.connection_string_file"),
            "{none}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cs");
        std::fs::write(&file, "HostName=h;DeviceId=d;SharedAccessKey=not*base64\n").unwrap();
        let bad = message(resolve(&format!(
            "connection_string_file = \"{}\"",
            file.display()
        )));
        assert!(
            bad.contains("azure_bridge.connection_string_file") && bad.contains("not base64"),
            "{bad}"
        );
        assert!(!bad.contains("not*base64"), "the key was printed: {bad}");
        std::fs::write(&file, "\n").unwrap();
        let empty = message(resolve(&format!(
            "connection_string_file = \"{}\"",
            file.display()
        )));
        assert!(empty.contains("is empty"), "{empty}");
        let ws = resolve("connection_string = \"HostName=h;DeviceId=d;SharedAccessKey=YWJj\"\ntransport = \"websocket\"").unwrap();
        assert_eq!(ws.hub.port, 443);
        let big = message(resolve(
            "connection_string = \"HostName=h;DeviceId=d;SharedAccessKey=YWJj\"\nmax_message_bytes = 300000",
        ));
        assert!(big.contains("azure_bridge.max_message_bytes"), "{big}");
    }
}
