//! The `[plug_bridge]` section, and its resolution into the [`Plan`] `run` uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::Segment;
use runtime::Secret;
use runtime::config::{ConfigError, StreamConfig, Variant, resolve_secret};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id, journal and state directory.
    pub instance: Segment,
    /// How often each plug is read (power, relay, temperature, energy).
    pub poll_ms: u64,
    /// One request to a plug, connecting included.
    pub timeout_ms: u64,
    /// A plug that does not answer is tried again after this, doubling up to
    /// `retry_max_ms`: it never delays the others.
    pub retry_ms: u64,
    pub retry_max_ms: u64,
    /// The energy counters' file is saved each time a counter grows this much (SD-card wear
    /// against what a crash can cost: after a crash and a plug reboot a counter may continue
    /// up to this much too high, never lower than a stored reading).
    pub energy_margin_wh: f64,
    /// Default `<data_dir>/plug-bridge/<instance>/energy.json`.
    pub energy_file: Option<PathBuf>,
    pub plugs: Vec<PlugConfig>,
    /// Delivery of the readings (`meas` stream).
    pub stream: StreamConfig,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
    /// The HTTP API (Grafana's button, scripts); off unless `[plug_bridge.api]` is given.
    pub api: Option<ApiConfig>,
    /// Announce every plug to Home Assistant (MQTT discovery under `homeassistant/`).
    pub home_assistant: bool,
    /// The broker the Tasmota plugs use, when it is not wattbus's (e.g. Home Assistant's
    /// mosquitto) [default: wattbus's, as `[bus]`].
    pub tasmota_broker: Option<TasmotaBroker>,
}

/// `[plug_bridge.tasmota_broker]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasmotaBroker {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_mqtt_port() -> u16 {
    1883
}

/// `[plug_bridge.api]`: switch plugs and read them over HTTP, with a bearer token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Where to listen, e.g. `0.0.0.0:9116` in a container Grafana reaches.
    pub listen: SocketAddr,
    /// The bearer token every request must carry (`Authorization: Bearer <token>`); at
    /// least 16 characters. Better as a file (Docker secret) or `WATTBUS_PLUG_BRIDGE__API__TOKEN`.
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long a switch may take, retries included, before the answer is 504 and the
    /// command is dropped (never carried out later) [default 5000].
    #[serde(default = "default_api_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_api_timeout_ms() -> u64 {
    5000
}

/// The API, resolved.
#[derive(Debug, Clone)]
pub struct ApiPlan {
    pub listen: SocketAddr,
    pub token: Secret,
    pub timeout: Duration,
}

/// The shortest API token taken: a short one is guessed over the LAN.
pub const MIN_TOKEN_LEN: usize = 16;

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: Segment::new("plug-bridge").unwrap_or_else(|_| unreachable!("valid literal")),
            poll_ms: 1000,
            timeout_ms: 2000,
            retry_ms: 1000,
            retry_max_ms: 60_000,
            energy_margin_wh: 10.0,
            energy_file: None,
            plugs: Vec::new(),
            stream: StreamConfig::default(),
            health_listen: Some(([127, 0, 0, 1], 9115).into()),
            api: None,
            home_assistant: true,
            tasmota_broker: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlugKind {
    /// myStrom WiFi Switch (HTTP `/report`, `/relay`).
    Mystrom,
    /// Shelly Gen2 plugs (HTTP RPC `Switch.GetStatus`, `Switch.Set`).
    Shelly,
    /// Tasmota plugs: they speak MQTT themselves (`cmnd/`, `stat/`, `tele/<topic>/…`) on
    /// wattbus's broker.
    Tasmota,
}

impl PlugKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            PlugKind::Mystrom => "mystrom",
            PlugKind::Shelly => "shelly",
            PlugKind::Tasmota => "tasmota",
        }
    }
}

/// One `[[plug_bridge.plugs]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlugConfig {
    /// The plug's name: the `device` of its readings and of commands to it.
    pub id: Segment,
    pub kind: PlugKind,
    /// myStrom, Shelly: `http://192.168.1.50` (its address on the LAN; a fixed DHCP lease
    /// helps).
    #[serde(default)]
    pub url: Option<String>,
    /// Tasmota: its MQTT topic (`%topic%`, e.g. `tasmota_5A3F2B`), which is also its broker
    /// user's name.
    #[serde(default)]
    pub topic: Option<Segment>,
    /// myStrom: the API token set in the plug's app (sent as `Token:`), if one is set.
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Shelly: the password set in its web UI (user `admin`, digest authentication).
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Shelly: the switch on a multi-switch device [default 0].
    #[serde(default)]
    pub switch_id: Option<u8>,
    /// This plug's own rate [default: the section's `poll_ms`].
    #[serde(default)]
    pub poll_ms: Option<u64>,
}

