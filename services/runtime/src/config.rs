//! Configuration: built-in defaults → one TOML file → `WATTBUS_<SECTION>__<KEY>` environment.
//!
//! One file serves every service. Top-level keys are shared by all (`site`, `data_dir`, `[log]`,
//! `[bus]`); each service reads its own `[section]`. Every struct denies unknown fields, and the
//! `wattbus` binary also refuses unknown sections, so a typo is an error at start-up rather than a
//! setting silently ignored on a Pi nobody looks at.
//!
//! Errors name the file (or environment variable), the key and what is wrong; `main` prints
//! that one line and exits with [`EXIT_CONFIG`] (64, `EX_USAGE`).
//!
//! Secrets (`password`, `token`, …) may instead be given as `<key>_file`, a path whose content
//! is the secret (Docker secrets). They are held in [`Secret`], whose `Debug` shows `***`, so
//! they cannot end up in a log line.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Metadata, Source};
use proto::Segment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Exit code for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Where the file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/wattbus/wattbus.toml";

/// Prefix of environment overrides: `WATTBUS_BUS__PORT=1884` sets `bus.port`.
pub const ENV_PREFIX: &str = "WATTBUS_";

/// Top-level keys every service shares.
pub const COMMON_KEYS: &[&str] = &["site", "data_dir", "shutdown_grace_ms", "log", "bus"];

/// A configuration problem a person has to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file or environment variable the bad value came from, if known.
    pub origin: Option<String>,
    /// Dotted key, e.g. `bus.port`.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(
                f,
                "config error in {origin}: key `{}`: {}",
                self.key, self.reason
            ),
            None => write!(f, "config error: key `{}`: {}", self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            origin: None,
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A secret value. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        proto::deserialize_text(d).map(Secret)
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; call only where it is handed to a protocol.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, compared without stopping at the first differing byte,
    /// so the time taken does not tell a guesser how much of it was right. (The length is not
    /// hidden.)
    pub fn matches(&self, given: &[u8]) -> bool {
        let a = self.0.as_bytes();
        if a.len() != given.len() {
            return false;
        }
        let diff = a.iter().zip(given).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    /// Serialised (e.g. by `wattbus config check --print`) as `***`, never the value.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Resolve a secret given either inline (`key`) or as a file (`key_file`). Both set is an error:
/// which one wins would be a guess.
pub fn resolve_secret(
    key: &str,
    inline: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            key,
            format!(
                "both `{}` and `{}_file` are set; use one",
                leaf(key),
                leaf(key)
            ),
        )),
        (Some(s), None) => Ok(Some(s.clone())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // Secret files written by `echo` end in a newline that is not part of the secret.
            let value = text.trim_end_matches(['\n', '\r']).to_string();
            if value.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some(Secret(value)))
        }
        (None, None) => Ok(None),
    }
}

/// Serial parity, as a config file writes it (`none`, `even`, `odd`): serial-ingest's ports and
/// modbus-ingest's RTU buses. (Modbus over Serial Line v1.02 §2.5.1 prescribes even parity;
/// the ORNO WE-515 vendor PDF says 8N1 and mbmd's README 8E1, so it is a setting.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

impl Parity {
    /// As written in the config file and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        }
    }

    /// The letter of the `8N1` notation.
    pub const fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
}

/// The variant an entry chose, as written: `protocol = "stream"` on `serial_ingest.ports[1]`.
///
/// One policy for every service: a key that only another variant uses (`host` on an RTU bus,
/// `token` with InfluxDB's v1 API) is refused at start-up, naming the key and the choice it
/// does not fit, rather than ignored. A key that is silently ignored is a setting the person
/// believes is in force: a half-converted config would look right and do something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant<'a> {
    /// The entry that holds the choosing key, e.g. `modbus_ingest.buses[0]`.
    pub at: &'a str,
    /// The choosing key, e.g. `transport`.
    pub selector: &'a str,
    /// What the entry chose, as written in the file, e.g. `rtu`.
    pub chosen: &'a str,
}

