//! `wattbus influx setup`: retention and downsampling on InfluxDB 1.x, so a Pi's database stays
//! small: raw readings kept for `--raw-retention` (30 days by default) in the database's
//! `autogen` policy, and 1-minute aggregates (mean, min, max and last of every field, every tag
//! kept) in a `minutes` policy kept forever, filled by a continuous query.
//!
//! Why a command of its own and not part of influx-writer: creating retention policies and
//! continuous queries takes an InfluxDB admin, and influx-writer logs in as a user that may only
//! write. compose runs this once per `up` with the admin's password (a secret only it holds);
//! it is idempotent, so running it again changes nothing, and running it with other settings
//! changes exactly those.
//!
//! The continuous query is named with a version (`wattbus_1m_v1`): a later wattbus that needs
//! another query drops the older `wattbus_1m_*` and creates its own, rather than comparing the
//! text InfluxDB gives back (it normalises it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use runtime::ConfigError;

/// The continuous query this version keeps, and the prefix of every version's.
pub const CQ_NAME: &str = "wattbus_1m_v1";
const CQ_PREFIX: &str = "wattbus_1m";
/// Where the 1-minute aggregates go.
pub const MINUTES_RP: &str = "minutes";

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create or update retention and downsampling (InfluxDB 1.x; needs an admin when
    /// authentication is on). Idempotent: run it at every start.
    Setup(SetupOptions),
}

#[derive(clap::Args, Debug)]
pub struct SetupOptions {
    /// InfluxDB's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8086")]
    pub url: String,
    /// The database influx-writer writes to.
    #[arg(long, default_value = "wattbus")]
    pub database: String,
    /// An admin user (none when InfluxDB runs without authentication).
    #[arg(long)]
    pub username: Option<String>,
    /// A file holding that user's password (a Docker secret): never on the command line.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// How long raw readings are kept: a number with h, d or w (`30d`, `720h`), or `inf`.
    #[arg(long, default_value = "30d")]
    pub raw_retention: String,
    /// Keep no 1-minute aggregates: the continuous query is dropped (aggregates already made
    /// are kept).
    #[arg(long)]
    pub no_downsample: bool,
    /// How long to wait for InfluxDB to answer at all (it may be starting beside this).
    #[arg(long, default_value_t = 120)]
    pub wait_s: u64,
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup(o) => setup(o).await,
    }
}

/// A retention duration InfluxQL takes, checked: it is written into statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The literal (`30d`, `INF`).
    pub literal: String,
    /// In hours; `None` for ever.
    pub hours: Option<u64>,
}

pub fn parse_retention(text: &str) -> Result<Retention, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("inf") {
        return Ok(Retention {
            literal: "INF".into(),
            hours: None,
        });
    }
    let bad = || {
        format!(
            "{text:?} is not a retention: give a whole number with h, d or w (30d, 720h, 8w), or inf"
        )
    };
    let (digits, unit) = t.split_at(t.len().saturating_sub(1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let per = match unit {
        "h" => 1,
        "d" => 24,
        "w" => 24 * 7,
        _ => return Err(bad()),
    };
    let hours = n.checked_mul(per).ok_or_else(bad)?;
    if hours < 1 {
        return Err(format!("{text:?} keeps nothing: give at least 1h"));
    }
    Ok(Retention {
        literal: format!("{n}{unit}"),
        hours: Some(hours),
    })
}

/// InfluxDB's own advice for the shard group duration of a retention period.
fn shard_duration(r: &Retention) -> &'static str {
    match r.hours {
        Some(h) if h < 48 => "1h",
        Some(h) if h <= 24 * 183 => "1d",
        _ => "7d",
    }
}

/// What is there already: retention policy names and this database's continuous query names.
#[derive(Debug, Default)]
pub struct Existing {
    pub policies: Vec<String>,
    pub queries: Vec<String>,
}

/// The statements that bring `db` to the wanted state from `existing` (pure).
pub fn statements(db: &str, raw: &Retention, downsample: bool, existing: &Existing) -> Vec<String> {
    let q = quote(db);
    let has = |rp: &str| existing.policies.iter().any(|p| p == rp);
    let mut out = Vec::new();
    let raw_spec = format!(
        "DURATION {} SHARD DURATION {} DEFAULT",
        raw.literal,
        shard_duration(raw)
    );
    out.push(if has("autogen") {
        format!("ALTER RETENTION POLICY \"autogen\" ON {q} {raw_spec}")
    } else {
        format!(
            "CREATE RETENTION POLICY \"autogen\" ON {q} DURATION {} REPLICATION 1 SHARD DURATION {} DEFAULT",
            raw.literal,
            shard_duration(raw)
        )
    });
    if downsample {
        out.push(if has(MINUTES_RP) {
            format!("ALTER RETENTION POLICY \"{MINUTES_RP}\" ON {q} DURATION INF SHARD DURATION 7d")
        } else {
            format!(
                "CREATE RETENTION POLICY \"{MINUTES_RP}\" ON {q} DURATION INF REPLICATION 1 SHARD DURATION 7d"
            )
        });
    }
    for old in existing
        .queries
        .iter()
        .filter(|n| n.starts_with(CQ_PREFIX) && (!downsample || n.as_str() != CQ_NAME))
    {
        out.push(format!("DROP CONTINUOUS QUERY {} ON {q}", quote(old)));
    }
    if downsample && !existing.queries.iter().any(|n| n == CQ_NAME) {
        out.push(format!(
            "CREATE CONTINUOUS QUERY \"{CQ_NAME}\" ON {q} BEGIN {} END",
            downsample_select(db)
        ));
    }
    out
}