/// One plug, resolved.
#[derive(Debug, Clone)]
pub struct Plug {
    pub id: Segment,
    pub kind: PlugKind,
    /// Without a trailing slash; `mqtt:<topic>` for a Tasmota (for the log).
    pub url: String,
    /// Tasmota's MQTT topic.
    pub topic: Option<Segment>,
    pub token: Option<Secret>,
    /// Shelly's password.
    pub password: Option<Secret>,
    pub switch_id: u8,
    pub poll: Duration,
}

/// The section, checked: what [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instance: Segment,
    pub timeout: Duration,
    pub retry: runtime::backoff::Backoff,
    pub energy_margin_wh: f64,
    pub energy_file: Option<PathBuf>,
    pub plugs: Vec<Plug>,
    pub stream: StreamConfig,
    pub health_listen: Option<SocketAddr>,
    pub api: Option<ApiPlan>,
    pub home_assistant: bool,
    /// Where the Tasmota plugs are: `None` for wattbus's own broker.
    pub tasmota_broker: Option<runtime::config::BusConfig>,
}

impl Plan {
    /// The energy counters' file.
    pub fn energy_file(&self, data_dir: &Path) -> PathBuf {
        self.energy_file.clone().unwrap_or_else(|| {
            data_dir
                .join("plug-bridge")
                .join(self.instance.as_str())
                .join("energy.json")
        })
    }
}

fn poll_range(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if !(100..=3_600_000).contains(&ms) {
        return Err(ConfigError::new(key, "must be from 100 ms to an hour"));
    }
    Ok(Duration::from_millis(ms))
}

impl Config {
    /// Check the section and read its secrets; errors name `section.key`.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        poll_range(&key("poll_ms"), self.poll_ms)?;
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(ConfigError::new(
                key("timeout_ms"),
                "must be from 100 to 60000",
            ));
        }
        let retry = runtime::backoff::Backoff::from_config_ms(
            &key("retry_ms"),
            self.retry_ms,
            &key("retry_max_ms"),
            self.retry_max_ms,
        )?;
        if !(self.energy_margin_wh.is_finite() && (0.1..=1000.0).contains(&self.energy_margin_wh)) {
            return Err(ConfigError::new(
                key("energy_margin_wh"),
                "must be from 0.1 to 1000 Wh",
            ));
        }
        let mut plugs: Vec<Plug> = Vec::with_capacity(self.plugs.len());
        for (i, p) in self.plugs.iter().enumerate() {
            let at = format!("{section}.plugs[{i}]");
            let plug = p.resolve(&at, self.poll_ms)?;
            if plugs.iter().any(|q| q.id == plug.id) {
                return Err(ConfigError::new(
                    format!("{at}.id"),
                    format!("{:?} is given to two plugs", plug.id.as_str()),
                ));
            }
            if let Some(q) = plugs
                .iter()
                .find(|q| q.url == plug.url && q.switch_id == plug.switch_id)
            {
                let leaf = if plug.kind == PlugKind::Tasmota {
                    "topic"
                } else {
                    "url"
                };
                return Err(ConfigError::new(
                    format!("{at}.{leaf}"),
                    format!(
                        "{} is plug {:?} already: one plug counted twice",
                        plug.url,
                        q.id.as_str()
                    ),
                ));
            }
            plugs.push(plug);
        }
        self.stream.validate(&key("stream"))?;
        let api = match &self.api {
            None => None,
            Some(a) => Some(a.resolve(&key("api"))?),
        };
        Ok(Plan {
            instance: self.instance,
            timeout: Duration::from_millis(self.timeout_ms),
            retry,
            energy_margin_wh: self.energy_margin_wh,
            energy_file: self.energy_file,
            plugs,
            stream: self.stream,
            health_listen: self.health_listen,
            api,
            home_assistant: self.home_assistant,
            tasmota_broker: match &self.tasmota_broker {
                None => None,
                Some(b) => Some(b.resolve(&key("tasmota_broker"))?),
            },
        })
    }
}

