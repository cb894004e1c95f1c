//! The `[backup_rotator]` section, and its resolution into the [`Plan`] `run` uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use influx_client::query::Auth;
use proto::Segment;
use runtime::Secret;
use runtime::config::{ConfigError, StreamConfig, Variant, resolve_secret};
use serde::Deserialize;

use crate::native::{NativePlan, Tool};
use crate::schedule::Schedule;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MQTT client id, state directory, and the `device` of its status readings.
    pub instance: Segment,
    /// When to back up: cron's five fields, in UTC (`5 * * * *`: five past every hour).
    pub schedule: String,
    /// A full set when the newest good full set is older than this (hours); incremental sets
    /// (what was written since the last set) in between.
    pub full_every_h: u64,
    /// Full sets kept, with the incremental sets that continue them.
    pub keep: usize,
    /// An incremental set starts this many seconds before the last one ended, to catch
    /// readings that arrived late (a replay after a restart, a drained spool). Later than this
    /// they are in the next full set.
    pub lookback_s: u64,
    /// A window ends this many seconds before the run starts: readings still on their way
    /// (influx-writer batches for a second, a replay takes longer) are in the next window.
    pub settle_s: u64,
    /// After a failed run, try again after this many seconds (doubling up to an hour), not
    /// only at the next scheduled time.
    pub retry_s: u64,
    /// How often the status reading (age of the last good set, …) is published.
    pub status_every_s: u64,
    pub influx: SourceConfig,
    pub storage: StorageConfig,
    /// Native mode: InfluxDB's own backup tool run with every full set (off unless set).
    pub native: Option<NativeConfig>,
    /// Delivery of the status readings (`meas` stream).
    pub stream: StreamConfig,
    /// `/healthz` and `/metrics` when run on its own.
    pub health_listen: Option<SocketAddr>,
}

/// The InfluxDB to back up, read through InfluxQL's `/query`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub url: String,
    /// The database (InfluxDB 1.x), or the database a 2.x DBRP mapping gives the bucket.
    pub database: String,
    /// 1.x: a user that may read the database (read is all a backup needs).
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// 2.x/3.x: a token that may read the bucket.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    /// Connecting, and each read of an answer.
    pub timeout_ms: u64,
    /// Rows per chunk of an answer: what one read holds in memory.
    pub chunk_rows: usize,
}

/// `[backup_rotator.native]`: InfluxDB's own backup beside the line protocol of every full
/// set, where its tool is installed on the same machine (see `native`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeConfig {
    /// `influxd` (1.x: `influxd backup -portable`) or `influx` (2.x: `influx backup`, with
    /// `influx.token`, which must then be an operator token).
    pub tool: Tool,
    /// The program [default: the tool's name, found on PATH].
    #[serde(default)]
    pub command: Option<PathBuf>,
    /// influxd: InfluxDB's RPC address (`bind-address` in influxdb.conf).
    #[serde(default)]
    pub rpc: Option<String>,
    /// influx: only this bucket of this organisation [default: every bucket, with metadata].
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    /// The tool is killed after this long.
    #[serde(default = "native_timeout_s")]
    pub timeout_s: u64,
    /// Where the tool writes before the upload (it needs about the database's size free;
    /// emptied after each run) [default: `<data_dir>/backup-rotator/<instance>/native`].
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

const fn native_timeout_s() -> u64 {
    3600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// A directory: the default, so backups work with nothing else set up (put it on another
    /// disk than InfluxDB's: a USB stick, a NAS mount).
    Local,
    /// Azure Blob storage (terraform/ makes the account, the container and the credential).
    Azure,
    /// Any S3-compatible store (AWS, MinIO, Garage, …).
    S3,
}