impl Variant<'_> {
    /// Refuses `leaf` (relative to [`Variant::at`], e.g. `host` or `channels[0].unit`) when it
    /// is `set` and the chosen variant is not among `owners`, the variants that use it.
    ///
    /// Who may use a key is said once, as the list of its owners, so the check and the message
    /// cannot disagree.
    pub fn refuse_unless(&self, leaf: &str, set: bool, owners: &[&str]) -> Result<(), ConfigError> {
        if !set || owners.contains(&self.chosen) {
            return Ok(());
        }
        let quoted: Vec<String> = owners.iter().map(|o| format!("{o:?}")).collect();
        let owners = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => "no variant".to_string(),
        };
        Err(ConfigError::new(
            format!("{}.{leaf}", self.at),
            format!(
                "belongs to {} = {owners}; {}.{} is {:?}",
                self.selector, self.at, self.selector, self.chosen
            ),
        ))
    }
}

fn optional_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    proto::deserialize_text(d).map(Some)
}

fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Log output settings (`[log]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directives: a level, optionally per module, e.g.
    /// `"info,runtime::delivery=debug"`. `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    /// The filter `level` stands for: the one parse that `config check` (through
    /// [`Common::validate`]) and logging set-up share, so a level that one accepts the other
    /// cannot refuse.
    pub fn filter(&self) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
        parse_filter(&self.level).map_err(|reason| ConfigError::new("log.level", reason))
    }
}

/// A `tracing` filter, or why it is not one.
pub(crate) fn parse_filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(directives)
        .map_err(|e| format!("{directives:?} is not a valid filter: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For a person at a terminal or `journalctl`.
    Text,
    /// One JSON object per line, for Loki and friends.
    Json,
}

/// How services reach the broker (`[bus]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    #[serde(deserialize_with = "proto::deserialize_text")]
    pub host: String,
    pub port: u16,
    #[serde(deserialize_with = "optional_text")]
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive; a dead broker is noticed after about 1.5 times this.
    pub keep_alive_s: u16,
    /// Largest MQTT packet sent or accepted. rumqttc's default (10 KiB) is too small for raw
    /// sample frames.
    pub max_packet_bytes: usize,
    /// Reconnect backoff: starts here, doubles per failure, with jitter so that seven services
    /// do not hammer a restarting broker in lockstep.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Messages queued per subscription before the bus waits for the consumer (and, after
    /// `route_block_ms`, drops; the delivery contract replays what was dropped).
    pub route_capacity: usize,
    pub route_block_ms: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            password_file: None,
            keep_alive_s: 30,
            max_packet_bytes: 1 << 20,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            route_capacity: 4096,
            route_block_ms: 1000,
        }
    }
}

