//! The `[influx_writer]` section.

use std::path::{Path, PathBuf};

use proto::Segment;
use runtime::backoff::Backoff;
use runtime::config::{ConfigError, InboxConfig, Secret, Variant, resolve_secret};
use runtime::state::{Claim, ClaimError};
use serde::Deserialize;

use crate::line_protocol::Precision;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id and state directory name; two writers on one broker need different ones.
    pub instance: Segment,
    /// The sink group this writer registers and acknowledges as: producers of readings wait
    /// for it. Two writers with the same group and `inbox.shared = true` split the readings
    /// between them.
    pub group: Segment,
    pub inbox: InboxConfig,
    /// A batch is written when it holds this many points …
    pub batch_points: usize,
    /// … or when its oldest point has waited this long.
    pub flush_interval_ms: u64,
    /// Where InfluxDB is. Absent: no InfluxDB output.
    pub influx: Option<InfluxConfig>,
    /// An HTTP endpoint that takes readings as JSON. Absent: no HTTP output. (With neither
    /// this nor `influx`, the file output is on by default.)
    pub http: Option<HttpConfig>,
    /// Local rotating files.
    pub files: FilesConfig,
    /// The spool that holds batches while InfluxDB cannot take them.
    pub spool: SpoolConfig,
    /// Points InfluxDB refused (400) are appended here, one JSON object per line, besides
    /// being published on the dead-letter topic. Default: `<data_dir>/<instance>/dead-letters.jsonl`.
    pub dead_letter_file: Option<PathBuf>,
    /// Rotated to `<file>.1` at this size (one old file kept).
    pub dead_letter_max_bytes: u64,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<std::net::SocketAddr>,
    /// How many writers may share one data directory (`docker compose up --scale
    /// influx-writer=N` over one volume). Each takes the first free slot: `instance`,
    /// `instance-2`, … as its client id and state directory, and the same one again after a
    /// restart. 1: a second writer on the same data directory refuses to start.
    pub max_replicas: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: seg("influx-writer"),
            group: seg("influx-writer"),
            inbox: InboxConfig::default(),
            batch_points: 5000,
            flush_interval_ms: 1000,
            influx: None,
            http: None,
            files: FilesConfig::default(),
            spool: SpoolConfig::default(),
            dead_letter_file: None,
            dead_letter_max_bytes: 16 << 20,
            health_listen: Some(([127, 0, 0, 1], 9105).into()),
            max_replicas: 1,
        }
    }
}

fn seg(s: &str) -> Segment {
    Segment::new(s).unwrap_or_else(|_| unreachable!("valid literal"))
}

/// Which InfluxDB write API to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteApi {
    /// `POST /api/v2/write?org=&bucket=` with `Authorization: Token …`: InfluxDB 2.x, 1.8+,
    /// 3.x, VictoriaMetrics.
    V2,
    /// `POST /write?db=&rp=` with user and password: InfluxDB 1.x (1.6/1.7 have nothing else).
    V1,
}

impl WriteApi {
    /// As written in the file.
    pub const fn as_str(self) -> &'static str {
        match self {
            WriteApi::V2 => "v2",
            WriteApi::V1 => "v1",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluxConfig {
    /// Base URL, e.g. `http://influxdb:8086` (a path prefix behind a proxy is kept).
    pub url: String,
    pub api: WriteApi,
    /// v2: organisation and bucket. InfluxDB 1.8 takes `bucket = "db/rp"` and any org.
    pub org: Option<String>,
    pub bucket: Option<String>,
    /// v2: the API token (or `token_file`). InfluxDB 1.8's v2 endpoint takes `user:password`.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    /// v1: database and (optional) retention policy.
    pub database: Option<String>,
    pub retention_policy: Option<String>,
    /// v1: credentials, if the server has authentication on.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// Timestamp precision sent to the server. Readings carry milliseconds, so `ms` loses
    /// nothing and keeps lines short.
    pub precision: Precision,
    /// Compress request bodies (a batch of readings shrinks ~10×).
    pub gzip: bool,
    /// One request, connect to last byte.
    pub timeout_ms: u64,
    /// Backoff after a failed write: doubles from `retry_min_ms` up to `retry_max_ms`, with
    /// jitter.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            api: WriteApi::V2,
            org: None,
            bucket: None,
            token: None,
            token_file: None,
            database: None,
            retention_policy: None,
            username: None,
            password: None,
            password_file: None,
            precision: Precision::Ms,
            gzip: true,
            timeout_ms: 10_000,
            retry_min_ms: 500,
            retry_max_ms: 60_000,
        }
    }
}