impl StorageKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            StorageKind::Local => "local",
            StorageKind::Azure => "azure",
            StorageKind::S3 => "s3",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub kind: StorageKind,
    /// Sets go under this prefix (default: the site's name), so one container can hold many
    /// sites' backups.
    pub prefix: Option<String>,
    /// local: the directory (default `<data_dir>/backups`).
    pub dir: Option<PathBuf>,
    /// azure: the storage account and container.
    pub account: Option<String>,
    pub container: Option<String>,
    /// azure: one of an account key, a SAS token (the query string terraform outputs), or a
    /// service principal (tenant, client id and secret).
    pub access_key: Option<Secret>,
    pub access_key_file: Option<PathBuf>,
    pub sas: Option<Secret>,
    pub sas_file: Option<PathBuf>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    /// azure, s3: another endpoint (the Azurite emulator, a sovereign cloud, MinIO).
    pub endpoint: Option<String>,
    /// azure, s3: allow `http://` (an emulator on the same machine; never over a network).
    pub allow_http: bool,
    /// s3: bucket, region and credentials.
    pub bucket: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub secret_access_key_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            instance: Segment::new("backup-rotator")
                .unwrap_or_else(|_| unreachable!("valid literal")),
            schedule: "5 * * * *".into(),
            full_every_h: 24,
            keep: 10,
            lookback_s: 600,
            settle_s: 60,
            retry_s: 30,
            status_every_s: 60,
            influx: SourceConfig::default(),
            storage: StorageConfig::default(),
            native: None,
            stream: StreamConfig::default(),
            health_listen: Some(([127, 0, 0, 1], 9114).into()),
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8086".into(),
            database: "wattbus".into(),
            username: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            timeout_ms: 30_000,
            chunk_rows: 10_000,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: StorageKind::Local,
            prefix: None,
            dir: None,
            account: None,
            container: None,
            access_key: None,
            access_key_file: None,
            sas: None,
            sas_file: None,
            tenant_id: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            endpoint: None,
            allow_http: false,
            bucket: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
        }
    }
}

/// Where the sets go, resolved: secrets read, keys of another kind refused.
#[derive(Debug, Clone)]
pub enum Storage {
    Local {
        /// `None`: `<data_dir>/backups`, known at run time.
        dir: Option<PathBuf>,
    },
    Azure {
        account: String,
        container: String,
        credential: AzureCredential,
        endpoint: Option<String>,
        allow_http: bool,
    },
    S3 {
        bucket: String,
        region: Option<String>,
        endpoint: Option<String>,
        allow_http: bool,
        access_key_id: Option<String>,
        secret_access_key: Option<Secret>,
    },
}

#[derive(Debug, Clone)]
pub enum AzureCredential {
    AccessKey(Secret),
    /// The SAS query string's pairs.
    Sas(Secret),
    ServicePrincipal {
        tenant_id: String,
        client_id: String,
        client_secret: Secret,
    },
}

/// The storage settings every command that reads sets needs (the service, and `wattbus
/// backup`): where, and under which prefix.
#[derive(Debug, Clone)]
pub struct StoragePlan {
    pub storage: Storage,
    /// `None`: the site's name.
    pub prefix: Option<String>,
}

impl StoragePlan {
    /// The prefix sets go under, for `site`.
    pub fn prefix_for(&self, site: &Segment) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| site.as_str().to_string())
    }

    /// The local directory, for `data_dir`.
    pub fn local_dir(&self, data_dir: &Path) -> Option<PathBuf> {
        match &self.storage {
            Storage::Local { dir } => Some(dir.clone().unwrap_or_else(|| data_dir.join("backups"))),
            _ => None,
        }
    }
}

/// The InfluxDB to read, resolved.
#[derive(Debug, Clone)]
pub struct InfluxPlan {
    pub url: String,
    pub database: String,
    pub auth: Option<Auth>,
    pub timeout: Duration,
    pub chunk_rows: usize,
}

/// The section, checked: what [`crate::run`] takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instance: Segment,
    pub schedule: Schedule,
    pub full_every: Duration,
    pub keep: usize,
    pub lookback: Duration,
    pub settle: Duration,
    pub retry: runtime::backoff::Backoff,
    pub status_every: Duration,
    pub influx: InfluxPlan,
    pub storage: StoragePlan,
    pub native: Option<NativePlan>,
    pub stream: StreamConfig,
    pub health_listen: Option<SocketAddr>,
}

