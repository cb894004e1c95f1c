//! `wattbus influx setup`: retention and downsampling on InfluxDB 1.x, so a Pi's raw data stays
//! bounded: raw readings kept for `--raw-retention` (30 days by default) in the database's
//! default policy (`autogen` unless someone chose another), and 1-minute aggregates (mean,
//! min, max and last of every field, every tag kept) in a `minutes` policy kept for ever,
//! filled by a continuous query that looks 2 minutes back each minute (a checkpoint, a batch)
//! and one that looks 6 hours back each hour, so readings that arrive late (a replay, a spool
//! drained after an outage) are counted; older ones need `wattbus influx backfill`. v1 looked
//! 10 minutes back every minute: each minute's aggregate was written ten times, on an SD card.
//!
//! Why a command of its own and not part of influx-writer: creating retention policies and
//! continuous queries takes an InfluxDB admin, and influx-writer logs in as a user that may only
//! write. compose runs this once per `up` with the admin's password (a secret only it holds).
//! It changes only what differs from what is asked, and says so on stdout. It never shortens
//! a retention that would delete readings already stored unless told to (`--shorten`): an
//! upgrade must not cost a user their history.
//!
//! The continuous queries are named with a version (`wattbus_1m_v2`): a later wattbus that needs
//! another query drops the older `wattbus_1m_*` and creates its own, rather than comparing the
//! text InfluxDB gives back (it normalises it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use runtime::ConfigError;
use runtime::backoff::{Backoff, Retries};

/// The continuous query this version keeps; every version's is `wattbus_1m_v<digits>`.
pub const CQ_NAME: &str = "wattbus_1m_v2";
/// Its companion for late readings (a replay, a spool drained after an outage): every hour,
/// the last 6 hours again. Every version's is `wattbus_1m_late_v<digits>`.
pub const CQ_LATE_NAME: &str = "wattbus_1m_late_v1";
const CQ_PREFIXES: [&str; 2] = ["wattbus_1m_v", "wattbus_1m_late_v"];
/// How far back the late query looks; older readings need `wattbus influx backfill`.
pub const LATE_HOURS: u64 = 6;
/// Where the 1-minute aggregates go.
pub const MINUTES_RP: &str = "minutes";

#[derive(clap::Subcommand, Debug)]
pub enum InfluxCommand {
    /// Create or update retention and downsampling (InfluxDB 1.x; needs an admin when
    /// authentication is on). Idempotent: run it at every start.
    Setup(SetupOptions),
    /// Make the 1-minute aggregates again over a past range, from the raw readings: after
    /// readings arrived more than 6 hours late (a long InfluxDB outage drained from the spool,
    /// an old journal replayed). Idempotent.
    Backfill(BackfillOptions),
}

/// Which InfluxDB and database, and as whom: the options every `wattbus influx` command takes.
#[derive(clap::Args, Debug)]
pub struct InfluxTargetArgs {
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
}

#[derive(clap::Args, Debug)]
pub struct BackfillOptions {
    #[command(flatten)]
    pub target: InfluxTargetArgs,
    /// From how long ago: a number with h, d or w (`3d`).
    #[arg(long)]
    pub since: String,
    /// Up to how long ago (default: now).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct SetupOptions {
    #[command(flatten)]
    pub target: InfluxTargetArgs,
    /// How long raw readings are kept: a number with h, d or w (`30d`, `720h`), or `inf`.
    #[arg(long, default_value = "30d")]
    pub raw_retention: String,
    /// Keep no 1-minute aggregates: the continuous query is dropped (aggregates already made
    /// are kept).
    #[arg(long)]
    pub no_downsample: bool,
    /// Shorten the raw retention even though InfluxDB holds readings older than it: they are
    /// deleted within the hour.
    #[arg(long)]
    pub shorten: bool,
    /// How long to wait for InfluxDB to answer at all (it may be starting beside this).
    #[arg(long, default_value_t = 300)]
    pub wait_s: u64,
}