/// `[influx_writer.http]`: readings POSTed as JSON to a URL (docs/http-output.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where readings are POSTed, e.g. `https://api.example.com/energy/readings`.
    pub url: String,
    /// A token, sent as `Authorization: Bearer <token>` (or in `token_header`). Prefer
    /// `token_file`: a secret in the config file ends up in backups and screenshots.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    /// Send the token as-is in this header instead (e.g. `X-Api-Key`).
    pub token_header: Option<String>,
    /// Basic authentication, instead of a token.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA (or CAs) that signed the endpoint's certificate, trusted beside the
    /// system's: a home server with its own CA.
    pub ca_file: Option<PathBuf>,
    /// Compress request bodies (`Content-Encoding: gzip`). Off by default: many receivers
    /// (Node-RED's `http in`, most web frameworks) do not decode compressed requests.
    pub gzip: bool,
    /// One reading per request, its body the reading itself (PowMon's way), rather than
    /// batches.
    pub one_per_request: bool,
    /// A request holds at most this many readings …
    pub max_readings: usize,
    /// … and this many bytes of readings (before compression) …
    pub max_bytes: usize,
    /// … and is sent when its first reading has waited this long (readings arrive in the
    /// writer's batches, every `flush_interval_ms` at most).
    pub max_age_ms: u64,
    /// One request, connect to last byte.
    pub timeout_ms: u64,
    /// Backoff after a failed request: doubles from `retry_min_ms` up to `retry_max_ms`,
    /// with jitter.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token: None,
            token_file: None,
            token_header: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            gzip: false,
            one_per_request: false,
            max_readings: 1000,
            max_bytes: 1 << 20,
            max_age_ms: 1000,
            timeout_ms: 10_000,
            retry_min_ms: 500,
            retry_max_ms: 60_000,
        }
    }
}

/// The longest `[influx_writer.http] max_age_ms`: half the producers' default
/// acknowledgement timeout, so waiting readings are not sent again meanwhile.
pub const MAX_HTTP_AGE_MS: u64 = 5_000;

/// How the HTTP output authenticates.
#[derive(Debug, Clone)]
pub enum HttpAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// The token as-is in this header.
    Header { name: String, token: Secret },
    /// `Authorization: Basic …`, the header value.
    Basic(Secret),
}

/// The HTTP output with its secrets and CA read.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub cfg: HttpConfig,
    pub auth: Option<HttpAuth>,
    /// The PEM of `ca_file`.
    pub ca_pem: Option<Vec<u8>>,
    pub retry: Backoff,
}