/// The continuous query's body: every field of every measurement, per minute and series.
pub fn downsample_select(db: &str) -> String {
    let q = quote(db);
    format!(
        "SELECT mean(*), min(*), max(*), last(*) INTO {q}.\"{MINUTES_RP}\".:MEASUREMENT \
         FROM {q}.\"autogen\"./.*/ GROUP BY time(1m), *"
    )
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('\\', "\\\\").replace('"', "\\\""))
}

fn check_database(db: &str) -> Result<(), ConfigError> {
    if db.is_empty()
        || !db
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ConfigError::new(
            "--database",
            format!("{db:?}: use letters, digits, '_', '-' and '.'"),
        ));
    }
    Ok(())
}

async fn setup(o: SetupOptions) -> anyhow::Result<()> {
    check_database(&o.database)?;
    let raw = parse_retention(&o.raw_retention)
        .map_err(|reason| ConfigError::new("--raw-retention", reason))?;
    let password = match (&o.username, &o.password_file) {
        (Some(_), Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError::new("--password-file", format!("{}: {e}", path.display()))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--password-file",
                "a --username needs its password in a file".to_string(),
            )
            .into());
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "--username",
                "a --password-file needs the user it belongs to".to_string(),
            )
            .into());
        }
        (None, None) => None,
    };
    let base = reqwest::Url::parse(o.url.trim().trim_end_matches('/'))
        .map_err(|e| ConfigError::new("--url", format!("{:?}: {e}", o.url)))?;
    // reqwest is built without a default crypto provider; ring is the project's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build the HTTP client")?;
    let influx = Influx {
        http,
        base,
        auth: o.username.clone().zip(password),
    };
    influx.wait_up(Duration::from_secs(o.wait_s)).await?;
    influx
        .query(&format!("CREATE DATABASE {}", quote(&o.database)))
        .await?;
    let existing = Existing {
        policies: influx
            .names(&format!(
                "SHOW RETENTION POLICIES ON {}",
                quote(&o.database)
            ))
            .await?,
        queries: influx.continuous_queries(&o.database).await?,
    };
    let downsample = !o.no_downsample;
    for s in statements(&o.database, &raw, downsample, &existing) {
        influx.query(&s).await?;
        tracing::info!(statement = %s, "InfluxDB updated.");
    }
    println!(
        "InfluxDB database {:?}: raw readings kept {}, {}.",
        o.database,
        if raw.hours.is_none() {
            "for ever".to_string()
        } else {
            format!("for {}", raw.literal)
        },
        if downsample {
            format!("1-minute aggregates kept for ever in \"{MINUTES_RP}\" ({CQ_NAME})")
        } else {
            "no 1-minute aggregates".to_string()
        }
    );
    Ok(())
}

struct Influx {
    http: reqwest::Client,
    base: reqwest::Url,
    auth: Option<(String, String)>,
}

impl Influx {
    fn url(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        let joined = format!("{}{path}", u.path().trim_end_matches('/'));
        u.set_path(&joined);
        u
    }

