//! `wattbus backup list | verify | restore | fetch`: the sets backup-rotator made, read from the
//! storage its config section names.
//!
//! Restore writes through influx-writer's line-protocol client (`/write` with nanosecond
//! precision) into a **new database by default** (`<database>_restored_<set>`): InfluxDB's own
//! tools refuse to restore into an existing one, and a restore that mixes into live data
//! cannot be undone. The whole chain (the newest full set at or before `--set`, and the
//! incremental sets after it) is verified before anything is written.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, bail};
use backup_rotator::manifest::{self, Manifest, SetRef};
use backup_rotator::restore::{self, LineSink, Range};
use backup_rotator::store::Store;
use influx_client::query::{Auth, Connection, ident};
use influx_writer::config::{InfluxConfig, InfluxTarget, WriteApi};
use influx_writer::http::{WriteClient, WriteOutcome};
use influx_writer::line_protocol::Precision;
use runtime::backoff::{Backoff, Retries};
use runtime::{ConfigError, ConfigSource, Secret};

#[derive(clap::Subcommand, Debug)]
pub enum BackupCommand {
    /// The good sets, oldest first: kind, window, points, size, age.
    List(Where),
    /// Download every part of every set (or of one) and check its size, SHA-256 and gzip; exit
    /// 1 if any is damaged or missing.
    Verify {
        #[command(flatten)]
        place: Where,
        /// Only this set (as `list` names it).
        #[arg(long)]
        set: Option<String>,
    },
    /// Write a set and what it needs (its full set, the incremental sets up to it) into
    /// InfluxDB.
    Restore(RestoreOptions),
    /// Download a full set's native backup (native mode: InfluxDB's own files) into a
    /// directory, checked, for `influxd restore -portable` or `influx restore`.
    Fetch {
        #[command(flatten)]
        place: Where,
        /// The full set [default: the newest with a native backup].
        #[arg(long)]
        set: Option<String>,
        /// The directory to write into (created; files already there are not overwritten).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Which config's storage.
#[derive(clap::Args, Debug)]
pub struct Where {
    /// Config file [default: $WATTBUS_CONFIG, else /etc/wattbus/wattbus.toml if present]: its
    /// `[backup_rotator.storage]` says where the sets are.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct RestoreOptions {
    #[command(flatten)]
    place: Where,
    /// Restore the database as this set left it [default: the newest].
    #[arg(long)]
    set: Option<String>,
    /// InfluxDB's base URL [default: backup_rotator.influx.url].
    #[arg(long)]
    url: Option<String>,
    /// The database to write into [default: `<database>_restored_<set time>`, created]. An
    /// existing one needs --into-existing.
    #[arg(long)]
    database: Option<String>,
    /// Write into a database that exists (points with the same series and time are
    /// overwritten; nothing is deleted).
    #[arg(long)]
    into_existing: bool,
    /// A user that may create databases and write (1.x) [default: backup_rotator.influx's].
    #[arg(long)]
    username: Option<String>,
    /// A file holding that user's password.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Only points at or after this time (`2026-12-01T00:00:00Z` or Unix seconds).
    #[arg(long)]
    from: Option<String>,
    /// Only points before this time.
    #[arg(long)]
    to: Option<String>,
    /// Show what would be written, write nothing, create nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::List(w) => list(w).await,
        BackupCommand::Verify { place, set } => verify(place, set).await,
        BackupCommand::Restore(o) => restore_cmd(o).await,
        BackupCommand::Fetch { place, set, dir } => fetch(place, set, dir).await,
    }
}

struct Opened {
    store: Store,
    plan: backup_rotator::Plan,
}

fn open(w: &Where) -> anyhow::Result<Opened> {
    let src = ConfigSource::load(w.config.as_deref())?;
    let common = src.common()?;
    // Without native mode: these commands never run InfluxDB's tool, and a machine restoring
    // after the Pi died may not have it.
    let plan = src.resolve_edited::<backup_rotator::BackupRotator>(|c| c.native = None)?;
    let store = Store::open(&plan.storage, &common.site, &common.data_dir)?;
    Ok(Opened { store, plan })
}

/// The good sets, oldest first, and how many finished sets have a manifest that cannot be
/// read (each reported on stderr and left out).
async fn sets(store: &Store) -> anyhow::Result<(Vec<Manifest>, usize)> {
    let mut out = Vec::new();
    let mut damaged = 0;
    for l in store.list().await? {
        if !l.finished {
            continue;
        }
        match store.manifest(&l.id).await {
            Ok(m) => out.push(m),
            Err(e) => {
                damaged += 1;
                eprintln!("{}: DAMAGED manifest, left out: {e}", l.id);
            }
        }
    }
    Ok((out, damaged))
}

fn utc(ns: i64) -> String {
    let (y, mo, d, h, mi, s) = proto::utc::civil(ns.div_euclid(1_000_000_000));
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

fn size(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    if s >= 86_400 {
        format!("{}d{}h", s / 86_400, s % 86_400 / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m", s / 60)
    }
}

async fn list(w: Where) -> anyhow::Result<()> {
    let o = open(&w)?;
    let (sets, _) = sets(&o.store).await?;
    println!("{}", o.store.describe());
    if sets.is_empty() {
        println!("No backup sets yet.");
        return Ok(());
    }
    println!(
        "{:<30} {:<12} {:<43} {:>12} {:>10} {:>8}",
        "SET", "KIND", "WINDOW (UTC)", "POINTS", "SIZE", "AGE"
    );
    let now = proto::now_ms();
    for m in &sets {
        let from = m.from_ns.map_or_else(|| "(start)".to_string(), utc);
        println!(
            "{:<30} {:<12} {:<43} {:>12} {:>10} {:>8}",
            m.id,
            m.kind.as_str(),
            format!("{from} → {}", utc(m.to_ns)),
            m.points(),
            size(m.bytes()),
            age(now.saturating_sub(m.created_ms))
        );
        if m.skipped() > 0 {
            println!(
                "{:<30} ({} points left out: line protocol cannot carry them, see the rotator's log)",
                "",
                m.skipped()
            );
        }
        if let Some(n) = &m.native {
            match &n.error {
                None => println!(
                    "{:<30} (native: {} backup, {} files, {}; `wattbus backup fetch --set {}`)",
                    "",
                    n.tool,
                    n.files.len(),
                    size(n.bytes()),
                    m.id
                ),
                Some(e) => println!(
                    "{:<30} (native: {} FAILED: {})",
                    "",
                    printable(&n.tool),
                    printable(e)
                ),
            }
        }
    }
    Ok(())
}

/// `s` for a shell command a person copies: as it is when it is plainly safe, else in single
/// quotes (a manifest is read from storage and may be hostile).
fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=@".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Text from storage made safe for a terminal (no escape sequences).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

async fn fetch(w: Where, only: Option<String>, dir: PathBuf) -> anyhow::Result<()> {
    let o = open(&w)?;
    let (sets, _) = sets(&o.store).await?;
    let m = match &only {
        Some(id) => sets.iter().find(|m| &m.id == id).ok_or_else(|| {
            anyhow::anyhow!(
                "no good set {id:?} in {} (`wattbus backup list`)",
                o.store.describe()
            )
        })?,
        None => sets
            .iter()
            .rev()
            .find(|m| m.native.as_ref().is_some_and(manifest::Native::ok))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no set in {} has a native backup (native mode is off, or the tool failed: `wattbus backup list`)",
                    o.store.describe()
                )
            })?,
    };
    let native = match &m.native {
        Some(n) if n.ok() => n,
        Some(n) => bail!(
            "set {} has no native backup: {} failed: {}",
            m.id,
            n.tool,
            n.error.as_deref().unwrap_or("it wrote nothing")
        ),
        None => bail!(
            "set {} has no native backup (native mode was off when it was made)",
            m.id
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for f in &native.files {
        let name = f.file.strip_prefix("native/").unwrap_or(&f.file);
        let target = dir.join(name);
        if target.symlink_metadata().is_ok() {
            bail!("{} exists: fetch into an empty directory", target.display());
        }
        // Into a temporary name, renamed once the checksum matched: a file under its own name
        // is always whole and right. Created new (never through a link someone left there),
        // readable by this user only: it is a copy of the database.
        let partial = dir.join(format!(".{name}.partial"));
        let mut out = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)
                .with_context(|| {
                    format!(
                        "cannot create {} (left by an earlier fetch? remove it)",
                        partial.display()
                    )
                })?
        };
        let read = o
            .store
            .read_file(&m.id, &f.file, f.bytes, &f.sha256, |b| {
                use std::io::Write as _;
                out.write_all(b).map_err(|e| e.to_string())
            })
            .await;
        let synced = read.map_err(anyhow::Error::from).and_then(|()| {
            out.sync_all()
                .with_context(|| format!("cannot write {}", partial.display()))
        });
        if let Err(e) = synced {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context(format!("{} of set {}", f.file, m.id)));
        }
        std::fs::rename(&partial, &target)
            .with_context(|| format!("cannot rename {}", partial.display()))?;
    }
    println!(
        "{}: {} files of the {} backup ({}) in {}, checked.",
        m.id,
        native.files.len(),
        native.tool,
        size(native.bytes()),
        dir.display()
    );
    let shown_dir = sh_quote(&dir.display().to_string());
    match native.tool.as_str() {
        "influxd" => println!(
            "Restore into a new database with:\n  influxd restore -portable -db {} -newdb {} -host 127.0.0.1:8088 {shown_dir}",
            sh_quote(&m.database),
            sh_quote(&format!("{}_restored", m.database)),
        ),
        _ => println!(
            "Restore with:\n  influx restore --host http://127.0.0.1:8086 --token <operator token> {shown_dir}"
        ),
    }
    Ok(())
}