/// The file output's row format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileFormat {
    /// CSV, one row per field value:
    /// `time,site,device,channel,measurement,field,value,quality`.
    Csv,
    /// CSV with one row per reading in PowMon's column order: `time,device,amps,watts`.
    CsvPowmon,
    /// InfluxDB line protocol (ms timestamps): `influx -import` or a `curl` to `/write`
    /// loads it later.
    LineProtocol,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// `None`: on exactly when no `[influx_writer.influx]` is configured, so a fresh
    /// machine stores its readings somewhere.
    pub enabled: Option<bool>,
    /// Default: `<data_dir>/readings`.
    pub dir: Option<PathBuf>,
    pub format: FileFormat,
    /// Start a new file at this size …
    pub max_bytes: u64,
    /// … or when the current one is this old (0: never by age).
    pub max_age_s: u64,
    /// Compress a file when it is rotated (`.gz`).
    pub gzip: bool,
    /// Delete the oldest rotated files beyond this many (0: keep all).
    pub keep_files: usize,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            dir: None,
            format: FileFormat::Csv,
            max_bytes: 16 << 20,
            max_age_s: 86_400,
            gzip: false,
            keep_files: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Bound on the spool. When full, the oldest batches are dropped (ERROR log, counter).
    /// 256 MiB is about 2.5 million readings: a month of 10 meters at 1 Hz is 26 million.
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            segment_bytes: 4 << 20,
        }
    }
}

/// The InfluxDB target with its secrets resolved.
#[derive(Debug, Clone)]
pub struct InfluxTarget {
    pub cfg: InfluxConfig,
    /// `Authorization` header value (`Token …` or `Basic …`), if any.
    pub auth: Option<Secret>,
    /// `retry_min_ms` doubling to `retry_max_ms`.
    pub retry: Backoff,
}

impl Config {
    pub fn files_enabled(&self) -> bool {
        self.files
            .enabled
            .unwrap_or(self.influx.is_none() && self.http.is_none())
    }

    pub fn state_dir(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(self.instance.as_str())
    }

    pub fn files_dir(&self, data_dir: &Path) -> PathBuf {
        self.files
            .dir
            .clone()
            .unwrap_or_else(|| data_dir.join("readings"))
    }

    pub fn dead_letter_path(&self, data_dir: &Path) -> PathBuf {
        self.dead_letter_file
            .clone()
            .unwrap_or_else(|| self.state_dir(data_dir).join("dead-letters.jsonl"))
    }

    /// Where messages from the bus that are not storable readings (malformed, or naming
    /// another identity than their topic) are kept: beside the dead-letter file, never in it.
    /// Any client allowed to publish readings can send those, as many as it likes; in the
    /// same file they rotated the points InfluxDB refused, whose only copy it is, away.
    pub fn malformed_path(&self, data_dir: &Path) -> PathBuf {
        let dead = self.dead_letter_path(data_dir);
        let stem = dead.file_stem().map_or_else(
            || "dead-letters".into(),
            |s| s.to_string_lossy().into_owned(),
        );
        dead.with_file_name(format!("{stem}.malformed.jsonl"))
    }