impl BusConfig {
    /// `reconnect_min_ms` doubling to `reconnect_max_ms`.
    pub fn reconnect_backoff(&self) -> Result<crate::backoff::Backoff, ConfigError> {
        crate::backoff::Backoff::from_config_ms(
            "bus.reconnect_min_ms",
            self.reconnect_min_ms,
            "bus.reconnect_max_ms",
            self.reconnect_max_ms,
        )
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.host.trim().is_empty() {
            return Err(ConfigError::new("bus.host", "must not be empty"));
        }
        if self.port == 0 {
            return Err(ConfigError::new("bus.port", "must not be 0"));
        }
        if self.keep_alive_s < 5 {
            return Err(ConfigError::new(
                "bus.keep_alive_s",
                "must be at least 5 (the broker refuses 0)",
            ));
        }
        if !(1024..=(256 << 20)).contains(&self.max_packet_bytes) {
            return Err(ConfigError::new(
                "bus.max_packet_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        self.reconnect_backoff()?;
        // A service that waits longer for its broker holds its readings that long; a huge
        // value (it passed before) meant it never reconnected and its journal filled up.
        if self.reconnect_max_ms > 3_600_000 {
            return Err(ConfigError::new(
                "bus.reconnect_max_ms",
                "must be at most 3600000 (an hour)",
            ));
        }
        // Each queued message may be up to max_packet_bytes: a million is already far more
        // than any Pi can hold, and tokio refuses (panics on) a channel above 2^61.
        if !(1..=1_000_000).contains(&self.route_capacity) {
            return Err(ConfigError::new(
                "bus.route_capacity",
                "must be between 1 and 1000000",
            ));
        }
        if self.password.is_some() && self.username.is_none()
            || self.password_file.is_some() && self.username.is_none()
        {
            return Err(ConfigError::new(
                "bus.username",
                "a password is set but no username",
            ));
        }
        resolve_secret(
            "bus.password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        Ok(())
    }

    /// The password, read from `password_file` if that is how it is given.
    pub fn resolved_password(&self) -> Result<Option<Secret>, ConfigError> {
        resolve_secret(
            "bus.password",
            self.password.as_ref(),
            self.password_file.as_deref(),
        )
    }
}

/// Settings every service shares (top level of the file).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Common {
    /// First level under the version in every topic; one per installation.
    pub site: Segment,
    /// Journals, spools and other state live under here.
    pub data_dir: PathBuf,
    /// After SIGTERM, how long services get to flush before the process exits anyway. Docker
    /// waits 10 s before SIGKILL; stay under it.
    pub shutdown_grace_ms: u64,
    pub log: LogConfig,
    pub bus: BusConfig,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            site: Segment::new("home").unwrap_or_else(|_| unreachable!("valid literal")),
            data_dir: PathBuf::from("/var/lib/wattbus"),
            shutdown_grace_ms: 8000,
            log: LogConfig::default(),
            bus: BusConfig::default(),
        }
    }
}

impl Common {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        self.log.filter()?;
        self.bus.validate()
    }
}

/// The merged configuration sources, before extraction.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    figment: Figment,
    /// The (first) file actually read.
    file: Option<PathBuf>,
    /// Every file read, in layering order, for messages.
    files: Vec<PathBuf>,
}