impl Config {
    /// Check the section and read its secrets; errors name `section.key`.
    pub fn resolve(self, section: &str) -> Result<Plan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let schedule = Schedule::parse(&self.schedule)
            .map_err(|reason| ConfigError::new(key("schedule"), reason))?;
        if schedule
            .next_after(proto::now_ms().div_euclid(1000))
            .is_none()
        {
            return Err(ConfigError::new(
                key("schedule"),
                format!("{:?} never comes (a day no month has?)", self.schedule),
            ));
        }
        if !(1..=24 * 31).contains(&self.full_every_h) {
            return Err(ConfigError::new(
                key("full_every_h"),
                "must be from 1 to 744 hours (a month)",
            ));
        }
        if !(1..=1000).contains(&self.keep) {
            return Err(ConfigError::new(
                key("keep"),
                "must be from 1 to 1000 full sets",
            ));
        }
        if self.lookback_s > 7 * 86_400 {
            return Err(ConfigError::new(
                key("lookback_s"),
                "must be at most a week",
            ));
        }
        if self.settle_s > 3600 {
            return Err(ConfigError::new(key("settle_s"), "must be at most an hour"));
        }
        if !(10..=3600).contains(&self.retry_s) {
            return Err(ConfigError::new(
                key("retry_s"),
                "must be from 10 to 3600 seconds",
            ));
        }
        if !(5..=3600).contains(&self.status_every_s) {
            return Err(ConfigError::new(
                key("status_every_s"),
                "must be from 5 to 3600 seconds",
            ));
        }
        let retry = runtime::backoff::Backoff::from_config_ms(
            &key("retry_s"),
            self.retry_s * 1000,
            &key("retry_s"),
            3_600_000,
        )?;
        let influx = self.influx.resolve(&key("influx"))?;
        let storage = self.storage.resolve(&key("storage"))?;
        let native = match &self.native {
            Some(n) => Some(n.resolve(&key("native"), &influx)?),
            None => None,
        };
        self.stream.validate(&key("stream"))?;
        Ok(Plan {
            instance: self.instance,
            schedule,
            full_every: Duration::from_secs(self.full_every_h * 3600),
            keep: self.keep,
            lookback: Duration::from_secs(self.lookback_s),
            settle: Duration::from_secs(self.settle_s),
            retry,
            status_every: Duration::from_secs(self.status_every_s),
            influx,
            storage,
            native,
            stream: self.stream,
            health_listen: self.health_listen,
        })
    }
}

impl NativeConfig {
    pub fn resolve(&self, section: &str, influx: &InfluxPlan) -> Result<NativePlan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let variant = Variant {
            at: section,
            selector: "tool",
            chosen: self.tool.as_str(),
        };
        const INFLUXD: &[&str] = &[Tool::Influxd.as_str()];
        const INFLUX: &[&str] = &[Tool::Influx.as_str()];
        for (leaf, set, owners) in [
            ("rpc", self.rpc.is_some(), INFLUXD),
            ("org", self.org.is_some(), INFLUX),
            ("bucket", self.bucket.is_some(), INFLUX),
        ] {
            variant.refuse_unless(leaf, set, owners)?;
        }
        let command = match &self.command {
            Some(c) if c.is_file() => c.clone(),
            Some(c) => {
                return Err(ConfigError::new(
                    key("command"),
                    format!("{} is not a file", c.display()),
                ));
            }
            None => on_path(self.tool.as_str()).ok_or_else(|| {
                ConfigError::new(
                    key("tool"),
                    format!(
                        "{} is not on PATH: install InfluxDB's tools on this machine (native mode runs them here), set {}, or remove [{section}]",
                        self.tool.as_str(),
                        key("command")
                    ),
                )
            })?,
        };
        let rpc = self.rpc.clone().unwrap_or_else(|| "127.0.0.1:8088".into());
        if self.tool == Tool::Influxd {
            let port_ok = rpc
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(ConfigError::new(
                    key("rpc"),
                    format!("{rpc:?} is not host:port (InfluxDB's bind-address, 127.0.0.1:8088)"),
                ));
            }
        }
        if self.tool == Tool::Influx && !matches!(influx.auth, Some(Auth::Token(_))) {
            return Err(ConfigError::new(
                key("tool"),
                "influx backup needs an operator token: set the influx section's token_file",
            ));
        }
        if self.bucket.is_some() != self.org.is_some() {
            return Err(ConfigError::new(
                key(if self.bucket.is_some() {
                    "org"
                } else {
                    "bucket"
                }),
                "bucket and org go together",
            ));
        }
        if !(10..=86_400).contains(&self.timeout_s) {
            return Err(ConfigError::new(
                key("timeout_s"),
                "must be from 10 to 86400 seconds",
            ));
        }
        Ok(NativePlan {
            tool: self.tool,
            command,
            rpc,
            org: self.org.clone(),
            bucket: self.bucket.clone(),
            timeout: Duration::from_secs(self.timeout_s),
            dir: self.dir.clone(),
        })
    }
}