    /// Resolve secrets and check what the chosen API needs.
    fn target(&self, section: &str) -> Result<Option<InfluxTarget>, ConfigError> {
        let Some(c) = &self.influx else {
            return Ok(None);
        };
        let key = |k: &str| format!("{section}.influx.{k}");
        let url = c.url.trim();
        if url.is_empty() {
            return Err(ConfigError::new(
                key("url"),
                "is required, e.g. \"http://influxdb:8086\"",
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::new(
                key("url"),
                "must start with http:// or https://",
            ));
        }
        // Readings carry milliseconds; InfluxDB keys a point by series and time, so in whole
        // seconds a meter read twice a second keeps one reading and overwrites the other.
        if matches!(c.precision, Precision::S) {
            return Err(ConfigError::new(
                key("precision"),
                "\"s\" would store two readings of one series within a second as one point (the later overwrites the earlier); use \"ms\" (the default), \"us\" or \"ns\"",
            ));
        }
        // `http://user:secret@host` would put a secret in every log line naming the endpoint.
        let authority = url.split_once("://").map_or("", |(_, rest)| {
            rest.split(['/', '?', '#']).next().unwrap_or("")
        });
        if authority.contains('@') {
            return Err(ConfigError::new(
                key("url"),
                "must not hold credentials; use token / token_file (v2) or username and password / password_file (v1)",
            ));
        }
        // Keys of the other API are refused, not ignored: a half-converted config would
        // otherwise look right and write nowhere.
        let at = format!("{section}.influx");
        let api = Variant {
            at: &at,
            selector: "api",
            chosen: c.api.as_str(),
        };
        const V1: &[&str] = &[WriteApi::V1.as_str()];
        const V2: &[&str] = &[WriteApi::V2.as_str()];
        for (leaf, set, owners) in [
            ("org", c.org.is_some(), V2),
            ("bucket", c.bucket.is_some(), V2),
            ("token", c.token.is_some(), V2),
            ("token_file", c.token_file.is_some(), V2),
            ("database", c.database.is_some(), V1),
            ("retention_policy", c.retention_policy.is_some(), V1),
            ("username", c.username.is_some(), V1),
            ("password", c.password.is_some(), V1),
            ("password_file", c.password_file.is_some(), V1),
        ] {
            api.refuse_unless(leaf, set, owners)?;
        }
        let auth = match c.api {
            WriteApi::V2 => {
                for (k, v) in [("org", &c.org), ("bucket", &c.bucket)] {
                    if v.as_deref().is_none_or(|s| s.trim().is_empty()) {
                        return Err(ConfigError::new(key(k), "is required with api = \"v2\""));
                    }
                }
                let token =
                    resolve_secret(&key("token"), c.token.as_ref(), c.token_file.as_deref())?;
                token.map(|t| Secret::new(format!("Token {}", t.expose())))
            }
            WriteApi::V1 => {
                if c.database.as_deref().is_none_or(|s| s.trim().is_empty()) {
                    return Err(ConfigError::new(
                        key("database"),
                        "is required with api = \"v1\"",
                    ));
                }
                let password = resolve_secret(
                    &key("password"),
                    c.password.as_ref(),
                    c.password_file.as_deref(),
                )?;
                match (&c.username, password) {
                    (None, None) => None,
                    (Some(u), Some(p)) => {
                        Some(Secret::new(influx_client::basic_auth(u, p.expose())))
                    }
                    (None, Some(_)) => {
                        return Err(ConfigError::new(
                            key("username"),
                            "is required with a password",
                        ));
                    }
                    (Some(_), None) => {
                        return Err(ConfigError::new(
                            key("password"),
                            "is required with a username (or password_file)",
                        ));
                    }
                }
            }
        };
        let retry = Backoff::from_config_ms(
            &key("retry_min_ms"),
            c.retry_min_ms,
            &key("retry_max_ms"),
            c.retry_max_ms,
        )?;
        Ok(Some(InfluxTarget {
            cfg: c.clone(),
            auth,
            retry,
        }))
    }
}

impl Config {
    /// The HTTP output's settings checked and its secrets and CA read.
    fn http_target(&self, section: &str) -> Result<Option<HttpTarget>, ConfigError> {
        let Some(c) = &self.http else {
            return Ok(None);
        };
        let key = |k: &str| format!("{section}.http.{k}");
        let url = c.url.trim();
        if url.is_empty() {
            return Err(ConfigError::new(
                key("url"),
                "is required, e.g. \"https://example.com/readings\"",
            ));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| ConfigError::new(key("url"), format!("is not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ConfigError::new(
                key("url"),
                "must start with http:// or https://",
            ));
        }
        // In the URL, a secret would be in every log line naming the endpoint.
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(ConfigError::new(
                key("url"),
                "must not hold credentials; use username and password / password_file, or token / token_file",
            ));
        }
        if !(100..=600_000).contains(&c.timeout_ms) {
            return Err(ConfigError::new(
                key("timeout_ms"),
                "must be between 100 and 600000",
            ));
        }
        if c.retry_min_ms < 10 {
            return Err(ConfigError::new(key("retry_min_ms"), "must be at least 10"));
        }
        if !(1..=100_000).contains(&c.max_readings) {
            return Err(ConfigError::new(
                key("max_readings"),
                "must be between 1 and 100000",
            ));
        }
        if !(1024..=64 << 20).contains(&c.max_bytes) {
            return Err(ConfigError::new(
                key("max_bytes"),
                "must be between 1024 and 67108864",
            ));
        }
        if c.max_age_ms > MAX_HTTP_AGE_MS {
            return Err(ConfigError::new(
                key("max_age_ms"),
                format!(
                    "must be at most {MAX_HTTP_AGE_MS} (5 s): readings wait unacknowledged meanwhile, and their producers send them again after ack_timeout_ms (10 s by default), so each would arrive several times; for fewer requests raise max_readings"
                ),
            ));
        }
        let token = resolve_secret(&key("token"), c.token.as_ref(), c.token_file.as_deref())?;
        let password = resolve_secret(
            &key("password"),
            c.password.as_ref(),
            c.password_file.as_deref(),
        )?;
        if let Some(t) = &token
            && (t.expose().trim().is_empty() || t.expose().chars().any(char::is_control))
        {
            return Err(ConfigError::new(
                key("token"),
                "is empty or holds a control character (a header cannot carry it)",
            ));
        }
        if let Some(h) = &c.token_header {
            if reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    key("token_header"),
                    format!("{h:?} is not a valid header name"),
                ));
            }
            const OWN: &[&str] = &[
                "content-type",
                "content-length",
                "content-encoding",
                "transfer-encoding",
                "host",
                "connection",
                "user-agent",
                "te",
                "upgrade",
                "expect",
            ];
            if OWN.contains(&h.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::new(
                    key("token_header"),
                    format!(
                        "{h:?} is a header of the request itself; name the one the endpoint reads the token from (e.g. \"X-Api-Key\"), or leave it out for Authorization: Bearer"
                    ),
                ));
            }
        }
        let auth = match (token, &c.username, password) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(ConfigError::new(
                    key("token"),
                    "and username/password are both set; use one",
                ));
            }
            (Some(t), None, None) => Some(match &c.token_header {
                Some(name) => HttpAuth::Header {
                    name: name.clone(),
                    token: t,
                },
                None => HttpAuth::Bearer(t),
            }),
            (None, Some(u), Some(p)) => {
                if u.is_empty() || u.contains(':') || u.chars().any(char::is_control) {
                    return Err(ConfigError::new(
                        key("username"),
                        "is empty or holds ':' or a control character, which HTTP Basic authentication cannot carry",
                    ));
                }
                if c.token_header.is_some() {
                    return Err(ConfigError::new(
                        key("token_header"),
                        "is set without a token",
                    ));
                }
                Some(HttpAuth::Basic(Secret::new(influx_client::basic_auth(
                    u,
                    p.expose(),
                ))))
            }
            (None, Some(_), None) => {
                return Err(ConfigError::new(
                    key("password"),
                    "is required with a username (or password_file)",
                ));
            }
            (None, None, Some(_)) => {
                return Err(ConfigError::new(
                    key("username"),
                    "is required with a password",
                ));
            }
            (None, None, None) => {
                if c.token_header.is_some() {
                    return Err(ConfigError::new(
                        key("token_header"),
                        "is set without a token",
                    ));
                }
                None
            }
        };
        let ca_pem = match &c.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::new(
                        key("ca_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certs) if !certs.is_empty() => Some(pem),
                    Ok(_) => {
                        return Err(ConfigError::new(
                            key("ca_file"),
                            format!("{} holds no PEM certificate", path.display()),
                        ));
                    }
                    Err(e) => {
                        return Err(ConfigError::new(
                            key("ca_file"),
                            format!("{} is not a PEM certificate: {e}", path.display()),
                        ));
                    }
                }
            }
        };
        let retry = Backoff::from_config_ms(
            &key("retry_min_ms"),
            c.retry_min_ms,
            &key("retry_max_ms"),
            c.retry_max_ms,
        )?;
        Ok(Some(HttpTarget {
            cfg: c.clone(),
            auth,
            ca_pem,
            retry,
        }))
    }
}