async fn verify(w: Where, only: Option<String>) -> anyhow::Result<()> {
    let o = open(&w)?;
    let (mut sets, damaged_manifests) = sets(&o.store).await?;
    if let Some(id) = &only {
        sets.retain(|m| &m.id == id);
        if sets.is_empty() {
            bail!(
                "no good set {id:?} in {} (`wattbus backup list`)",
                o.store.describe()
            );
        }
    }
    let damaged = restore::verify(&o.store, &sets, true).await?;
    for m in &sets {
        let bad: Vec<&(String, String, String)> = damaged.iter().filter(|d| d.0 == m.id).collect();
        if bad.is_empty() {
            let native = m
                .native
                .as_ref()
                .filter(|n| n.ok())
                .map(|n| format!(", {} native files", n.files.len()))
                .unwrap_or_default();
            println!(
                "{}: OK ({} parts{native}, {} points, {})",
                m.id,
                m.parts.len(),
                m.points(),
                size(m.bytes())
            );
        } else {
            for (_, file, problem) in bad {
                println!("{}: DAMAGED: {file} {problem}", m.id);
            }
        }
    }
    if !damaged.is_empty() {
        bail!(
            "{} damaged part(s); those sets cannot be restored",
            damaged.len()
        )
    }
    if damaged_manifests > 0 && only.is_none() {
        bail!(
            "{damaged_manifests} set(s) with a damaged manifest (above): they cannot be restored, and a restore chain through them is refused"
        );
    }
    Ok(())
}