impl ConfigSource {
    /// Load `path`, or the default path if it exists. A path given explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match path {
            Some(p) => Some(existing(p)?),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.is_file()),
        };
        Self::from_parts(file, None)
    }

    /// Load several files, each layered over the ones before it (a later file's key wins; a
    /// list such as `[[serial_ingest.ports]]` is replaced whole, not extended). None given:
    /// as [`load`](Self::load) with no path. Every file given must exist.
    pub fn load_layers(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        if paths.is_empty() {
            return Self::load(None);
        }
        let files = paths
            .iter()
            .map(|p| existing(p))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_files(files, None)
    }

    /// Build from a file (optional) and an inline TOML string layered on top of it (used by
    /// the demo and tests); environment overrides always apply last.
    pub fn from_parts(file: Option<PathBuf>, inline: Option<&str>) -> Result<Self, ConfigError> {
        Self::from_files(file.into_iter().collect(), inline)
    }

    fn from_files(files: Vec<PathBuf>, inline: Option<&str>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        for f in &files {
            // Read and parse it ourselves first (with the `toml` crate figment itself uses), so
            // that a missing permission is reported plainly and a syntax error names the file
            // and the line; figment would only report it at extraction, without either.
            let text = std::fs::read_to_string(f).map_err(|e| ConfigError {
                origin: Some(f.display().to_string()),
                key: "(file)".into(),
                reason: format!("cannot read: {e}"),
            })?;
            if let Err(e) = text.parse::<toml::Table>() {
                return Err(ConfigError {
                    origin: Some(f.display().to_string()),
                    key: "(syntax)".into(),
                    reason: one_line(&e.to_string()),
                });
            }
            figment = figment.merge(Toml::file_exact(f));
        }
        if let Some(text) = inline {
            figment = figment.merge(Toml::string(text));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]));
        Ok(Self {
            figment,
            file: files.first().cloned(),
            files,
        })
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The shared settings, validated.
    pub fn common(&self) -> Result<Common, ConfigError> {
        let common: Common = self.figment.extract().map_err(|e| self.convert(e, None))?;
        common.validate().map_err(|e| self.locate(e))?;
        Ok(common)
    }

    /// One section as written, not yet resolved. A missing section means all defaults.
    pub fn section<T>(&self, name: &str) -> Result<T, ConfigError>
    where
        T: DeserializeOwned + Default,
    {
        if self.has_key(name) {
            self.figment
                .focus(name)
                .extract()
                .map_err(|e| self.convert(e, Some(name)))
        } else {
            Ok(T::default())
        }
    }

    /// Service `S`'s section, read and resolved into its plan (defaults if it is absent);
    /// errors name the file.
    pub fn resolve<S: crate::Service>(&self) -> Result<S::Plan, ConfigError> {
        self.resolve_edited::<S>(|_| {})
    }

    /// As [`resolve`](Self::resolve), with the section changed first: a tool that shares a
    /// service's section but not all of its work leaves out what it does not do (`wattbus
    /// backup` does not run backup-rotator's native tool, so a recovery machine without it
    /// can still restore).
    pub fn resolve_edited<S: crate::Service>(
        &self,
        edit: impl FnOnce(&mut S::Config),
    ) -> Result<S::Plan, ConfigError> {
        let mut config: S::Config = self.section(S::SECTION)?;
        edit(&mut config);
        S::resolve(config, S::SECTION).map_err(|e| self.locate(e))
    }

    /// Whether the file or environment sets anything in section `name`.
    pub fn has_key(&self, name: &str) -> bool {
        self.figment.find_value(name).is_ok()
    }

    /// Refuse top-level keys that are neither shared nor a known section.
    pub fn check_sections(&self, sections: &[&str]) -> Result<(), ConfigError> {
        let dict: Dict = self.figment.extract().map_err(|e| self.convert(e, None))?;
        for (key, value) in &dict {
            if COMMON_KEYS.contains(&key.as_str()) || sections.contains(&key.as_str()) {
                continue;
            }
            let origin = self.value_origin(value, key);
            let mut known: Vec<&str> = COMMON_KEYS.to_vec();
            known.extend_from_slice(sections);
            return Err(ConfigError {
                origin,
                key: key.clone(),
                reason: format!(
                    "unknown key; known top-level keys are: {}",
                    known.join(", ")
                ),
            });
        }
        Ok(())
    }

    fn value_origin(&self, value: &Value, key: &str) -> Option<String> {
        self.figment
            .get_metadata(value.tag())
            .map(|md| describe_metadata(md, &[key]))
            .or_else(|| self.files_read())
    }

    /// The file read, or all of them when several were layered (so that an error found in
    /// none in particular is never blamed on the first).
    fn files_read(&self) -> Option<String> {
        match self.files.as_slice() {
            [] => None,
            [one] => Some(one.display().to_string()),
            many => Some(
                many.iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
            ),
        }
    }

    /// The value at `key` (`serial_ingest.ports[0].path`: dotted, with list indices), or, if
    /// it is not set (a default), the nearest ancestor that is set inside a list: a list is
    /// replaced whole by the last source that writes it, so it and everything in it come from
    /// that one source. A table is merged from every source that writes part of it, so its
    /// tag says nothing about a key it lacks: `None` then.
    fn nearest_value(&self, key: &str) -> Option<Value> {
        let mut parts = key.split('.').map(|p| match p.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (p, None),
        });
        let (name, mut index) = parts.next()?;
        let mut current = self.figment.find_value(name).ok()?;
        let mut in_list = false;
        loop {
            if let Some(i) = index {
                match &current {
                    Value::Array(_, items) => {
                        in_list = true;
                        match items.get(i) {
                            Some(item) => current = item.clone(),
                            None => return Some(current),
                        }
                    }
                    _ => return in_list.then_some(current),
                }
            }
            let Some((name, next_index)) = parts.next() else {
                return Some(current);
            };
            let child = match &current {
                Value::Dict(_, dict) => dict.get(name).cloned(),
                _ => None,
            };
            match child {
                Some(c) => current = c,
                None => return in_list.then_some(current),
            }
            index = next_index;
        }
    }

    /// A validation error carries only a key; point it at the file, or at the environment
    /// variable when that is where the value came from.
    fn locate(&self, mut e: ConfigError) -> ConfigError {
        if e.origin.is_none() {
            let key = e.key.trim_end_matches("_file").to_string();
            e.origin = self
                .figment
                .find_value(&e.key)
                .ok()
                .or_else(|| self.figment.find_value(&key).ok())
                .or_else(|| self.nearest_value(&e.key))
                .and_then(|v| self.figment.get_metadata(v.tag()).map(|md| (md, v)))
                .map(|(md, _)| describe_metadata(md, &env_path(&e.key)))
                .or_else(|| self.table_sources(&e.key))
                .or_else(|| self.files_read());
        }
        e
    }

    /// For a key left at its default in a table: every source that sets something in the
    /// deepest table on its path that is set (a file, another file, an environment variable),
    /// since any of them may be what the default does not fit. `None` if no table on the path
    /// is set.
    fn table_sources(&self, key: &str) -> Option<String> {
        let mut path: Vec<String> = Vec::new();
        let mut table = None;
        for part in key.split('.') {
            if part.contains('[') {
                break;
            }
            path.push(part.to_string());
            match self.figment.find_value(&path.join(".")) {
                Ok(v @ Value::Dict(..)) => table = Some(v),
                _ => {
                    path.pop();
                    break;
                }
            }
        }
        let mut sources = std::collections::BTreeSet::new();
        self.collect_sources(&table?, &mut path, &mut sources);
        (!sources.is_empty()).then(|| sources.into_iter().collect::<Vec<_>>().join(" + "))
    }

    fn collect_sources(
        &self,
        value: &Value,
        path: &mut Vec<String>,
        out: &mut std::collections::BTreeSet<String>,
    ) {
        match value {
            Value::Dict(_, dict) => {
                for (k, v) in dict {
                    path.push(k.clone());
                    self.collect_sources(v, path, out);
                    path.pop();
                }
            }
            leaf => {
                if let Some(md) = self.figment.get_metadata(leaf.tag()) {
                    let levels: Vec<&str> = path.iter().map(String::as_str).collect();
                    out.insert(describe_metadata(md, &levels));
                }
            }
        }
    }

    fn convert(&self, e: figment::Error, section: Option<&str>) -> ConfigError {
        // figment reports one error at a time with a path relative to what was extracted.
        // A section is extracted from a focused figment, so its paths are relative to it.
        let mut path: Vec<String> = section.map(|s| vec![s.to_string()]).unwrap_or_default();
        path.extend(e.path.iter().cloned());
        let origin = e
            .metadata
            .as_ref()
            .map(|md| describe_metadata(md, &path.iter().map(String::as_str).collect::<Vec<_>>()))
            .or_else(|| self.files_read());
        let mut key = path.join(".");
        // For an unknown field, the path points at its parent; name the field itself.
        if let figment::error::Kind::UnknownField(field, _) = &e.kind
            && path.last() != Some(field)
        {
            key = if key.is_empty() {
                field.clone()
            } else {
                format!("{key}.{field}")
            };
        }
        if key.is_empty() {
            key = "(top level)".into();
        }
        ConfigError {
            origin,
            key,
            reason: one_line(&e.kind.to_string()),
        }
    }
}