/// The section, checked, with the InfluxDB and HTTP targets resolved (secrets read): what
/// [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan {
    config: Config,
    target: Option<InfluxTarget>,
    http: Option<HttpTarget>,
}

impl std::ops::Deref for Plan {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl Plan {
    /// The InfluxDB output, if configured.
    pub fn target(&self) -> Option<&InfluxTarget> {
        self.target.as_ref()
    }

    /// The HTTP output, if configured.
    pub fn http_target(&self) -> Option<&HttpTarget> {
        self.http.as_ref()
    }

    /// Whether an output with a spool is configured (the outputs replicas can share).
    pub fn spooled_outputs(&self) -> bool {
        self.target.is_some() || self.http.is_some()
    }

    /// Take this process's replica slot under `data_dir`: from then on `instance` is the
    /// slot's name, held until the claim is dropped.
    pub fn claim_slot(&mut self, data_dir: &Path) -> Result<Claim, ClaimError> {
        let claim = if self.max_replicas > 1 {
            Claim::first_free(data_dir, "influx-writer", &self.instance, self.max_replicas)?
        } else {
            Claim::exclusive(
                data_dir,
                "influx-writer",
                &self.instance,
                " (or let several share it: `influx_writer.max_replicas`)",
            )?
        };
        self.config.instance = claim.instance().clone();
        Ok(claim)
    }
}

impl Config {
    /// Check the section and read its secrets; errors name `section.key`.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        self.check(section)?;
        let target = self.target(section)?;
        let http = self.http_target(section)?;
        Ok(Plan {
            config: self,
            target,
            http,
        })
    }