/// `2026-12-01T00:00:00Z`, `2026-12-01` or Unix seconds, to Unix nanoseconds.
fn parse_time(key: &str, text: &str) -> Result<i64, ConfigError> {
    let bad = || {
        ConfigError::new(
            key,
            format!(
                "{text:?} is not a time: give 2026-12-01T00:00:00Z, 2026-12-01 or Unix seconds"
            ),
        )
    };
    let t = text.trim();
    if let Ok(s) = t.parse::<i64>() {
        return s.checked_mul(1_000_000_000).ok_or_else(bad);
    }
    let (date, time) = t.split_once('T').unwrap_or((t, "00:00:00Z"));
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let c: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let ([y, mo, da], [h, mi, s]) = (d.as_slice(), c.as_slice()) else {
        return Err(bad());
    };
    if !(1..=12).contains(mo)
        || !(1..=31).contains(da)
        || !(0..24).contains(h)
        || !(0..60).contains(mi)
        || !(0..61).contains(s)
    {
        return Err(bad());
    }
    let secs = proto::utc::days_from_civil(*y, *mo, *da) * 86_400 + h * 3600 + mi * 60 + s;
    secs.checked_mul(1_000_000_000).ok_or_else(bad)
}

/// influx-writer's client, one per retention policy (it is part of the write URL).
struct Writer {
    url: String,
    database: String,
    auth: Option<Secret>,
    clients: HashMap<String, WriteClient>,
    written: u64,
    refused: Vec<String>,
}