pub async fn run(command: InfluxCommand) -> anyhow::Result<()> {
    match command {
        InfluxCommand::Setup(o) => setup(o).await,
        InfluxCommand::Backfill(o) => backfill(o).await,
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
    if !t.is_ascii() {
        return Err(bad());
    }
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
    // InfluxDB's durations end near 292 years; a century is "inf" for any Pi.
    if hours > 100 * 8766 {
        return Err(format!("{text:?} is over a century: say inf"));
    }
    Ok(Retention {
        literal: format!("{n}{unit}"),
        hours: Some(hours),
    })
}

/// InfluxDB's own advice for the shard group duration of a retention period, in hours.
fn shard_hours(r: &Retention) -> u64 {
    match r.hours {
        Some(h) if h < 48 => 1,
        Some(h) if h <= 24 * 183 => 24,
        _ => 168,
    }
}

/// How `SHOW RETENTION POLICIES` writes a duration of whole hours (`0s` for ever).
fn shown(hours: Option<u64>) -> String {
    match hours {
        None | Some(0) => "0s".to_string(),
        Some(h) => format!("{h}h0m0s"),
    }
}

/// One row of `SHOW RETENTION POLICIES`.
/// Asking whether InfluxDB is up: 250 ms doubling to 5 s.
const PING_BACKOFF: Backoff = Backoff::constant(Duration::from_millis(250), Duration::from_secs(5));

pub use influx_client::query::RetentionPolicy;

/// What is there already.
#[derive(Debug, Default)]
pub struct Existing {
    pub policies: Vec<RetentionPolicy>,
    /// This database's continuous query names.
    pub queries: Vec<String>,
    /// Start times (Unix s) of the shards of each policy: what a shorter retention would
    /// delete.
    pub shard_starts: Vec<(String, i64)>,
}

/// The statements that bring `db` to the wanted state from `existing` (pure), in a safe
/// order: the aggregates' policy and query first, the raw retention last. `now_s` is the wall
/// clock; `Err` is a refusal for a person to read (nothing is changed then).
pub fn statements(
    db: &str,
    raw: &Retention,
    downsample: bool,
    shorten: bool,
    existing: &Existing,
    now_s: i64,
) -> Result<Vec<String>, String> {
    let q = quote(db);
    let mut out = Vec::new();
    // Raw readings live in the database's default policy, whatever it is called.
    let raw_rp = existing.policies.iter().find(|p| p.default);
    let raw_name = raw_rp.map_or("autogen", |p| p.name.as_str());
    if raw_name == MINUTES_RP {
        return Err(format!(
            "the database's default retention policy is \"{MINUTES_RP}\", where the aggregates go: make another one the default first"
        ));
    }
    let (duration, shard) = (shown(raw.hours), shown(Some(shard_hours(raw))));
    if downsample {
        // A person's own choice for an existing one (a bound, other shards) is kept.
        if !existing.policies.iter().any(|p| p.name == MINUTES_RP) {
            out.push(format!(
                "CREATE RETENTION POLICY \"{MINUTES_RP}\" ON {q} DURATION INF REPLICATION 1 SHARD DURATION 7d"
            ));
        }
    }
    let ours = |n: &str| {
        CQ_PREFIXES.iter().any(|p| {
            n.strip_prefix(p)
                .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    for old in existing.queries.iter().filter(|n| {
        ours(n) && (!downsample || (n.as_str() != CQ_NAME && n.as_str() != CQ_LATE_NAME))
    }) {
        out.push(format!("DROP CONTINUOUS QUERY {} ON {q}", quote(old)));
    }
    if downsample && !existing.queries.iter().any(|n| n == CQ_NAME) {
        out.push(format!(
            "CREATE CONTINUOUS QUERY \"{CQ_NAME}\" ON {q} RESAMPLE EVERY 1m FOR 2m BEGIN {} END",
            downsample_select(db, raw_name)
        ));
    }
    if downsample && !existing.queries.iter().any(|n| n == CQ_LATE_NAME) {
        out.push(format!(
            "CREATE CONTINUOUS QUERY \"{CQ_LATE_NAME}\" ON {q} RESAMPLE EVERY 1h FOR {LATE_HOURS}h BEGIN {} END",
            downsample_select(db, raw_name)
        ));
    }
    match raw_rp {
        None => out.push(format!(
            "CREATE RETENTION POLICY \"autogen\" ON {q} DURATION {} REPLICATION 1 SHARD DURATION {}h DEFAULT",
            raw.literal,
            shard_hours(raw)
        )),
        Some(p) if p.duration == duration && p.shard_duration == shard => {}
        Some(p) => {
            let shorter = match (secs(&p.duration), raw.hours) {
                (None, _) => false,
                (Some(0), Some(_)) => true,
                (Some(_), None) => false,
                (Some(old), Some(h)) => (h * 3600) < old,
            };
            if shorter && !shorten {
                let cut = raw.hours.map_or(i64::MIN, |h| now_s - (h * 3600) as i64);
                if existing
                    .shard_starts
                    .iter()
                    .any(|(rp, start)| rp == &p.name && *start < cut)
                {
                    return Err(format!(
                        "the database may hold readings older than {} in \"{}\" (a shard starts before then; kept {} now); a shorter retention would delete them within the hour. Run again with --shorten to accept that, or keep a longer --raw-retention",
                        raw.literal, p.name, p.duration
                    ));
                }
            }
            out.push(format!(
                "ALTER RETENTION POLICY {} ON {q} DURATION {} SHARD DURATION {}h",
                quote(&p.name),
                raw.literal,
                shard_hours(raw)
            ));
        }
    }
    Ok(out)
}

/// Seconds of a duration as `SHOW RETENTION POLICIES` writes it (`720h0m0s`, `0s`).
fn secs(shown: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in shown.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    num.is_empty().then_some(total)
}

/// The continuous query's body: every field of every measurement of the raw policy `rp`, per
/// minute and series.
pub fn downsample_select(db: &str, rp: &str) -> String {
    let q = quote(db);
    format!(
        "SELECT mean(*), min(*), max(*), last(*) INTO {q}.\"{MINUTES_RP}\".:MEASUREMENT \
         FROM {q}.{}./.*/ GROUP BY time(1m), *",
        quote(rp)
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

/// A client for `target`'s InfluxDB, as its user; its database name checked.
fn connect(target: &InfluxTargetArgs) -> anyhow::Result<Influx> {
    check_database(&target.database)?;
    let InfluxTargetArgs {
        url,
        username,
        password_file,
        ..
    } = target;
    let password = match (username, password_file) {
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
    let base = reqwest::Url::parse(url.trim().trim_end_matches('/'))
        .map_err(|e| ConfigError::new("--url", format!("{url:?}: {e}")))?;
    if !base.username().is_empty() || base.password().is_some() {
        // It would be printed in errors; the password belongs in --password-file.
        return Err(ConfigError::new(
            "--url",
            "holds credentials: give --username and --password-file instead".to_string(),
        )
        .into());
    }
    // reqwest is built without a default crypto provider; ring is the project's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build the HTTP client")?;
    Ok(Influx {
        http,
        base,
        auth: username.clone().zip(password),
    })
}

async fn setup(o: SetupOptions) -> anyhow::Result<()> {
    let raw = parse_retention(&o.raw_retention)
        .map_err(|reason| ConfigError::new("--raw-retention", reason))?;
    let influx = connect(&o.target)?;
    let db = &o.target.database;
    influx.wait_up(Duration::from_secs(o.wait_s)).await?;
    influx
        .query(&format!("CREATE DATABASE {}", quote(db)))
        .await?;
    let existing = Existing {
        policies: influx.policies(db).await?,
        queries: influx.continuous_queries(db).await?,
        shard_starts: influx.shard_starts(db).await?,
    };
    let downsample = !o.no_downsample;
    let now_s = proto::now_ms() / 1000;
    let (todo, refused) = match statements(db, &raw, downsample, o.shorten, &existing, now_s) {
        Ok(todo) => (todo, None),
        // Shortening is refused: everything else (the aggregates) is still set up, with
        // the raw retention left as it is, and then the refusal is reported.
        Err(reason) => {
            let kept = existing
                .policies
                .iter()
                .find(|p| p.default)
                .and_then(|p| secs(&p.duration))
                .and_then(|s| {
                    parse_retention(&if s == 0 {
                        "inf".to_string()
                    } else {
                        format!("{}h", s / 3600)
                    })
                    .ok()
                });
            let todo = kept
                .and_then(|kept| statements(db, &kept, downsample, false, &existing, now_s).ok())
                .unwrap_or_default();
            (todo, Some(reason))
        }
    };
    for s in &todo {
        influx.query(s).await?;
        println!("InfluxDB: {s}");
    }
    if let Some(reason) = refused {
        return Err(ConfigError::new("--raw-retention", reason).into());
    }
    if todo.is_empty() {
        println!("InfluxDB: nothing to change.");
    }
    println!(
        "InfluxDB database {:?}: raw readings kept {}, {}.",
        db,
        if raw.hours.is_none() {
            "for ever".to_string()
        } else {
            format!("for {}", raw.literal)
        },
        if downsample {
            format!(
                "1-minute aggregates kept for ever in \"{MINUTES_RP}\" ({CQ_NAME}; {CQ_LATE_NAME} redoes the last {LATE_HOURS} hours every hour for late readings)"
            )
        } else {
            "no 1-minute aggregates".to_string()
        }
    );
    Ok(())
}

/// The aggregates' statements for `[from_s, to_s)`, six hours each (the continuous query's
/// own select, bounded): a month is 120 statements, each small enough for a Pi.
pub fn backfill_statements(db: &str, raw_rp: &str, from_s: i64, to_s: i64) -> Vec<String> {
    let select = downsample_select(db, raw_rp);
    let (head, group) = select
        .split_once(" GROUP BY ")
        .unwrap_or((select.as_str(), ""));
    let step = 6 * 3600;
    let mut out = Vec::new();
    if to_s <= from_s {
        return out;
    }
    // Whole minutes at both ends: a minute cut short would be overwritten with the aggregate
    // of part of its readings.
    let mut from = from_s - from_s.rem_euclid(60);
    let end = to_s + (60 - to_s.rem_euclid(60)) % 60;
    while from < end {
        let to = (from + step).min(end);
        out.push(format!(
            "{head} WHERE time >= {from}s AND time < {to}s GROUP BY {group}"
        ));
        from = to;
    }
    out
}

async fn backfill(o: BackfillOptions) -> anyhow::Result<()> {
    let ago = |flag: &str, text: &str| {
        parse_retention(text)
            .ok()
            .and_then(|r| r.hours)
            .ok_or_else(|| {
                ConfigError::new(flag, format!("{text:?}: give a number with h, d or w (3d)"))
            })
    };
    let since = ago("--since", &o.since)?;
    let until = o.until.as_deref().map(|u| ago("--until", u)).transpose()?;
    if until.is_some_and(|u| u >= since) {
        return Err(
            ConfigError::new("--until", "must be more recent than --since".to_string()).into(),
        );
    }
    let influx = connect(&o.target)?;
    let db = &o.target.database;
    influx.wait_up(Duration::from_secs(30)).await?;
    let policies = influx.policies(db).await?;
    if !policies.iter().any(|p| p.name == MINUTES_RP) {
        bail!(
            "database {:?} has no retention policy {MINUTES_RP:?}: run `wattbus influx setup` first",
            db
        );
    }
    let raw_rp = policies
        .iter()
        .find(|p| p.default)
        .map_or("autogen", |p| p.name.as_str());
    let now_s = proto::now_ms() / 1000;
    let hours_s = |h: u64| i64::try_from(h * 3600).unwrap_or(i64::MAX);
    let todo = backfill_statements(
        db,
        raw_rp,
        now_s - hours_s(since),
        now_s - until.map_or(0, hours_s),
    );
    let n = todo.len();
    for (i, s) in todo.iter().enumerate() {
        influx.query(s).await?;
        println!("InfluxDB: aggregated {} of {n} six-hour ranges", i + 1);
    }
    println!(
        "InfluxDB: the 1-minute aggregates of the last {} are made again.",
        o.since
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
        let mut retries = Retries::new(PING_BACKOFF);
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
            tokio::time::sleep(retries.failed_exactly()).await;
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
        let body = resp
            .text()
            .await
            .with_context(|| format!("InfluxDB's answer to {q:?} was cut off"))?;
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

    /// `db`'s retention policies.
    async fn policies(&self, db: &str) -> anyhow::Result<Vec<RetentionPolicy>> {
        let v = self
            .query(&format!("SHOW RETENTION POLICIES ON {}", quote(db)))
            .await?;
        let series: Vec<influx_client::query::Series> = match v["results"][0].get("series") {
            None => Vec::new(),
            Some(s) => serde_json::from_value(s.clone()).with_context(|| {
                format!("InfluxDB's answer to SHOW RETENTION POLICIES is not a list of series: {s}")
            })?,
        };
        let policies = influx_client::query::retention_policies(&series);
        if policies.is_empty() && !series.is_empty() {
            bail!("InfluxDB's answer to SHOW RETENTION POLICIES lacks a column: {series:?}");
        }
        Ok(policies)
    }

    /// (retention policy, start in Unix s) of `db`'s shards.
    async fn shard_starts(&self, db: &str) -> anyhow::Result<Vec<(String, i64)>> {
        let v = self.query("SHOW SHARDS").await?;
        let mut out = Vec::new();
        for series in v["results"][0]["series"].as_array().into_iter().flatten() {
            if series["name"].as_str() != Some(db) {
                continue;
            }
            let col = |name: &str| {
                series["columns"]
                    .as_array()
                    .and_then(|c| c.iter().position(|c| c == name))
            };
            let (Some(rp), Some(start)) = (col("retention_policy"), col("start_time")) else {
                bail!("InfluxDB's answer to SHOW SHARDS lacks a column: {series}");
            };
            for r in rows(series) {
                let when = r[start]
                    .as_str()
                    .and_then(unix_s)
                    .with_context(|| format!("a shard's start time in {r:?}"))?;
                out.push((r[rp].as_str().unwrap_or_default().to_string(), when));
            }
        }
        Ok(out)
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

/// Seconds since 1970 of an RFC 3339 UTC time as InfluxDB writes it (`2026-12-04T00:00:00Z`).
fn unix_s(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !t.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let days = proto::utc::days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    Some(days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?)
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

    fn policy(name: &str, duration: &str, shard: &str, default: bool) -> RetentionPolicy {
        RetentionPolicy {
            name: name.into(),
            duration: duration.into(),
            shard_duration: shard.into(),
            default,
        }
    }

    const NOW: i64 = 1_800_000_000;

    /// The statements for `db` with downsampling on and no shortening allowed.
    fn plan(db: &str, retention: &str, existing: &Existing) -> Vec<String> {
        statements(
            db,
            &parse_retention(retention).unwrap(),
            true,
            false,
            existing,
            NOW,
        )
        .unwrap()
    }

    #[test]
    fn a_fresh_database_gets_the_aggregates_first_and_its_raw_retention_last() {
        let existing = Existing {
            policies: vec![policy("autogen", "0s", "168h0m0s", true)],
            queries: vec![],
            // A week of readings, well inside 30 days.
            shard_starts: vec![("autogen".into(), NOW - 7 * 86_400)],
        };
        let s = plan("wattbus", "30d", &existing);
        assert_eq!(
            s,
            [
                "CREATE RETENTION POLICY \"minutes\" ON \"wattbus\" DURATION INF REPLICATION 1 SHARD DURATION 7d",
                "CREATE CONTINUOUS QUERY \"wattbus_1m_v2\" ON \"wattbus\" RESAMPLE EVERY 1m FOR 2m BEGIN SELECT mean(*), min(*), max(*), last(*) INTO \"wattbus\".\"minutes\".:MEASUREMENT FROM \"wattbus\".\"autogen\"./.*/ GROUP BY time(1m), * END",
                "CREATE CONTINUOUS QUERY \"wattbus_1m_late_v1\" ON \"wattbus\" RESAMPLE EVERY 1h FOR 6h BEGIN SELECT mean(*), min(*), max(*), last(*) INTO \"wattbus\".\"minutes\".:MEASUREMENT FROM \"wattbus\".\"autogen\"./.*/ GROUP BY time(1m), * END",
                "ALTER RETENTION POLICY \"autogen\" ON \"wattbus\" DURATION 30d SHARD DURATION 24h",
            ]
        );
    }

    #[test]
    fn history_is_never_cut_short_unless_asked() {
        let existing = Existing {
            policies: vec![policy("autogen", "0s", "168h0m0s", true)],
            queries: vec![],
            shard_starts: vec![("autogen".into(), NOW - 90 * 86_400)],
        };
        let raw = parse_retention("30d").unwrap();
        let e = statements("db", &raw, true, false, &existing, NOW).unwrap_err();
        assert!(
            e.contains("--shorten") && e.contains("older than 30d"),
            "{e}"
        );
        let s = statements("db", &raw, true, true, &existing, NOW).unwrap();
        assert!(
            s.last()
                .unwrap()
                .starts_with("ALTER RETENTION POLICY \"autogen\"")
        );
        // Longer is always fine.
        let s = statements(
            "db",
            &parse_retention("inf").unwrap(),
            true,
            false,
            &existing,
            NOW,
        );
        assert!(
            s.unwrap().iter().all(|st| !st.starts_with("ALTER")),
            "already for ever"
        );
    }

    #[test]
    fn the_default_policy_is_managed_whatever_its_name_and_stays_the_default() {
        let existing = Existing {
            policies: vec![
                policy("autogen", "0s", "168h0m0s", false),
                policy("one_year", "8760h0m0s", "168h0m0s", true),
                policy("minutes", "0s", "168h0m0s", false),
            ],
            queries: vec![CQ_NAME.into(), CQ_LATE_NAME.into()],
            shard_starts: vec![],
        };
        let s = plan("db", "52w", &existing);
        assert_eq!(
            s,
            ["ALTER RETENTION POLICY \"one_year\" ON \"db\" DURATION 52w SHARD DURATION 168h"]
        );
        assert!(s.iter().all(|st| !st.contains("DEFAULT")));
    }

    #[test]
    fn a_second_run_changes_nothing_and_older_queries_are_replaced() {
        let done = Existing {
            policies: vec![
                policy("autogen", "720h0m0s", "24h0m0s", true),
                policy("minutes", "0s", "168h0m0s", false),
            ],
            queries: vec![CQ_NAME.into(), CQ_LATE_NAME.into(), "wattbus_1month".into()],
            shard_starts: vec![("autogen".into(), NOW - 40 * 86_400)],
        };
        let raw = parse_retention("30d").unwrap();
        assert!(
            statements("db", &raw, true, false, &done, NOW)
                .unwrap()
                .is_empty()
        );
        let older = Existing {
            queries: vec!["wattbus_1m_v0".into(), "wattbus_1m_late_v0".into()],
            ..done
        };
        let s = statements("db", &raw, true, false, &older, NOW).unwrap();
        assert_eq!(s[0], "DROP CONTINUOUS QUERY \"wattbus_1m_v0\" ON \"db\"");
        assert_eq!(
            s[1],
            "DROP CONTINUOUS QUERY \"wattbus_1m_late_v0\" ON \"db\""
        );
        assert!(s[2].starts_with("CREATE CONTINUOUS QUERY \"wattbus_1m_v2\""));
        assert!(s[3].starts_with(
            "CREATE CONTINUOUS QUERY \"wattbus_1m_late_v1\" ON \"db\" RESAMPLE EVERY 1h FOR 6h"
        ));
        assert_eq!(s.len(), 4, "{s:?}");
        let s = statements(
            "db",
            &raw,
            false,
            false,
            &Existing {
                queries: vec![CQ_NAME.into()],
                ..older
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s, ["DROP CONTINUOUS QUERY \"wattbus_1m_v2\" ON \"db\""]);
    }

    #[test]
    fn a_backfill_covers_its_range_in_six_hour_statements_from_a_whole_minute() {
        let s = backfill_statements("db", "autogen", 1_000_030, 1_000_030 + 13 * 3600);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(
            s[0],
            "SELECT mean(*), min(*), max(*), last(*) INTO \"db\".\"minutes\".:MEASUREMENT FROM \"db\".\"autogen\"./.*/ WHERE time >= 1000020s AND time < 1021620s GROUP BY time(1m), *"
        );
        assert!(
            s[2].ends_with("AND time < 1046880s GROUP BY time(1m), *"),
            "{}",
            s[2]
        );
        assert!(backfill_statements("db", "autogen", 100, 100).is_empty());
    }

    #[test]
    fn influxdb_times_and_durations_are_read_right() {
        assert_eq!(unix_s("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_s("2026-12-04T00:00:00Z"), Some(1_796_342_400));
        assert_eq!(unix_s("2024-02-29T12:30:15Z"), Some(1_709_209_815));
        assert_eq!(unix_s("yesterday"), None);
        assert_eq!(secs("720h0m0s"), Some(720 * 3600));
        assert_eq!(secs("0s"), Some(0));
        assert_eq!(secs("1h30m0s"), Some(5400));
        assert_eq!(secs("7d"), None);
    }

    #[test]
    fn short_and_long_retentions_get_fitting_shards() {
        let sd = |t| shard_hours(&parse_retention(t).unwrap());
        assert_eq!(sd("24h"), 1);
        assert_eq!(sd("30d"), 24);
        assert_eq!(sd("52w"), 168);
        assert_eq!(sd("inf"), 168);
    }
}