impl TasmotaBroker {
    fn resolve(&self, at: &str) -> Result<runtime::config::BusConfig, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        if self.host.trim().is_empty() {
            return Err(ConfigError::new(key("host"), "must not be empty"));
        }
        if self.port == 0 {
            return Err(ConfigError::new(key("port"), "must not be 0"));
        }
        let password = resolve_secret(
            &key("password"),
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        if password.is_some() && self.username.is_none() {
            return Err(ConfigError::new(
                key("username"),
                "a password is given, but no username",
            ));
        }
        Ok(runtime::config::BusConfig {
            host: self.host.trim().to_string(),
            port: self.port,
            username: self.username.clone(),
            password,
            ..runtime::config::BusConfig::default()
        })
    }
}

impl ApiConfig {
    fn resolve(&self, at: &str) -> Result<ApiPlan, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let token = resolve_secret(
            &key("token"),
            self.token.as_ref(),
            self.token_file.as_deref(),
        )?
        .ok_or_else(|| {
            ConfigError::new(
                key("token_file"),
                "the API switches plugs: it needs a token (token_file, or token from the environment)",
            )
        })?;
        let t = token.expose();
        if t.len() < MIN_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                key("token"),
                format!(
                    "must be at least {MIN_TOKEN_LEN} printable ASCII characters without spaces (e.g. `openssl rand -hex 24`)"
                ),
            ));
        }
        if !(500..=60_000).contains(&self.timeout_ms) {
            return Err(ConfigError::new(
                key("timeout_ms"),
                "must be from 500 to 60000",
            ));
        }
        Ok(ApiPlan {
            listen: self.listen,
            token,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

impl PlugConfig {
    fn resolve(&self, at: &str, default_poll_ms: u64) -> Result<Plug, ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let variant = Variant {
            at,
            selector: "kind",
            chosen: self.kind.as_str(),
        };
        const MYSTROM: &[&str] = &[PlugKind::Mystrom.as_str()];
        const SHELLY: &[&str] = &[PlugKind::Shelly.as_str()];
        const HTTP: &[&str] = &[PlugKind::Mystrom.as_str(), PlugKind::Shelly.as_str()];
        const TASMOTA: &[&str] = &[PlugKind::Tasmota.as_str()];
        for (leaf, set, owners) in [
            ("token", self.token.is_some(), MYSTROM),
            ("token_file", self.token_file.is_some(), MYSTROM),
            ("switch_id", self.switch_id.is_some(), SHELLY),
            ("password", self.password.is_some(), SHELLY),
            ("password_file", self.password_file.is_some(), SHELLY),
            ("url", self.url.is_some(), HTTP),
            ("topic", self.topic.is_some(), TASMOTA),
        ] {
            variant.refuse_unless(leaf, set, owners)?;
        }
        let password = resolve_secret(
            &key("password"),
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        let poll = poll_range(&key("poll_ms"), self.poll_ms.unwrap_or(default_poll_ms))?;
        if self.kind == PlugKind::Tasmota {
            let topic = self.topic.clone().ok_or_else(|| {
                ConfigError::new(
                    key("topic"),
                    "a Tasmota plug needs its MQTT topic (Configuration → MQTT → Topic, e.g. tasmota_5A3F2B)",
                )
            })?;
            return Ok(Plug {
                id: self.id.clone(),
                kind: self.kind,
                url: format!("mqtt:{}", topic.as_str()),
                topic: Some(topic),
                token: None,
                password: None,
                switch_id: 0,
                poll,
            });
        }
        let given = self.url.as_deref().ok_or_else(|| {
            ConfigError::new(
                key("url"),
                "the plug's address is needed: http://<host>[:port]",
            )
        })?;
        let url = given.trim().trim_end_matches('/').to_string();
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| {
                ConfigError::new(
                    key("url"),
                    format!("{given:?}: plugs answer plain http on the LAN (http://192.168.1.50)"),
                )
            })?
            .split('/')
            .next()
            .unwrap_or("");
        let path_given = url.len() > "http://".len() + host.len();
        if host.is_empty() || host.contains('@') || path_given || url.contains(['?', '#', ' ']) {
            return Err(ConfigError::new(
                key("url"),
                format!("{given:?} is not http://<host>[:port]"),
            ));
        }
        if let Some((_, port)) = host.rsplit_once(':')
            && !host.ends_with(']')
            && port.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(ConfigError::new(
                key("url"),
                format!("the port {port:?} is not a port"),
            ));
        }
        let token = resolve_secret(
            &key("token"),
            self.token.as_ref(),
            self.token_file.as_deref(),
        )?;
        if let Some(t) = &token
            && (t.expose().is_empty() || !t.expose().bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::new(
                key("token"),
                "must be printable ASCII without spaces (it goes into an HTTP header)",
            ));
        }
        Ok(Plug {
            id: self.id.clone(),
            kind: self.kind,
            url,
            topic: None,
            token,
            password,
            switch_id: self.switch_id.unwrap_or(0),
            poll,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `toml` as the body of `[plug_bridge]` (`[[plugs]]` for `[[plug_bridge.plugs]]`).
    fn resolve(toml: &str) -> Result<Plan, ConfigError> {
        let text = format!("[plug_bridge]\n{toml}").replace("[[plugs]]", "[[plug_bridge.plugs]]");
        runtime::ConfigSource::from_parts(None, Some(&text))?.resolve::<crate::PlugBridge>()
    }

    #[test]
    fn mistakes_name_the_key() {
        for (toml, key) in [
            (
                "[[plugs]]\nid = \"a\"\nkind = \"mystrom\"\nurl = \"https://x\"\n",
                "plug_bridge.plugs[0].url",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"mystrom\"\nurl = \"http://x:0\"\n",
                "plug_bridge.plugs[0].url",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"mystrom\"\nurl = \"http://x\"\nswitch_id = 1\n",
                "plug_bridge.plugs[0].switch_id",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"shelly\"\nurl = \"http://x\"\ntoken = \"t\"\n",
                "plug_bridge.plugs[0].token",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"mystrom\"\nurl = \"http://x\"\n[[plugs]]\nid = \"a\"\nkind = \"shelly\"\nurl = \"http://y\"\n",
                "plug_bridge.plugs[1].id",
            ),
            ("poll_ms = 5\n", "plug_bridge.poll_ms"),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"mystrom\"\nurl = \"http://x/report\"\n",
                "plug_bridge.plugs[0].url",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"shelly\"\nurl = \"http://x\"\n[[plugs]]\nid = \"b\"\nkind = \"shelly\"\nurl = \"http://x/\"\n",
                "plug_bridge.plugs[1].url",
            ),
            ("energy_margin_wh = 0.0\n", "plug_bridge.energy_margin_wh"),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"tasmota\"\n",
                "plug_bridge.plugs[0].topic",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"tasmota\"\ntopic = \"t\"\n[[plugs]]\nid = \"b\"\nkind = \"tasmota\"\ntopic = \"t\"\n",
                "plug_bridge.plugs[1].topic",
            ),
            (
                "[plug_bridge.tasmota_broker]\nhost = \"\"\n",
                "plug_bridge.tasmota_broker.host",
            ),
            (
                "[plug_bridge.tasmota_broker]\nhost = \"ha.local\"\npassword = \"x\"\n",
                "plug_bridge.tasmota_broker.username",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"tasmota\"\ntopic = \"t\"\nurl = \"http://x\"\n",
                "plug_bridge.plugs[0].url",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"shelly\"\ntopic = \"t\"\nurl = \"http://x\"\n",
                "plug_bridge.plugs[0].topic",
            ),
            (
                "[[plugs]]\nid = \"a\"\nkind = \"shelly\"\n",
                "plug_bridge.plugs[0].url",
            ),
            (
                "[plug_bridge.api]\nlisten = \"127.0.0.1:9116\"\n",
                "plug_bridge.api.token_file",
            ),
            (
                "[plug_bridge.api]\nlisten = \"127.0.0.1:9116\"\ntoken = \"short\"\n",
                "plug_bridge.api.token",
            ),
            (
                "[plug_bridge.api]\nlisten = \"127.0.0.1:9116\"\ntoken = \"0123456789abcdef\"\ntimeout_ms = 10\n",
                "plug_bridge.api.timeout_ms",
            ),
        ] {
            let e = resolve(toml).expect_err(toml).to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn a_plug_as_a_user_writes_it() {
        let p = resolve(
            "[[plugs]]\nid = \"fridge\"\nkind = \"shelly\"\nurl = \"http://192.168.1.50/\"\npoll_ms = 5000\n",
        )
        .unwrap();
        let plug = &p.plugs[0];
        assert_eq!(plug.url, "http://192.168.1.50");
        assert_eq!((plug.switch_id, plug.poll), (0, Duration::from_secs(5)));
        assert_eq!(
            p.energy_file(Path::new("/var/lib/wattbus")),
            Path::new("/var/lib/wattbus/plug-bridge/plug-bridge/energy.json")
        );
    }
}