impl Writer {
    fn client(&mut self, rp: &str) -> Result<&WriteClient, String> {
        if !self.clients.contains_key(rp) {
            let cfg = InfluxConfig {
                url: self.url.clone(),
                api: WriteApi::V1,
                database: Some(self.database.clone()),
                retention_policy: Some(rp.to_string()),
                precision: Precision::Ns,
                gzip: true,
                timeout_ms: 60_000,
                ..InfluxConfig::default()
            };
            let target = InfluxTarget {
                cfg,
                auth: self.auth.clone(),
                retry: Backoff::constant(Duration::from_millis(500), Duration::from_secs(30)),
            };
            let c = WriteClient::new(&target).map_err(|e| e.to_string())?;
            self.clients.insert(rp.to_string(), c);
        }
        self.clients.get(rp).ok_or_else(|| "no client".to_string())
    }

    /// One body: retried while InfluxDB is away (a minute and a half at most), split when
    /// too large, and a refused batch (a type conflict with what the database holds) counted
    /// with InfluxDB's message.
    async fn post(&mut self, rp: &str, body: &str) -> Result<(), String> {
        let mut stack = vec![body.to_string()];
        while let Some(b) = stack.pop() {
            let mut retries = Retries::new(Backoff::constant(
                Duration::from_millis(500),
                Duration::from_secs(15),
            ));
            loop {
                let outcome = self.client(rp)?.write(b.as_bytes()).await;
                match outcome {
                    WriteOutcome::Written => {
                        self.written += b.lines().count() as u64;
                        break;
                    }
                    WriteOutcome::TooLarge => {
                        let lines: Vec<&str> = b.lines().collect();
                        if lines.len() < 2 {
                            return Err("InfluxDB refuses even one line as too large".into());
                        }
                        let (a, c) = lines.split_at(lines.len() / 2);
                        stack.push(format!("{}\n", c.join("\n")));
                        stack.push(format!("{}\n", a.join("\n")));
                        break;
                    }
                    WriteOutcome::Rejected(msg) => {
                        // 1.x writes the batch's good points and names the first bad one.
                        self.refused.push(msg);
                        break;
                    }
                    WriteOutcome::Refused { status, what } => {
                        return Err(format!("InfluxDB refused the write ({status}): {what}"));
                    }
                    WriteOutcome::Unavailable(why) if why.contains("not found") => {
                        // "retention policy not found", "database not found": no retry helps.
                        return Err(format!("InfluxDB cannot take the write: {why}"));
                    }
                    WriteOutcome::Unavailable(why) | WriteOutcome::ServerError(why) => {
                        if retries.failures() >= 8 {
                            return Err(format!("InfluxDB stayed unavailable: {why}"));
                        }
                        tokio::time::sleep(retries.failed()).await;
                    }
                }
            }
        }
        Ok(())
    }
}