    /// Until `/ping` answers (InfluxDB starting beside this), at most `wait`.
    async fn wait_up(&self, wait: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            let last = match self.http.get(self.url("/ping")).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => format!("/ping answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= wait {
                bail!(
                    "InfluxDB at {} did not answer within {} s ({last}): is it running, and is --url right?",
                    self.base,
                    wait.as_secs()
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One InfluxQL statement; its JSON answer, or the error InfluxDB gave.
    async fn query(&self, q: &str) -> anyhow::Result<serde_json::Value> {
        let mut url = self.url("/query");
        url.query_pairs_mut().append_pair("q", q);
        let mut req = self.http.post(url);
        if let Some((u, p)) = &self.auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("InfluxDB at {} could not be asked {q:?}", self.base))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            bail!(
                "InfluxDB refused {q:?} ({status}): this needs an admin; check --username and --password-file"
            );
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("InfluxDB answered {q:?} with {status}: {body}"))?;
        let error = v["error"]
            .as_str()
            .or_else(|| v["results"][0]["error"].as_str());
        if let Some(e) = error {
            bail!("InfluxDB refused {q:?}: {e}");
        }
        if !status.is_success() {
            bail!("InfluxDB answered {q:?} with {status}: {body}");
        }
        Ok(v)
    }

    /// The first column of every row of a SHOW statement.
    async fn names(&self, q: &str) -> anyhow::Result<Vec<String>> {
        let v = self.query(q).await?;
        Ok(rows(&v["results"][0]["series"][0])
            .filter_map(|r| r.first().and_then(|c| c.as_str()).map(str::to_string))
            .collect())
    }

    /// The names of `db`'s continuous queries (SHOW CONTINUOUS QUERIES lists them per
    /// database, each database a series named after it).
    async fn continuous_queries(&self, db: &str) -> anyhow::Result<Vec<String>> {
        let v = self.query("SHOW CONTINUOUS QUERIES").await?;
        let mut out = Vec::new();
        for s in v["results"][0]["series"].as_array().into_iter().flatten() {
            if s["name"].as_str() == Some(db) {
                out.extend(
                    rows(s).filter_map(|r| r.first().and_then(|c| c.as_str()).map(str::to_string)),
                );
            }
        }
        Ok(out)
    }
}

fn rows(series: &serde_json::Value) -> impl Iterator<Item = &Vec<serde_json::Value>> {
    series["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_array())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_are_checked_before_they_reach_a_statement() {
        assert_eq!(parse_retention("30d").unwrap().hours, Some(720));
        assert_eq!(parse_retention(" 8w ").unwrap().literal, "8w");
        assert_eq!(parse_retention("INF").unwrap().hours, None);
        for bad in [
            "",
            "d",
            "30",
            "30x",
            "-1d",
            "1.5d",
            "30d; DROP DATABASE x",
            "0h",
        ] {
            assert!(parse_retention(bad).is_err(), "{bad:?} was taken");
        }
        assert!(parse_retention("30x").unwrap_err().contains("h, d or w"));
    }

    #[test]
    fn a_fresh_database_gets_both_policies_and_the_query() {
        let s = statements(
            "wattbus",
            &parse_retention("30d").unwrap(),
            true,
            &Existing {
                policies: vec!["autogen".into()],
                queries: vec![],
            },
        );
        assert_eq!(
            s,
            [
                "ALTER RETENTION POLICY \"autogen\" ON \"wattbus\" DURATION 30d SHARD DURATION 1d DEFAULT",
                "CREATE RETENTION POLICY \"minutes\" ON \"wattbus\" DURATION INF REPLICATION 1 SHARD DURATION 7d",
                "CREATE CONTINUOUS QUERY \"wattbus_1m_v1\" ON \"wattbus\" BEGIN SELECT mean(*), min(*), max(*), last(*) INTO \"wattbus\".\"minutes\".:MEASUREMENT FROM \"wattbus\".\"autogen\"./.*/ GROUP BY time(1m), * END",
            ]
        );
    }

    #[test]
    fn an_older_query_is_replaced_and_no_downsampling_drops_ours() {
        let raw = parse_retention("inf").unwrap();
        let existing = Existing {
            policies: vec!["autogen".into(), "minutes".into()],
            queries: vec!["wattbus_1m_v0".into(), "users_own".into()],
        };
        let s = statements("db", &raw, true, &existing);
        assert!(
            s[0].ends_with("DURATION INF SHARD DURATION 7d DEFAULT"),
            "{s:?}"
        );
        assert!(
            s[1].starts_with("ALTER RETENTION POLICY \"minutes\""),
            "{s:?}"
        );
        assert_eq!(s[2], "DROP CONTINUOUS QUERY \"wattbus_1m_v0\" ON \"db\"");
        assert!(s[3].starts_with("CREATE CONTINUOUS QUERY \"wattbus_1m_v1\""));
        assert_eq!(s.len(), 4, "the user's own query is left alone: {s:?}");
        let existing = Existing {
            policies: vec!["autogen".into(), "minutes".into()],
            queries: vec![CQ_NAME.into()],
        };
        let s = statements("db", &raw, false, &existing);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1], "DROP CONTINUOUS QUERY \"wattbus_1m_v1\" ON \"db\"");
        // Already set up: nothing is created twice.
        let s = statements("db", &raw, true, &existing);
        assert_eq!(s.len(), 2, "{s:?}");
    }

    #[test]
    fn short_and_long_retentions_get_fitting_shards() {
        let sd = |t| shard_duration(&parse_retention(t).unwrap());
        assert_eq!(sd("24h"), "1h");
        assert_eq!(sd("30d"), "1d");
        assert_eq!(sd("52w"), "7d");
        assert_eq!(sd("inf"), "7d");
    }
}