/// `p`, if it is a file: a config file named explicitly must exist.
fn existing(p: &Path) -> Result<PathBuf, ConfigError> {
    if p.is_file() {
        Ok(p.to_path_buf())
    } else {
        Err(ConfigError {
            origin: Some(p.display().to_string()),
            key: "(file)".into(),
            reason: "file not found or not a regular file".into(),
        })
    }
}

/// The levels of `key` an environment variable can name: up to its first list (a list is
/// set whole, `WATTBUS_SERIAL_INGEST__PORTS='[…]'`).
fn env_path(key: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for part in key.split('.') {
        match part.split_once('[') {
            Some((name, _)) => {
                out.push(name);
                break;
            }
            None => out.push(part),
        }
    }
    out
}

fn describe_metadata(md: &Metadata, path: &[&str]) -> String {
    match &md.source {
        Some(Source::File(p)) => p.display().to_string(),
        _ if md.name.contains("environment") => {
            let var = format!("{ENV_PREFIX}{}", path.join("__").to_uppercase());
            format!("environment variable {var}")
        }
        _ => md.name.to_string(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The two delivery-journal kinds (see `journal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalKind {
    /// Segment files under `data_dir`: survives restarts. For readings.
    Disk,
    /// A bounded ring in memory: lost on restart. For streams where loss is acceptable (raw
    /// sample frames at kHz rates would wear an SD card out).
    Memory,
}

/// Delivery settings of one producer stream (`[<service>.streams.<name>]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub journal: JournalKind,
    /// Bound on the journal. When full, the oldest records are dropped (ERROR log, counter).
    pub max_bytes: u64,
    /// Disk journals are split into segment files of about this size; whole segments are
    /// deleted once acknowledged, which costs no rewrite on the SD card.
    pub segment_bytes: u64,
    /// A record not yet stored by every sink group waited for this long after it was appended
    /// is fsynced: what a power cut can take is about this (plus a tick of at most 500 ms) of
    /// readings not stored everywhere. Records every group stores sooner are not fsynced for
    /// their own sake (they are durable where they were stored), which spares the card; the
    /// default leaves room for influx-writer's 1 s batches. 0 = fsync after every record. A
    /// killed process loses nothing either way: records are written to the kernel before they
    /// are published.
    pub fsync_interval_ms: u64,
    /// Sink groups whose acknowledgement the journal waits for before trimming, besides every
    /// group that registered for the stream (see `delivery`). Listing a group here holds
    /// readings for it even before its first registration arrives. With no group at all,
    /// nothing is trimmed: the journal holds every reading (up to `max_bytes`).
    pub wait_for: Vec<Segment>,
    /// A record not acknowledged by a sink group this long after it was published is
    /// published again; the wait doubles while nothing is acknowledged, up to
    /// `ack_timeout_max_ms`.
    pub ack_timeout_ms: u64,
    pub ack_timeout_max_ms: u64,
    /// Most records re-published in one replay round, so a long outage drains in steps.
    pub replay_batch: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            journal: JournalKind::Disk,
            max_bytes: 64 << 20,
            segment_bytes: 4 << 20,
            fsync_interval_ms: 2000,
            wait_for: Vec::new(),
            ack_timeout_ms: 10_000,
            ack_timeout_max_ms: 300_000,
            replay_batch: 10_000,
        }
    }
}

/// `ack_timeout_ms` and `ack_timeout_max_ms` by default.
const DEFAULT_REPLAY: crate::backoff::Backoff = crate::backoff::Backoff::constant(
    std::time::Duration::from_secs(10),
    std::time::Duration::from_secs(300),
);

impl StreamConfig {
    /// A group's replay timeout: `ack_timeout_ms` doubling to `ack_timeout_max_ms`. `validate`
    /// refuses values that make no backoff; a config built in code without it gets its maximum
    /// raised to its minimum.
    pub fn replay_backoff(&self) -> crate::backoff::Backoff {
        let min = std::time::Duration::from_millis(self.ack_timeout_ms.max(1));
        let max = std::time::Duration::from_millis(self.ack_timeout_max_ms).max(min);
        crate::backoff::Backoff::new(min, max).unwrap_or(DEFAULT_REPLAY)
    }

    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.max_bytes < 64 * 1024 {
            return Err(ConfigError::new(
                format!("{key}.max_bytes"),
                "must be at least 65536",
            ));
        }
        if self.segment_bytes < 4096 || self.segment_bytes > self.max_bytes / 2 {
            return Err(ConfigError::new(
                format!("{key}.segment_bytes"),
                "must be between 4096 and half of max_bytes",
            ));
        }
        if self.ack_timeout_ms < 100 {
            return Err(ConfigError::new(
                format!("{key}.ack_timeout_ms"),
                "must be at least 100",
            ));
        }
        crate::backoff::Backoff::from_config_ms(
            &format!("{key}.ack_timeout_ms"),
            self.ack_timeout_ms,
            &format!("{key}.ack_timeout_max_ms"),
            self.ack_timeout_max_ms,
        )?;
        if self.replay_batch == 0 {
            return Err(ConfigError::new(
                format!("{key}.replay_batch"),
                "must be > 0",
            ));
        }
        Ok(())
    }
}