impl LineSink for Writer {
    fn write<'a>(
        &'a mut self,
        rp: &'a str,
        body: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(self.post(rp, body))
    }
}

async fn restore_cmd(o: RestoreOptions) -> anyhow::Result<()> {
    let opened = open(&o.place)?;
    let store = &opened.store;
    let influx = &opened.plan.influx;
    let (sets, _) = sets(store).await?;
    let refs: Vec<SetRef> = sets
        .iter()
        .map(|m| SetRef {
            id: m.id.clone(),
            kind: m.kind,
        })
        .collect();
    if let Some(id) = &o.set
        && !sets.iter().any(|m| &m.id == id)
    {
        bail!(
            "no good set {id:?} in {} (`wattbus backup list`)",
            store.describe()
        );
    }
    let chain_ids = manifest::chain(&refs, o.set.as_deref());
    let chain: Vec<&Manifest> = chain_ids
        .iter()
        .filter_map(|id| sets.iter().find(|m| &m.id == id))
        .collect();
    let (Some(_), Some(last)) = (chain.first(), chain.last()) else {
        bail!(
            "no full set to restore from in {} (`wattbus backup list`)",
            store.describe()
        );
    };
    let links: Vec<manifest::ChainLink> = chain
        .iter()
        .map(|m| manifest::ChainLink::from(*m))
        .collect();
    if let Err(gap) = manifest::check_chain(&links) {
        bail!(
            "cannot restore as of {}: {gap}. Nothing was written; restore an earlier set with --set (`wattbus backup list`)",
            last.id
        );
    }
    let range = Range {
        from_ns: o
            .from
            .as_deref()
            .map(|t| parse_time("--from", t))
            .transpose()?,
        to_ns: o.to.as_deref().map(|t| parse_time("--to", t)).transpose()?,
    };
    println!(
        "Restoring {} as of {} from {} ({} set(s): {}).",
        last.database,
        utc(last.to_ns),
        store.describe(),
        chain.len(),
        chain_ids.join(", ")
    );
    // Everything checked before anything is written: a damaged incremental found half-way
    // would leave a database that looks restored and is not.
    let owned: Vec<Manifest> = chain.iter().map(|m| (*m).clone()).collect();
    let damaged = restore::verify(store, &owned, false).await?;
    if !damaged.is_empty() {
        for (id, file, problem) in &damaged {
            eprintln!("{id}: DAMAGED: {file} {problem}");
        }
        bail!("the chain has damaged parts; nothing was written (restore an older set with --set)");
    }
    let database = o.database.clone().unwrap_or_else(|| {
        format!(
            "{}_restored_{}",
            last.database,
            last.id.split('-').next().unwrap_or("set").to_lowercase()
        )
    });
    let url = o.url.clone().unwrap_or_else(|| influx.url.clone());
    let auth = match (&o.username, &o.password_file) {
        (Some(u), Some(f)) => {
            let p = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --password-file {}", f.display()))?;
            Some(Auth::Basic {
                user: u.clone(),
                password: p.trim_end_matches(['\n', '\r']).to_string(),
            })
        }
        (None, None) => influx.auth.clone(),
        _ => return Err(ConfigError::new("--username", "and --password-file go together").into()),
    };
    let conn = Connection::new(&url, &database, auth.clone(), Duration::from_secs(60))?;
    if !o.dry_run {
        prepare(&conn, &database, &chain, o.into_existing).await?;
    }
    let header = match &auth {
        None => None,
        Some(Auth::Basic { user, password }) => {
            Some(Secret::new(influx_client::basic_auth(user, password)))
        }
        Some(Auth::Token(t)) => Some(Secret::new(format!("Token {t}"))),
    };
    let mut writer = Writer {
        url: url.clone(),
        database: database.clone(),
        auth: header,
        clients: HashMap::new(),
        written: 0,
        refused: Vec::new(),
    };
    let mut total = restore::Restored::default();
    for m in &chain {
        for p in &m.parts {
            let r = restore::restore_part(store, m, p, range, 5000, o.dry_run, &mut writer).await?;
            println!(
                "  {} {}: {}.{}: {} points{}",
                m.id,
                p.file,
                p.retention_policy,
                p.measurement,
                r.points,
                if r.outside > 0 {
                    format!(" ({} outside the range)", r.outside)
                } else {
                    String::new()
                }
            );
            total.points += r.points;
            total.outside += r.outside;
        }
    }
    if o.dry_run {
        println!(
            "Dry run: {} points would be written to database {database:?} at {url}; nothing was written or created.",
            total.points
        );
        return Ok(());
    }
    if !writer.refused.is_empty() {
        for msg in writer.refused.iter().take(10) {
            eprintln!("InfluxDB refused: {msg}");
        }
        bail!(
            "{} batch(es) were partly refused by InfluxDB (above); the rest ({} points) is in database {database:?}",
            writer.refused.len(),
            writer.written
        );
    }
    println!(
        "Restored {} points into database {database:?} at {url}. Its retention policies keep everything (INF): set them as you want them, e.g. `wattbus influx setup --database {database}`.",
        writer.written
    );
    Ok(())
}