/// `name` as the shell would find it on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl SourceConfig {
    pub fn resolve(&self, section: &str) -> Result<InfluxPlan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let url = reqwest_free_url_check(&self.url).map_err(|r| ConfigError::new(key("url"), r))?;
        if self.database.trim().is_empty() {
            return Err(ConfigError::new(key("database"), "is empty"));
        }
        let password = resolve_secret(
            &key("password"),
            self.password.as_ref(),
            self.password_file.as_deref(),
        )?;
        let token = resolve_secret(
            &key("token"),
            self.token.as_ref(),
            self.token_file.as_deref(),
        )?;
        let auth = match (&self.username, password, token) {
            (None, None, None) => None,
            (Some(u), Some(p), None) => Some(Auth::Basic {
                user: u.clone(),
                password: p.expose().to_string(),
            }),
            (None, None, Some(t)) => Some(Auth::Token(t.expose().to_string())),
            (_, _, Some(_)) => {
                return Err(ConfigError::new(
                    key("token"),
                    "is for InfluxDB 2.x/3.x and cannot go with username/password (1.x); use one",
                ));
            }
            (Some(_), None, None) => {
                return Err(ConfigError::new(
                    key("password"),
                    "is required with a username (or password_file)",
                ));
            }
            (None, Some(_), None) => {
                return Err(ConfigError::new(
                    key("username"),
                    "is required with a password",
                ));
            }
        };
        if !(1_000..=600_000).contains(&self.timeout_ms) {
            return Err(ConfigError::new(
                key("timeout_ms"),
                "must be from 1000 to 600000",
            ));
        }
        if !(100..=1_000_000).contains(&self.chunk_rows) {
            return Err(ConfigError::new(
                key("chunk_rows"),
                "must be from 100 to 1000000",
            ));
        }
        Ok(InfluxPlan {
            url,
            database: self.database.clone(),
            auth,
            timeout: Duration::from_millis(self.timeout_ms),
            chunk_rows: self.chunk_rows,
        })
    }
}