    fn check(&self, section: &str) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.max_replicas) {
            return Err(ConfigError::new(
                format!("{section}.max_replicas"),
                "must be between 1 and 64",
            ));
        }
        if self.max_replicas > 1 && (self.files_enabled() || self.dead_letter_file.is_some()) {
            return Err(ConfigError::new(
                format!("{section}.max_replicas"),
                "is above 1 while the files output or `dead_letter_file` is on: replicas would \
                 write the same files; leave them to the InfluxDB and HTTP outputs and their own state",
            ));
        }
        if !(1..=100_000).contains(&self.batch_points) {
            return Err(ConfigError::new(
                format!("{section}.batch_points"),
                "must be between 1 and 100000",
            ));
        }
        if !(10..=60_000).contains(&self.flush_interval_ms) {
            return Err(ConfigError::new(
                format!("{section}.flush_interval_ms"),
                "must be between 10 and 60000",
            ));
        }
        if let Some(c) = &self.influx {
            let key = |k: &str| format!("{section}.influx.{k}");
            if !(100..=600_000).contains(&c.timeout_ms) {
                return Err(ConfigError::new(
                    key("timeout_ms"),
                    "must be between 100 and 600000",
                ));
            }
            if c.retry_min_ms < 10 {
                return Err(ConfigError::new(key("retry_min_ms"), "must be at least 10"));
            }
        }
        if self.files.max_bytes < 4096 {
            return Err(ConfigError::new(
                format!("{section}.files.max_bytes"),
                "must be at least 4096",
            ));
        }
        if self.spool.max_bytes < 64 * 1024 {
            return Err(ConfigError::new(
                format!("{section}.spool.max_bytes"),
                "must be at least 65536",
            ));
        }
        if self.spool.segment_bytes < 4096 || self.spool.segment_bytes > self.spool.max_bytes / 2 {
            return Err(ConfigError::new(
                format!("{section}.spool.segment_bytes"),
                "must be between 4096 and half of max_bytes",
            ));
        }
        if self.dead_letter_max_bytes < 4096 {
            return Err(ConfigError::new(
                format!("{section}.dead_letter_max_bytes"),
                "must be at least 4096",
            ));
        }
        if self.files.enabled == Some(false) && self.influx.is_none() && self.http.is_none() {
            return Err(ConfigError::new(
                format!("{section}.files.enabled"),
                "is false and neither [influx_writer.influx] nor [influx_writer.http] is configured: readings would go nowhere",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_share_a_data_directory_only_without_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        let influx = Some(InfluxConfig {
            url: "http://x:8086".into(),
            api: WriteApi::V1,
            database: Some("db".into()),
            ..InfluxConfig::default()
        });
        let scaled = Config {
            influx,
            max_replicas: 2,
            ..Config::default()
        };
        let mut one = scaled.clone().resolve("influx_writer").unwrap();
        let mut two = scaled.clone().resolve("influx_writer").unwrap();
        let mut three = scaled.clone().resolve("influx_writer").unwrap();
        let _a = one.claim_slot(dir.path()).unwrap();
        let _b = two.claim_slot(dir.path()).unwrap();
        assert_eq!(
            (one.instance.as_str(), two.instance.as_str()),
            ("influx-writer", "influx-writer-2")
        );
        assert_ne!(one.state_dir(dir.path()), two.state_dir(dir.path()));
        let e = three.claim_slot(dir.path()).unwrap_err().to_string();
        assert!(e.contains("all 2 slots"), "{e}");

        let mut files = scaled.clone();
        files.files.enabled = Some(true);
        let e = files.resolve("influx_writer").unwrap_err();
        assert_eq!(e.key, "influx_writer.max_replicas");
        assert!(e.reason.contains("same files"), "{}", e.reason);
        let e = Config {
            max_replicas: 0,
            ..scaled
        }
        .resolve("influx_writer")
        .unwrap_err();
        assert_eq!(e.key, "influx_writer.max_replicas");

        // One writer per data directory by default: the second is refused, naming the lock.
        let dir = tempfile::tempdir().unwrap();
        let mut single = Config::default().resolve("influx_writer").unwrap();
        let _held = single.claim_slot(dir.path()).unwrap();
        let mut again = Config::default().resolve("influx_writer").unwrap();
        let e = again.claim_slot(dir.path()).unwrap_err().to_string();
        assert!(e.contains("locks/influx-writer.lock"), "{e}");
        assert!(e.contains("max_replicas"), "{e}");
    }

    #[test]
    fn files_default_on_only_without_influx() {
        let mut c = Config::default();
        assert!(c.files_enabled());
        c.influx = Some(InfluxConfig {
            url: "http://x:8086".into(),
            org: Some("o".into()),
            bucket: Some("b".into()),
            ..InfluxConfig::default()
        });
        assert!(!c.files_enabled());
        c.files.enabled = Some(true);
        assert!(c.files_enabled());
    }

    #[test]
    fn each_api_needs_its_keys_and_refuses_the_other_apis_keys() {
        let mut c = Config {
            influx: Some(InfluxConfig {
                url: "http://x:8086".into(),
                org: Some("o".into()),
                ..InfluxConfig::default()
            }),
            ..Config::default()
        };
        let e = c.clone().resolve("influx_writer").unwrap_err();
        assert_eq!(e.key, "influx_writer.influx.bucket");
        if let Some(i) = c.influx.as_mut() {
            i.bucket = Some("b".into());
            i.database = Some("db".into());
        }
        let e = c.clone().resolve("influx_writer").unwrap_err();
        assert_eq!(e.key, "influx_writer.influx.database");
        assert_eq!(
            e.reason,
            "belongs to api = \"v1\"; influx_writer.influx.api is \"v2\""
        );
        if let Some(i) = c.influx.as_mut() {
            i.database = None;
            i.password_file = Some("/run/secrets/influx".into());
        }
        let e = c.clone().resolve("influx_writer").unwrap_err();
        assert_eq!(e.key, "influx_writer.influx.password_file");
        if let Some(i) = c.influx.as_mut() {
            i.password_file = None;
            i.api = WriteApi::V1;
            i.database = Some("db".into());
        }
        let e = c.clone().resolve("influx_writer").unwrap_err();
        assert_eq!(e.key, "influx_writer.influx.org");
        assert_eq!(
            e.reason,
            "belongs to api = \"v2\"; influx_writer.influx.api is \"v1\""
        );
    }

    /// In whole seconds, two readings of one series within a second are one InfluxDB point:
    /// the later overwrote the earlier (fourth hostile review).
    #[test]
    fn the_http_output_s_mistakes_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = |c: HttpConfig| {
            Config {
                http: Some(c),
                ..Config::default()
            }
            .resolve("influx_writer")
            .unwrap_err()
        };
        let url = || "https://example.com/in".to_string();
        let e = err(HttpConfig::default());
        assert_eq!(e.key, "influx_writer.http.url");
        let e = err(HttpConfig {
            url: "ftp://example.com/in".into(),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.url");
        let e = err(HttpConfig {
            url: "https://me:secret@example.com/in".into(),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.url");
        assert!(e.reason.contains("credentials"), "{}", e.reason);
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = err(HttpConfig {
            url: url(),
            token: Some(Secret::new("t")),
            username: Some("u".into()),
            password: Some(Secret::new("p")),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.token");
        let e = err(HttpConfig {
            url: url(),
            username: Some("u".into()),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.password");
        let e = err(HttpConfig {
            url: url(),
            token: Some(Secret::new("t")),
            token_header: Some("bad header".into()),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.token_header");
        let e = err(HttpConfig {
            url: url(),
            username: Some("a:b".into()),
            password: Some(Secret::new("p")),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.username");
        let e = err(HttpConfig {
            url: url(),
            token: Some(Secret::new("   ")),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.token");
        let e = err(HttpConfig {
            url: url(),
            max_age_ms: 60_000,
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.max_age_ms");
        let e = err(HttpConfig {
            url: url(),
            max_readings: 0,
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.max_readings");
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let e = err(HttpConfig {
            url: url(),
            ca_file: Some(not_pem),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.ca_file");
        let e = err(HttpConfig {
            url: url(),
            token_file: Some(dir.path().join("missing")),
            ..HttpConfig::default()
        });
        assert_eq!(e.key, "influx_writer.http.token_file");
        // Only the HTTP output: files are off unless asked for, and that is a valid config.
        let plan = Config {
            http: Some(HttpConfig {
                url: url(),
                ..HttpConfig::default()
            }),
            ..Config::default()
        }
        .resolve("influx_writer")
        .unwrap();
        assert!(!plan.files_enabled());
        assert!(plan.http_target().is_some() && plan.target().is_none());
    }

    #[test]
    fn second_precision_is_refused() {
        let c = Config {
            influx: Some(InfluxConfig {
                url: "http://x:8086".into(),
                database: Some("db".into()),
                precision: Precision::S,
                ..InfluxConfig::default()
            }),
            ..Config::default()
        };
        let e = c.clone().resolve("influx_writer").unwrap_err();
        assert_eq!(e.key, "influx_writer.influx.precision");
        assert!(e.reason.contains("overwrites"), "{e}");
    }

    #[test]
    fn v1_basic_auth_header() {
        let c = Config {
            influx: Some(InfluxConfig {
                url: "http://x:8086".into(),
                api: WriteApi::V1,
                database: Some("wattbus".into()),
                username: Some("writer".into()),
                password: Some(Secret::new("s3cret")),
                ..InfluxConfig::default()
            }),
            ..Config::default()
        };
        let plan = c.resolve("influx_writer").unwrap();
        let t = plan.target().unwrap();
        assert_eq!(
            t.auth.as_ref().unwrap().expose(),
            "Basic d3JpdGVyOnMzY3JldA=="
        );
        let c = Config {
            influx: Some(InfluxConfig {
                url: "influxdb:8086".into(),
                ..InfluxConfig::default()
            }),
            ..Config::default()
        };
        assert_eq!(
            c.clone().resolve("influx_writer").unwrap_err().key,
            "influx_writer.influx.url"
        );
    }
}