/// Create the database and its retention policies (kept for ever: a restore must not have
/// InfluxDB drop the old points it writes), or check that writing into it was asked for.
async fn prepare(
    conn: &Connection,
    database: &str,
    chain: &[&Manifest],
    into_existing: bool,
) -> anyhow::Result<()> {
    let dbs = conn.query("SHOW DATABASES").await?;
    let exists = dbs
        .iter()
        .flat_map(|s| influx_client::query::column(s, "name"))
        .any(|n| n == database);
    if exists && !into_existing {
        bail!(
            "database {database:?} exists: restore into a new one (--database NEW), or pass --into-existing to write into it"
        );
    }
    if !exists {
        conn.query(&format!("CREATE DATABASE {}", ident(database)))
            .await?;
    }
    let have: Vec<String> = backup_rotator::export::policies(conn)
        .await?
        .into_iter()
        .map(|p| p.name)
        .collect();
    // Every policy any set of the chain has (one made after the full set too), once; the
    // default only in a database made here: an existing one keeps its own.
    let mut made: Vec<&str> = Vec::new();
    for p in chain.iter().rev().flat_map(|m| &m.retention_policies) {
        if have.contains(&p.name) || made.contains(&p.name.as_str()) {
            continue;
        }
        conn.query(&format!(
            "CREATE RETENTION POLICY {} ON {} DURATION INF REPLICATION 1{}",
            ident(&p.name),
            ident(database),
            if p.default && !exists { " DEFAULT" } else { "" }
        ))
        .await?;
        made.push(&p.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_and_terminal_text_from_a_hostile_manifest_are_defused() {
        assert_eq!(sh_quote("wattbus"), "wattbus");
        assert_eq!(sh_quote("/tmp/native"), "/tmp/native");
        assert_eq!(sh_quote("x; touch /tmp/pwned"), "'x; touch /tmp/pwned'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(printable("a\u{1b}[2Jb"), "a?[2Jb");
    }

    #[test]
    fn times_in_three_spellings() {
        assert_eq!(parse_time("--from", "0").expect("secs"), 0);
        assert_eq!(
            parse_time("--from", "2026-12-01T10:00:00Z").expect("rfc3339"),
            parse_time("--from", "2026-12-01").expect("date") + 36_000 * 1_000_000_000
        );
        let e = parse_time("--to", "yesterday").expect_err("bad");
        assert_eq!(e.key, "--to");
    }
}