/// A URL with a scheme and a host and no credentials (they would be printed in errors).
fn reqwest_free_url_check(url: &str) -> Result<String, String> {
    let t = url.trim();
    let Some((scheme, rest)) = t.split_once("://") else {
        return Err(format!("{t:?} is not a URL (http://host:8086)"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!("{t:?}: only http and https"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(
            "holds credentials: give username and password_file (or token_file) instead".into(),
        );
    }
    if authority.is_empty() {
        return Err(format!("{t:?} has no host"));
    }
    // host, host:port, [v6]:port
    if let Some((host, port)) = authority.rsplit_once(':')
        && !host.ends_with(':')
        && !port.contains(']')
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("{t:?}: the port {port:?} is not a port (1-65535)"));
    }
    Ok(t.to_string())
}

impl StorageConfig {
    pub fn resolve(&self, section: &str) -> Result<StoragePlan, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let kind = self.kind;
        // Keys of another kind are refused, not ignored (the runtime's one policy): a setting
        // that does nothing is one the user believes is in force.
        let variant = Variant {
            at: section,
            selector: "kind",
            chosen: kind.as_str(),
        };
        const LOCAL: &[&str] = &[StorageKind::Local.as_str()];
        const AZURE: &[&str] = &[StorageKind::Azure.as_str()];
        const S3: &[&str] = &[StorageKind::S3.as_str()];
        const REMOTE: &[&str] = &[StorageKind::Azure.as_str(), StorageKind::S3.as_str()];
        for (leaf, set, owners) in [
            ("dir", self.dir.is_some(), LOCAL),
            ("account", self.account.is_some(), AZURE),
            ("container", self.container.is_some(), AZURE),
            ("access_key", self.access_key.is_some(), AZURE),
            ("access_key_file", self.access_key_file.is_some(), AZURE),
            ("sas", self.sas.is_some(), AZURE),
            ("sas_file", self.sas_file.is_some(), AZURE),
            ("tenant_id", self.tenant_id.is_some(), AZURE),
            ("client_id", self.client_id.is_some(), AZURE),
            ("client_secret", self.client_secret.is_some(), AZURE),
            (
                "client_secret_file",
                self.client_secret_file.is_some(),
                AZURE,
            ),
            ("endpoint", self.endpoint.is_some(), REMOTE),
            ("allow_http", self.allow_http, REMOTE),
            ("bucket", self.bucket.is_some(), S3),
            ("region", self.region.is_some(), S3),
            ("access_key_id", self.access_key_id.is_some(), S3),
            ("secret_access_key", self.secret_access_key.is_some(), S3),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
                S3,
            ),
        ] {
            variant.refuse_unless(leaf, set, owners)?;
        }
        if let Some(e) = &self.endpoint {
            let url =
                reqwest_free_url_check(e).map_err(|r| ConfigError::new(key("endpoint"), r))?;
            if url.starts_with("http://") && !self.allow_http {
                return Err(ConfigError::new(
                    key("endpoint"),
                    format!(
                        "{url:?} is plain http: set allow_http = true (an emulator on this machine only), or use https"
                    ),
                ));
            }
        }
        if let Some(p) = &self.prefix
            && (p.is_empty()
                || p.starts_with('/')
                || p.ends_with('/')
                || p.split('/').any(|l| l.is_empty() || l == "." || l == ".."))
        {
            return Err(ConfigError::new(
                key("prefix"),
                format!(
                    "{p:?} must be path segments like \"wattbus/home\": no leading or trailing /, no empty, . or .. segment"
                ),
            ));
        }
        let required = |name: &str, v: &Option<String>| -> Result<String, ConfigError> {
            v.clone().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                ConfigError::new(
                    key(name),
                    format!("is required with kind = {:?}", kind.as_str()),
                )
            })
        };
        let storage = match kind {
            StorageKind::Local => Storage::Local {
                dir: self.dir.clone(),
            },
            StorageKind::Azure => {
                let account = required("account", &self.account)?;
                let container = required("container", &self.container)?;
                let access_key = resolve_secret(
                    &key("access_key"),
                    self.access_key.as_ref(),
                    self.access_key_file.as_deref(),
                )?;
                let sas = resolve_secret(&key("sas"), self.sas.as_ref(), self.sas_file.as_deref())?;
                let secret = resolve_secret(
                    &key("client_secret"),
                    self.client_secret.as_ref(),
                    self.client_secret_file.as_deref(),
                )?;
                let principal =
                    self.tenant_id.is_some() || self.client_id.is_some() || secret.is_some();
                let credential = match (access_key, sas, principal) {
                    (Some(k), None, false) => AzureCredential::AccessKey(k),
                    (None, Some(s), false) => {
                        let s = Secret::new(s.expose().trim_start_matches('?').to_string());
                        if !s.expose().contains("sig=") {
                            return Err(ConfigError::new(
                                key("sas"),
                                "is not a SAS token: it has no sig= (give the query string, e.g. sv=…&sig=…)",
                            ));
                        }
                        AzureCredential::Sas(s)
                    }
                    (None, None, true) => AzureCredential::ServicePrincipal {
                        tenant_id: required("tenant_id", &self.tenant_id)?,
                        client_id: required("client_id", &self.client_id)?,
                        client_secret: secret.ok_or_else(|| {
                            ConfigError::new(
                                key("client_secret_file"),
                                "is required for a service principal",
                            )
                        })?,
                    },
                    (None, None, false) => {
                        return Err(ConfigError::new(
                            key("sas_file"),
                            "no credential: give one of sas_file, access_key_file, or tenant_id + client_id + client_secret_file",
                        ));
                    }
                    _ => {
                        return Err(ConfigError::new(
                            key("access_key"),
                            "more than one credential (access key, SAS, service principal): give one",
                        ));
                    }
                };
                Storage::Azure {
                    account,
                    container,
                    credential,
                    endpoint: self.endpoint.clone(),
                    allow_http: self.allow_http,
                }
            }
            StorageKind::S3 => {
                let secret = resolve_secret(
                    &key("secret_access_key"),
                    self.secret_access_key.as_ref(),
                    self.secret_access_key_file.as_deref(),
                )?;
                if self.access_key_id.is_some() != secret.is_some() {
                    return Err(ConfigError::new(
                        key("access_key_id"),
                        "and secret_access_key(_file) go together",
                    ));
                }
                Storage::S3 {
                    bucket: required("bucket", &self.bucket)?,
                    region: self.region.clone(),
                    endpoint: self.endpoint.clone(),
                    allow_http: self.allow_http,
                    access_key_id: self.access_key_id.clone(),
                    secret_access_key: secret,
                }
            }
        };
        Ok(StoragePlan {
            storage,
            prefix: self.prefix.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::ConfigSource;

    fn load(text: &str) -> Result<Plan, ConfigError> {
        ConfigSource::from_parts(None, Some(text))?.resolve::<crate::BackupRotator>()
    }

    #[test]
    fn defaults_back_up_to_a_local_directory_hourly() {
        let p = load("").expect("defaults are valid");
        assert_eq!(p.keep, 10);
        assert_eq!(p.schedule.as_str(), "5 * * * *");
        assert!(matches!(p.storage.storage, Storage::Local { dir: None }));
        assert_eq!(
            p.storage.local_dir(Path::new("/var/lib/wattbus")),
            Some(PathBuf::from("/var/lib/wattbus/backups"))
        );
    }

    #[test]
    fn mistakes_name_the_key() {
        for (text, key, says) in [
            (
                "[backup_rotator]\nschedule = \"5 * *\"",
                "backup_rotator.schedule",
                "five",
            ),
            (
                "[backup_rotator]\nkeep = 0",
                "backup_rotator.keep",
                "from 1",
            ),
            (
                "[backup_rotator.storage]\nkind = \"local\"\naccount = \"a\"",
                "backup_rotator.storage.account",
                "belongs to kind = \"azure\"",
            ),
            (
                "[backup_rotator.storage]\nkind = \"azure\"\ncontainer = \"c\"",
                "backup_rotator.storage.account",
                "required",
            ),
            (
                "[backup_rotator.storage]\nkind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"",
                "backup_rotator.storage.sas_file",
                "no credential",
            ),
            (
                "[backup_rotator.storage]\nkind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"\nsas = \"sv=1\"",
                "backup_rotator.storage.sas",
                "no sig=",
            ),
            (
                "[backup_rotator.storage]\nprefix = \"../x\"",
                "backup_rotator.storage.prefix",
                "segments",
            ),
            (
                "[backup_rotator.influx]\nurl = \"http://u:p@h:8086\"",
                "backup_rotator.influx.url",
                "credentials",
            ),
            (
                "[backup_rotator.influx]\nusername = \"u\"",
                "backup_rotator.influx.password",
                "required",
            ),
            (
                "[backup_rotator]\nschedule = \"0 0 30 2 *\"",
                "backup_rotator.schedule",
                "never comes",
            ),
            (
                "[backup_rotator.influx]\nurl = \"http://h:99999\"",
                "backup_rotator.influx.url",
                "not a port",
            ),
            (
                "[backup_rotator.storage]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"not a url\"",
                "backup_rotator.storage.endpoint",
                "not a URL",
            ),
            (
                "[backup_rotator.storage]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://minio:9000\"",
                "backup_rotator.storage.endpoint",
                "allow_http",
            ),
        ] {
            let e = load(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.reason.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn an_azure_sas_from_a_file_is_read_and_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("sas");
        std::fs::write(&f, "?sv=2022-11-02&sig=SECRET\n").expect("write");
        let p = load(&format!(
            "[backup_rotator.storage]\nkind = \"azure\"\naccount = \"a\"\ncontainer = \"c\"\nsas_file = {:?}",
            f.display().to_string()
        ))
        .expect("valid");
        let Storage::Azure {
            credential: AzureCredential::Sas(s),
            ..
        } = &p.storage.storage
        else {
            panic!("azure with SAS: {:?}", p.storage.storage);
        };
        assert_eq!(s.expose(), "sv=2022-11-02&sig=SECRET");
        assert!(!format!("{:?}", p.storage).contains("SECRET"));
    }
}