/// Settings of a consumer (`[<service>.inbox]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    /// Subscribe as `$share/<group>/...` so that several instances split the messages.
    pub shared: bool,
    /// Acknowledgements are collected and published at this interval.
    pub ack_interval_ms: u64,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            shared: false,
            ack_interval_ms: 200,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        rate_hz: u32,
        token: Option<Secret>,
        token_file: Option<PathBuf>,
    }

    /// A service whose section is `[demo]`.
    struct DemoService;

    impl crate::Service for DemoService {
        const NAME: &'static str = "demo";
        const SECTION: &'static str = "demo";
        const ABOUT: &'static str = "A section for these tests.";
        type Config = Demo;
        type Plan = Demo;
        type Error = std::io::Error;

        fn resolve(config: Demo, section: &str) -> Result<Demo, ConfigError> {
            if config.rate_hz > 100 {
                return Err(ConfigError::new(
                    format!("{section}.rate_hz"),
                    "must be at most 100",
                ));
            }
            resolve_secret(
                &format!("{section}.token"),
                config.token.as_ref(),
                config.token_file.as_deref(),
            )?;
            Ok(config)
        }

        fn health_listen(_: &Demo) -> Option<std::net::SocketAddr> {
            None
        }

        async fn run(_: Demo, _: crate::Context) -> Result<(), std::io::Error> {
            Ok(())
        }
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wattbus.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn wrong_type_names_file_key_and_reason() {
        let (_d, path) = file("[bus]\nport = \"eighteen\"\n");
        let e = ConfigSource::load(Some(&path))
            .unwrap()
            .common()
            .unwrap_err();
        assert_eq!(e.key, "bus.port");
        assert_eq!(
            e.origin.as_deref(),
            Some(path.display().to_string().as_str())
        );
        assert!(e.reason.contains("string"), "{e}");
    }

    #[test]
    fn unknown_field_and_unknown_section_are_refused() {
        let (_d, path) = file("[demo]\nrate_hx = 5\n");
        let src = ConfigSource::load(Some(&path)).unwrap();
        let e = src.resolve::<DemoService>().unwrap_err();
        assert_eq!(e.key, "demo.rate_hx");
        assert!(e.reason.contains("unknown field"), "{e}");
        let (_d, path) = file("[dmeo]\nrate_hz = 5\n");
        let e = ConfigSource::load(Some(&path))
            .unwrap()
            .check_sections(&["demo"])
            .unwrap_err();
        assert_eq!(e.key, "dmeo");
        assert!(e.to_string().contains(
            "known top-level keys are: site, data_dir, shutdown_grace_ms, log, bus, demo"
        ));
    }

    #[test]
    fn a_log_level_that_logging_refuses_is_a_config_error_naming_the_file() {
        // `config check` once accepted this and `run` refused it at logging set-up.
        let (_d, path) = file("[log]\nlevel = \"info,rumqttd=loud\"\n");
        let e = ConfigSource::load(Some(&path))
            .unwrap()
            .common()
            .unwrap_err();
        assert_eq!(e.key, "log.level");
        assert!(e.reason.contains("not a valid filter"), "{e}");
        assert_eq!(
            e.origin.as_deref(),
            Some(path.display().to_string().as_str())
        );
        let (_d, path) = file("[log]\nlevel = \"warn,rumqttd=off\"\n");
        assert!(ConfigSource::load(Some(&path)).unwrap().common().is_ok());
    }

    #[test]
    fn syntax_error_names_the_file_and_line() {
        let (_d, path) = file("site = \"home\"\n[bus\nport = 1\n");
        let e = ConfigSource::load(Some(&path)).unwrap_err();
        assert!(e.origin.as_deref().unwrap().ends_with("wattbus.toml"));
        assert!(e.reason.contains("line 2"), "{e}");
    }

    #[test]
    fn validation_errors_point_at_the_file() {
        let (_d, path) = file("[demo]\nrate_hz = 500\n");
        let e = ConfigSource::load(Some(&path))
            .unwrap()
            .resolve::<DemoService>()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "config error in {}: key `demo.rate_hz`: must be at most 100",
                path.display()
            )
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error_not_defaults() {
        let e = ConfigSource::load(Some(Path::new("/nonexistent/w.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/w.toml"));
    }

    #[test]
    fn bad_site_is_refused() {
        let (_d, path) = file("site = \"my/home\"\n");
        let e = ConfigSource::load(Some(&path))
            .unwrap()
            .common()
            .unwrap_err();
        assert_eq!(e.key, "site");
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        std::fs::write(&secret, "s3cr3t\n").unwrap();
        let got = resolve_secret("demo.token", None, Some(&secret))
            .unwrap()
            .unwrap();
        assert_eq!(got.expose(), "s3cr3t");
        assert_eq!(format!("{got:?}"), "Secret(***)");
        let both = resolve_secret("demo.token", Some(&got), Some(&secret)).unwrap_err();
        assert!(both.reason.contains("both `token` and `token_file`"));
        let missing =
            resolve_secret("demo.token", None, Some(&dir.path().join("nope"))).unwrap_err();
        assert_eq!(missing.key, "demo.token_file");
    }

    #[test]
    fn a_key_of_another_variant_is_refused_naming_the_key_and_the_choice() {
        let bus = Variant {
            at: "demo.buses[0]",
            selector: "transport",
            chosen: "rtu",
        };
        assert_eq!(bus.refuse_unless("host", false, &["tcp"]), Ok(()));
        assert_eq!(bus.refuse_unless("path", true, &["rtu"]), Ok(()));
        assert_eq!(
            bus.refuse_unless("baud", true, &["rtu", "rtu-over-tcp"]),
            Ok(())
        );
        let e = bus
            .refuse_unless("host", true, &["tcp", "rtu-over-tcp"])
            .unwrap_err();
        assert_eq!(e.key, "demo.buses[0].host");
        assert_eq!(
            e.reason,
            "belongs to transport = \"tcp\" or \"rtu-over-tcp\"; demo.buses[0].transport is \"rtu\""
        );
        let e = bus.refuse_unless("x", true, &["a", "b", "c"]).unwrap_err();
        assert_eq!(
            e.reason,
            "belongs to transport = \"a\", \"b\" or \"c\"; demo.buses[0].transport is \"rtu\""
        );
    }

    #[test]
    fn a_refused_key_points_at_the_file() {
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct Link {
            kind: String,
            host: Option<String>,
        }
        struct LinkService;
        impl crate::Service for LinkService {
            const NAME: &'static str = "link";
            const SECTION: &'static str = "link";
            const ABOUT: &'static str = "A section for this test.";
            type Config = Link;
            type Plan = Link;
            type Error = std::io::Error;

            fn resolve(config: Link, section: &str) -> Result<Link, ConfigError> {
                Variant {
                    at: section,
                    selector: "kind",
                    chosen: &config.kind,
                }
                .refuse_unless("host", config.host.is_some(), &["tcp"])?;
                Ok(config)
            }

            fn health_listen(_: &Link) -> Option<std::net::SocketAddr> {
                None
            }

            async fn run(_: Link, _: crate::Context) -> Result<(), std::io::Error> {
                Ok(())
            }
        }
        let (_d, path) = file("[link]\nkind = \"serial\"\nhost = \"10.0.0.5\"\n");
        let e = ConfigSource::load(Some(&path))
            .unwrap()
            .resolve::<LinkService>()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "config error in {}: key `link.host`: belongs to kind = \"tcp\"; link.kind is \"serial\"",
                path.display()
            )
        );
    }

    #[test]
    fn inline_layer_and_defaults_apply() {
        let src =
            ConfigSource::from_parts(None, Some("site = \"lab\"\n[bus]\nport = 2883\n")).unwrap();
        let c = src.common().unwrap();
        assert_eq!(c.site.as_str(), "lab");
        assert_eq!(c.bus.port, 2883);
        assert_eq!(c.bus.keep_alive_s, 30);
        assert_eq!(src.resolve::<DemoService>().unwrap().rate_hz, 0);
    }
}
