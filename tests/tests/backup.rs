//! backup-rotator against a real InfluxDB 1.6.7 and a real directory: what a user relies on
//! when the SD card dies.
//!
//! - Every point comes back: the demo's readings through the real pipeline plus points other
//!   writers make (integers, strings with quotes and backslashes, booleans, tags and names with
//!   spaces, commas and equals signs), in two retention policies; backed up by the service,
//!   the database dropped, restored with `wattbus backup restore`, compared point by point,
//!   with every field's type.
//! - Rotation beyond N, incremental sets and their restore chain, InfluxDB away during a run,
//!   a damaged part found by `verify` and refused by `restore`, a kill -9 mid-run followed by
//!   a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use backup_rotator::manifest::{MANIFEST, SetKind};
use backup_rotator::{Rotator, RunOutcome};
use influx_client::query::Connection;
use runtime::ConfigSource;
use wattbus_e2e::servers::{
    Influxd, demo_into, http, influx_setup, run_continuous_queries, urlencode,
};
use wattbus_e2e::{
    BrokerSetup, Proc, Tmpfs, free_port, rerun_in_mount_namespace, wait_until, wattbus_bin,
};

const DB: &str = "wattbus";

/// Points other writers leave in a database: every field type, hard names. An hour ago,
/// inside the raw policy's 30 days.
fn hard_lines() -> String {
    let t = (proto::now_ms() - 3_600_000) * 1_000_000;
    format!(
        concat!(
            "plug\\ state,site=lab,device=kettle\\,2,room=living\\ room,kind=a\\=b relay=true,count=42i,label=\"say \\\"hi\\\" \\\\ bye, ok=1\",watts=1234.5 {a}\n",
            "plug\\ state,site=lab,device=kettle\\,2,room=living\\ room,kind=a\\=b relay=false,count=-7i,label=\"ünïcødé ⚡\",watts=0.0 {b}\n",
            "counters,site=lab,device=meter-9 pulses=9007199254740993i,ok=T {c}\n",
            "counters,site=lab,device=meter-9 pulses=0i,ok=F {d}\n",
        ),
        a = t + 1,
        b = t + 1_000_000_000,
        c = t + 2_000_000_000,
        d = t + 3_000_000_000,
    )
}

fn write(influx: &Influxd, rp: Option<&str>, lines: &str) {
    let rp = rp
        .map(|r| format!("&rp={}", urlencode(r)))
        .unwrap_or_default();
    let (status, body) = http(
        "POST",
        influx.port,
        &format!("/write?db={DB}{rp}&precision=ns"),
        lines.as_bytes(),
    );
    assert_eq!(status, 204, "write failed: {body}");
}

/// Every point of every measurement in every policy: (policy, measurement, tags, time) →
/// field → (type, value as JSON text).
type Snapshot = BTreeMap<(String, String, String, i64), BTreeMap<String, (String, String)>>;

fn query_ns(influx: &Influxd, q: &str) -> serde_json::Value {
    query_ns_on(influx, DB, q)
}

fn query_ns_on(influx: &Influxd, db: &str, q: &str) -> serde_json::Value {
    let (status, body) = http(
        "POST",
        influx.port,
        &format!("/query?db={db}&epoch=ns&q={}", urlencode(q)),
        b"",
    );
    assert_eq!(status, 200, "{q}: {body}");
    serde_json::from_str(&body).expect("json")
}

fn column(v: &serde_json::Value, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for s in v["results"][0]["series"].as_array().into_iter().flatten() {
        let i = s["columns"]
            .as_array()
            .and_then(|c| c.iter().position(|c| c == name))
            .expect("column");
        for row in s["values"].as_array().into_iter().flatten() {
            out.push(row[i].as_str().expect("text").to_string());
        }
    }
    out
}

fn snapshot(influx: &Influxd) -> Snapshot {
    snapshot_of(influx, DB)
}

fn snapshot_of(influx: &Influxd, db: &str) -> Snapshot {
    let query_ns = |influx: &Influxd, q: &str| query_ns_on(influx, db, q);
    let mut out = Snapshot::new();
    let policies = column(
        &query_ns(influx, &format!("SHOW RETENTION POLICIES ON \"{db}\"")),
        "name",
    );
    let measurements = column(&query_ns(influx, "SHOW MEASUREMENTS"), "name");
    for rp in &policies {
        for m in &measurements {
            let fk = query_ns(
                influx,
                &format!(
                    "SHOW FIELD KEYS FROM \"{rp}\".\"{}\"",
                    m.replace('"', "\\\"")
                ),
            );
            let keys = column(&fk, "fieldKey");
            let types = column(&fk, "fieldType");
            let types: BTreeMap<String, String> = keys.into_iter().zip(types).collect();
            if types.is_empty() {
                continue;
            }
            let v = query_ns(
                influx,
                &format!(
                    "SELECT * FROM \"{rp}\".\"{}\" GROUP BY *",
                    m.replace('"', "\\\"")
                ),
            );
            for s in v["results"][0]["series"].as_array().into_iter().flatten() {
                let tags = serde_json::to_string(&s["tags"]).expect("tags");
                let cols: Vec<String> = s["columns"]
                    .as_array()
                    .expect("columns")
                    .iter()
                    .map(|c| c.as_str().expect("name").to_string())
                    .collect();
                for row in s["values"].as_array().expect("values") {
                    let row = row.as_array().expect("row");
                    let t = row[0].as_i64().expect("time");
                    let fields: BTreeMap<String, (String, String)> = cols
                        .iter()
                        .zip(row)
                        .skip(1)
                        .filter(|(_, v)| !v.is_null())
                        .map(|(c, v)| {
                            (
                                c.clone(),
                                (types.get(c).cloned().unwrap_or_default(), v.to_string()),
                            )
                        })
                        .collect();
                    if !fields.is_empty() {
                        out.insert((rp.clone(), m.clone(), tags.clone(), t), fields);
                    }
                }
            }
        }
    }
    out
}

/// InfluxDB with the shipped policies, the demo's readings (through the real pipeline:
/// simulated devices, the services, influx-writer) and the hard lines, then frozen: the
/// continuous queries dropped after their SELECT … INTO ran once.
fn filled(dir: &Path) -> Influxd {
    let influx = Influxd::start(dir);
    influx_setup(&influx, DB);
    let mut demo = demo_into(&influx, DB, &dir.join("demo.log"));
    let enough = wait_until(Duration::from_secs(180), || {
        let v = influx.query(
            DB,
            r#"SELECT count("power_w") FROM "power" GROUP BY "device""#,
        );
        let series = v["results"][0]["series"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        series.len() >= 4
            && series
                .iter()
                .all(|s| s["values"][0][1].as_f64().unwrap_or(0.0) >= 20.0)
    });
    demo.terminate(Duration::from_secs(20));
    assert!(
        enough,
        "the demo did not fill InfluxDB; see {}",
        dir.join("demo.log").display()
    );
    // Aggregated once, then frozen: nothing changes between the backup and the comparison.
    for name in run_continuous_queries(&influx, DB) {
        influx.query(DB, &format!("DROP CONTINUOUS QUERY \"{name}\" ON \"{DB}\""));
    }
    // After the aggregates, which would otherwise average them too.
    let hard = hard_lines();
    write(&influx, None, &hard);
    write(&influx, Some("minutes"), &hard);
    influx
}

fn config(broker: &BrokerSetup, dir: &Path, influx: &Influxd, extra: &str) -> PathBuf {
    let local = format!("dir = \"{}\"\n", dir.join("backups").display());
    config_with_storage(broker, dir, influx, extra, &local)
}

fn config_with_storage(
    broker: &BrokerSetup,
    dir: &Path,
    influx: &Influxd,
    extra: &str,
    storage: &str,
) -> PathBuf {
    broker.service_config(
        dir,
        [
            "level = \"info\"",
            "",
            &format!(
                "\n[backup_rotator]\nsettle_s = 0\nhealth_listen = \"127.0.0.1:{}\"\n{extra}\n\
                 [backup_rotator.influx]\nurl = \"http://127.0.0.1:{}\"\n\
                 [backup_rotator.storage]\n{storage}",
                free_port(),
                influx.port,
            ),
        ],
    )
}

fn finished_sets(dir: &Path) -> Vec<PathBuf> {
    let root = dir.join("backups").join("lab");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.join(MANIFEST).is_file());
    out.sort();
    out
}

fn wattbus(args: &[&str]) -> std::process::Output {
    Command::new(wattbus_bin())
        .args(args)
        .env_remove("WATTBUS_CONFIG")
        .output()
        .expect("wattbus runs")
}

/// `wattbus backup fetch` of `set` (default: the newest with a native backup) into `into`.
fn fetch(cfg: &str, into: &Path, set: Option<&str>) -> std::process::Output {
    let mut args = vec![
        "backup",
        "fetch",
        "-c",
        cfg,
        "--dir",
        into.to_str().unwrap(),
    ];
    if let Some(set) = set {
        args.extend(["--set", set]);
    }
    wattbus(&args)
}

/// The output of a command that must have succeeded (all of it in the failure).
fn succeeded(o: &std::process::Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn a_restore_brings_back_every_point_with_its_type_and_tags() {
    let dir = tempfile::tempdir().unwrap();
    let influx = filled(dir.path());
    let mut before = snapshot(&influx);
    let hard = before
        .keys()
        .filter(|k| k.1 == "plug state" || k.1 == "counters")
        .count();
    assert_eq!(hard, 8, "the hard points in both policies");
    assert!(before.len() > 200, "the demo's readings: {}", before.len());
    assert!(
        before.keys().any(|k| k.0 == "minutes" && k.1 == "power"),
        "aggregates present"
    );

    let broker = BrokerSetup::new(dir.path());
    let _broker = broker.start(&dir.path().join("broker.log"));
    // A schedule that never comes: only the first run, made at once because no set exists.
    let cfg = config(&broker, dir.path(), &influx, "schedule = \"0 0 1 1 *\"");
    let mut rotator = Proc::spawn(
        "backup-rotator",
        Command::new(wattbus_bin())
            .args(["run", "backup-rotator", "-c"])
            .arg(&cfg),
        &dir.path().join("rotator.log"),
    );
    let made = wait_until(Duration::from_secs(120), || {
        !finished_sets(dir.path()).is_empty()
    });
    rotator.terminate(Duration::from_secs(20));
    assert!(
        made,
        "no set was made; log:\n{}",
        std::fs::read_to_string(dir.path().join("rotator.log")).unwrap_or_default()
    );
    let cfg_s = cfg.to_str().unwrap();
    let set = &finished_sets(dir.path())[0];
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(set.join(MANIFEST)).unwrap()).unwrap();
    let to_ns = m["to_ns"].as_i64().unwrap();
    // Readings stamped at or after the window's end (the demo's last second) belong to the
    // next set, which this schedule never makes.
    before.retain(|k, _| k.3 < to_ns);

    let listed = wattbus(&["backup", "list", "-c", cfg_s]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && text.contains("-full") && text.contains("full"),
        "{text}"
    );
    let verified = wattbus(&["backup", "verify", "-c", cfg_s]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );

    // The card died: the database is gone.
    influx.query(DB, &format!("DROP DATABASE \"{DB}\""));
    let dry = wattbus(&[
        "backup",
        "restore",
        "-c",
        cfg_s,
        "--database",
        DB,
        "--dry-run",
    ]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let per: std::collections::BTreeMap<(String, String), usize> =
        before.keys().fold(Default::default(), |mut m, k| {
            *m.entry((k.0.clone(), k.1.clone())).or_default() += 1;
            m
        });
    assert!(
        text.contains(&format!("{} points would be written", before.len())),
        "{per:?}\n{text}"
    );
    assert!(
        !column(&query_ns(&influx, "SHOW DATABASES"), "name").contains(&DB.to_string()),
        "a dry run creates nothing"
    );

    let restored = wattbus(&["backup", "restore", "-c", cfg_s, "--database", DB]);
    assert!(
        restored.status.success(),
        "{}{}",
        String::from_utf8_lossy(&restored.stdout),
        String::from_utf8_lossy(&restored.stderr)
    );
    let after = snapshot(&influx);
    let missing: Vec<_> = before
        .keys()
        .filter(|k| !after.contains_key(k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} points not restored, e.g. {missing:?}",
        before.len() - after.len()
    );
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "point {k:?} restored differently");
    }
    assert_eq!(before.len(), after.len());

    // A second restore into the same database is refused unless asked for.
    let again = wattbus(&["backup", "restore", "-c", cfg_s, "--database", DB]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--into-existing"));
}

fn plan(
    broker: &BrokerSetup,
    dir: &Path,
    influx: &Influxd,
    extra: &str,
) -> (backup_rotator::Plan, PathBuf) {
    let cfg = config(broker, dir, influx, extra);
    let src = ConfigSource::load(Some(&cfg)).expect("config");
    (
        src.resolve::<backup_rotator::BackupRotator>()
            .expect("plan"),
        cfg,
    )
}

/// The set a run made (a test that expects one).
fn made(o: Result<RunOutcome, backup_rotator::RunError>) -> backup_rotator::manifest::Manifest {
    match o.unwrap() {
        RunOutcome::Made(m) => *m,
        RunOutcome::Nothing => panic!("no set made"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn rotator(plan: &backup_rotator::Plan, dir: &Path) -> Rotator {
    let site = proto::Segment::new("lab").unwrap();
    let store = backup_rotator::store::Store::open(&plan.storage, &site, dir).unwrap();
    let conn = Connection::new(
        &plan.influx.url,
        &plan.influx.database,
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    Rotator::new(plan, store, conn)
}

#[test]
fn rotation_keeps_n_full_sets_and_what_they_need_and_survives_failures() {
    let dir = tempfile::tempdir().unwrap();
    let mut influx = Influxd::start(dir.path());
    influx.create_database(DB);
    // Readings over the last two hours, a minute apart.
    let now_ms = proto::now_ms();
    let mut lines = String::new();
    for i in 0..120i64 {
        let t = (now_ms - 7_200_000 + i * 60_000) * 1_000_000;
        lines.push_str(&format!("power,site=lab,device=m1 power_w={}.5 {t}\n", i));
    }
    write(&influx, None, &lines);
    let broker = BrokerSetup::new(dir.path());
    let (plan, cfg) = plan(
        &broker,
        dir.path(),
        &influx,
        "keep = 2\nfull_every_h = 1\nlookback_s = 60",
    );
    let rt = runtime();
    let mut r = rotator(&plan, dir.path());

    // Full, then incremental half an hour later (after the newest point: empty), then a full
    // an hour after the first, …
    let t0 = now_ms;
    let full1 = made(rt.block_on(r.run_once(t0)));
    assert_eq!((full1.kind, full1.points()), (SetKind::Full, 120));
    let inc1 = made(rt.block_on(r.run_once(t0 + 1_800_000)));
    assert_eq!(inc1.kind, SetKind::Incremental);
    assert_eq!(inc1.base.as_deref(), Some(full1.id.as_str()));
    assert_eq!(
        inc1.from_ns,
        Some(full1.to_ns - 60_000_000_000),
        "starts a lookback before the last end"
    );

    // InfluxDB away: the run fails, nothing is counted, nothing deleted.
    influx.stop();
    let e = rt
        .block_on(r.run_once(t0 + 3_600_000))
        .expect_err("InfluxDB is down");
    assert!(e.is_transient(), "{e}");
    assert_eq!(finished_sets(dir.path()).len(), 2);
    influx.resume();

    let full2 = made(rt.block_on(r.run_once(t0 + 3_700_000)));
    assert_eq!(full2.kind, SetKind::Full);
    let _inc2 = made(rt.block_on(r.run_once(t0 + 5_400_000)));
    assert_eq!(
        finished_sets(dir.path()).len(),
        4,
        "two fulls, each with its incremental"
    );
    // A third full: the first and its incremental expire.
    let full3 = made(rt.block_on(r.run_once(t0 + 7_400_000)));
    let ids: Vec<String> = finished_sets(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(
        !ids.contains(&full1.id) && !ids.contains(&inc1.id),
        "{ids:?}"
    );
    assert!(
        ids.contains(&full2.id) && ids.contains(&full3.id),
        "{ids:?}"
    );

    // A part damaged on the disk: verify names it and exits 1; restore refuses it.
    let part = dir
        .path()
        .join("backups/lab")
        .join(&full3.id)
        .join(&full3.parts[0].file);
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&part, &bytes).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let v = wattbus(&["backup", "verify", "-c", cfg_s]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "{out}");
    assert!(
        out.contains(&format!("{}: DAMAGED: {}", full3.id, full3.parts[0].file)),
        "{out}"
    );
    assert!(out.contains(&format!("{}: OK", full2.id)), "{out}");
    let r2 = wattbus(&["backup", "restore", "-c", cfg_s, "--database", "x"]);
    assert!(!r2.status.success());
    assert!(String::from_utf8_lossy(&r2.stderr).contains("nothing was written"));
    // The older chain still restores, with a time range.
    let from = (now_ms - 3_600_000) / 1000;
    let r3 = wattbus(&[
        "backup",
        "restore",
        "-c",
        cfg_s,
        "--set",
        &full2.id,
        "--database",
        "older",
        "--from",
        &from.to_string(),
    ]);
    assert!(
        r3.status.success(),
        "{}",
        String::from_utf8_lossy(&r3.stderr)
    );
    let n = influx.query("older", r#"SELECT count("power_w") FROM "power""#);
    assert_eq!(
        n["results"][0]["series"][0]["values"][0][1].as_f64(),
        Some(60.0),
        "the last hour only: {n}"
    );
}

#[test]
fn a_kill_mid_run_leaves_nothing_counted_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx.create_database(DB);
    // Enough points that a run takes a moment: 200,000 in 2,000-line writes.
    let now_ms = proto::now_ms();
    for b in 0..100i64 {
        let mut lines = String::new();
        for i in 0..2000i64 {
            let t = (now_ms - 86_400_000 + (b * 2000 + i) * 400) * 1_000_000;
            lines.push_str(&format!(
                "power,site=lab,device=m{} power_w={},current_a={} {t}\n",
                i % 4,
                i,
                b
            ));
        }
        write(&influx, None, &lines);
    }
    let broker = BrokerSetup::new(dir.path());
    let _broker = broker.start(&dir.path().join("broker.log"));
    let cfg = config(&broker, dir.path(), &influx, "schedule = \"0 0 1 1 *\"");
    // What a killed upload leaves behind, besides: a set without manifest and a staging file.
    let stale = dir.path().join("backups/lab/20250101T000000Z-full");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("0001.lp.gz#17"), b"partial").unwrap();
    std::fs::write(stale.join("0002.lp.gz"), b"partial").unwrap();

    let spawn = || {
        Proc::spawn(
            "backup-rotator",
            Command::new(wattbus_bin())
                .args(["run", "backup-rotator", "-c"])
                .arg(&cfg),
            &dir.path().join("rotator.log"),
        )
    };
    let mut first = spawn();
    // Killed as soon as its set's directory appears: mid-run.
    let root = dir.path().join("backups/lab");
    let started = wait_until(Duration::from_secs(60), || {
        std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .any(|e| !e.file_name().to_string_lossy().starts_with("2025"))
            })
            .unwrap_or(false)
    });
    first.kill9();
    assert!(started, "no run started");
    assert!(
        !stale.exists(),
        "the unfinished set from before was removed first"
    );
    let mut second = spawn();
    let done = wait_until(Duration::from_secs(120), || {
        finished_sets(dir.path()).len() == 1
    });
    second.terminate(Duration::from_secs(20));
    assert!(
        done,
        "{}",
        std::fs::read_to_string(dir.path().join("rotator.log")).unwrap_or_default()
    );
    // Exactly one set, finished and whole; nothing else under the prefix.
    let entries: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let v = wattbus(&["backup", "verify", "-c", cfg.to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let listed =
        String::from_utf8_lossy(&wattbus(&["backup", "list", "-c", cfg.to_str().unwrap()]).stdout)
            .into_owned();
    assert!(listed.contains("200000"), "{listed}");
}

/// InfluxDB holding the hard lines and `n` power readings a second apart, up to 20 minutes
/// before `now_ms`, and its snapshot.
fn seconds_of_power(dir: &Path, now_ms: i64, n: i64) -> (Influxd, Snapshot) {
    let influx = Influxd::start(dir);
    influx.create_database(DB);
    let mut lines = hard_lines();
    for i in 0..n {
        let t = (now_ms - 1_200_000 - n * 1000 + i * 1000) * 1_000_000;
        lines.push_str(&format!(
            "power,site=lab,device=m1,channel=l1 power_w={i}.25,count={i}i {t}\n"
        ));
    }
    write(&influx, None, &lines);
    let before = snapshot(&influx);
    assert_eq!(before.len() as i64, n + 4);
    (influx, before)
}

/// The Azure Blob emulator (Azurite, the Blob service's REST API), started on a free port with
/// its data in a directory, so a restart finds what it held.
struct Azurite {
    child: std::process::Child,
    port: u16,
    data: PathBuf,
    log: PathBuf,
}

/// Azurite's well-known account and key (public: the emulator's documented default).
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const AZ_CONTAINER: &str = "wattbus-backups";

impl Azurite {
    fn start(dir: &Path) -> Self {
        let data = dir.join("azurite");
        std::fs::create_dir_all(&data).unwrap();
        Self::start_on(free_port(), data, dir.join("azurite.log"))
    }

    fn start_on(port: u16, data: PathBuf, log: PathBuf) -> Self {
        let bin = std::env::var("WBTEST_AZURITE").unwrap_or_else(|_| {
            panic!(
                "WBTEST_AZURITE is not set: run the suite with tests/run.sh, which installs Azurite"
            )
        });
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(&data)
            // object_store sends a newer x-ms-version than Azurite knows.
            .args(["--skipApiVersionCheck", "--disableTelemetry"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up,
            "Azurite did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            child,
            port,
            data,
            log,
        }
    }

    /// Started, with the account key in a file and the container made (what terraform/ does).
    fn with_container(dir: &Path) -> (Self, PathBuf) {
        let azurite = Self::start(dir);
        let key_file = dir.join("azure_key");
        std::fs::write(&key_file, format!("{AZ_KEY}\n")).unwrap();
        azurite.blob(&key_file, &["mkcontainer", AZ_CONTAINER]);
        (azurite, key_file)
    }

    /// `[backup_rotator.storage]` for this emulator with `credential` (a `…_file` key).
    fn storage(&self, credential: &str, file: &Path) -> String {
        format!(
            "kind = \"azure\"\naccount = \"{AZ_ACCOUNT}\"\ncontainer = \"{AZ_CONTAINER}\"\n\
             {credential} = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n",
            file.display(),
            self.endpoint()
        )
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZ_ACCOUNT}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The storage goes away (stopped with SIGTERM: Azurite writes its metadata to disk only
    /// every few seconds, and kill -9 would lose the container, which Azure never does).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        *self = Self::start_on(self.port, self.data.clone(), self.log.clone());
    }

    fn blob(&self, key_file: &Path, args: &[&str]) -> String {
        let o = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("azurite/blob.py"))
            .args([&self.endpoint(), AZ_ACCOUNT])
            .arg(key_file)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "blob.py {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Azure Blob storage as a user sets it up (terraform/ makes the container and a SAS for it):
/// sets made there with the account key and with a container SAS, read back by `wattbus
/// backup list`, `verify` and `restore` through the same config; an unfinished set a crash
/// left behind is removed by the next run and never listed; the storage killed before a run
/// fails it without counting a set, and the run after its return is good.
#[test]
fn azure_blob_storage_through_the_emulator_with_a_key_and_a_sas() {
    let dir = tempfile::tempdir().unwrap();
    let (mut azurite, key_file) = Azurite::with_container(dir.path());

    let now_ms = proto::now_ms();
    let (influx, before) = seconds_of_power(dir.path(), now_ms, 600);

    // A set a killed run left: a part, no manifest.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"half a part").unwrap();
    azurite.blob(
        &key_file,
        &[
            "put",
            AZ_CONTAINER,
            "lab/20260101T000000Z-full/0001.lp.gz",
            junk.to_str().unwrap(),
        ],
    );

    let broker = BrokerSetup::new(dir.path());
    // A rotator and its config file, for Azure with this credential (a `…_file` key).
    let azure = |azurite: &Azurite, credential: &str, file: &Path| {
        let storage = azurite.storage(credential, file);
        // Native mode too: InfluxDB's own files go into the same container, under native/.
        let extra = format!(
            "keep = 2\nfull_every_h = 1\n[backup_rotator.native]\ntool = \"influxd\"\nrpc = \"127.0.0.1:{}\"\n",
            influx.rpc
        );
        let cfg = config_with_storage(&broker, dir.path(), &influx, &extra, &storage);
        let src = ConfigSource::load(Some(&cfg)).expect("config");
        let plan = src
            .resolve::<backup_rotator::BackupRotator>()
            .expect("plan");
        let state = dir.path().join("state");
        (rotator(&plan, dir.path()).with_native(&plan, &state), cfg)
    };
    let rt = runtime();
    let (mut r, _) = azure(&azurite, "access_key_file", &key_file);
    let full = made(rt.block_on(r.run_once(now_ms)));
    assert_eq!((full.kind, full.points()), (SetKind::Full, 604));
    let blobs = azurite.blob(&key_file, &["list", AZ_CONTAINER]);
    assert!(
        !blobs.contains("20260101T000000Z"),
        "the unfinished set is still there:\n{blobs}"
    );
    assert!(
        blobs.contains(&format!("lab/{}/{MANIFEST}", full.id)),
        "{blobs}"
    );
    let native = full.native.clone().expect("native mode");
    assert!(native.ok(), "{native:?}");
    for f in &native.files {
        assert!(
            blobs.contains(&format!("lab/{}/{}", full.id, f.file)),
            "{} not in the container:\n{blobs}",
            f.file
        );
    }

    // The storage dies: the run fails, nothing is counted; back, the next run is good.
    azurite.stop();
    let e = rt
        .block_on(r.run_once(now_ms + 1_800_000))
        .expect_err("the storage is down");
    assert!(e.is_transient(), "{e}");
    azurite.restart();
    let inc = made(rt.block_on(r.run_once(now_ms + 1_900_000)));
    assert_eq!(inc.kind, SetKind::Incremental);

    // With a container SAS instead of the key (what terraform/ outputs), from a file.
    let sas = azurite.blob(&key_file, &["sas", AZ_CONTAINER]);
    let sas_file = dir.path().join("backup_sas");
    std::fs::write(&sas_file, sas.trim()).unwrap();
    // A SAS that is not the account's (a typo, one made for another account): refused as
    // such, not retried as if the storage were away.
    let forged = dir.path().join("forged_sas");
    std::fs::write(&forged, sas.trim().replace("sig=", "sig=AAAA")).unwrap();
    let (mut bad, _) = azure(&azurite, "sas_file", &forged);
    let e = rt
        .block_on(bad.run_once(now_ms + 3_600_000))
        .expect_err("a forged SAS");
    assert!(
        !e.is_transient(),
        "a refused credential is not transient: {e}"
    );
    assert!(!format!("{e}").contains("sig="), "the SAS in an error: {e}");

    let (mut r, cfg) = azure(&azurite, "sas_file", &sas_file);
    let cfg_s = cfg.to_str().unwrap();
    let full2 = made(rt.block_on(r.run_once(now_ms + 3_700_000)));
    assert_eq!(full2.kind, SetKind::Full);

    let listed = wattbus(&["backup", "list", "-c", cfg_s]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    for id in [&full.id, &inc.id, &full2.id] {
        assert!(text.contains(id.as_str()), "{id} not listed:\n{text}");
    }
    assert!(text.contains("Azure container"), "{text}");
    let verified = wattbus(&["backup", "verify", "-c", cfg_s]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );

    // InfluxDB's own files fetched back from Azure, checked.
    let fetched = dir.path().join("fetched");
    succeeded(&fetch(cfg_s, &fetched, None));
    assert_eq!(
        std::fs::read_dir(&fetched).unwrap().count(),
        full2.native.as_ref().map_or(0, |n| n.files.len())
    );

    // Restored from Azure into a new database: every point, with its type.
    let restored = wattbus(&["backup", "restore", "-c", cfg_s, "--database", "from_azure"]);
    assert!(
        restored.status.success(),
        "{}{}",
        String::from_utf8_lossy(&restored.stdout),
        String::from_utf8_lossy(&restored.stderr)
    );
    let after = snapshot_of(&influx, "from_azure");
    assert_eq!(after, before);
    // The SAS and the key never reach the output.
    for o in [&listed, &verified, &restored] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !all.contains("sig=") && !all.contains(&AZ_KEY[..20]),
            "{all}"
        );
    }
}

const FULL_DISK_TEST: &str =
    "a_full_disk_fails_the_run_counts_nothing_and_the_run_after_space_returns_is_good";
/// Set in the re-run inside a namespace (not `WATTBUS_…`: children would read it as config).
const IN_NAMESPACE: &str = "BACKUP_FULL_DISK_TEST_IN_NAMESPACE";

/// The backup disk fills up mid-upload (a USB stick, the SD card): the run fails with the
/// reason, no set is counted, what it had written is removed (so the disk is not left full),
/// and once there is room again the next run makes a good set of every point.
#[test]
fn a_full_disk_fails_the_run_counts_nothing_and_the_run_after_space_returns_is_good() {
    if rerun_in_mount_namespace(FULL_DISK_TEST, IN_NAMESPACE) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx.create_database(DB);
    // Two days of a meter every 10 s with noise: a set of a few hundred kilobytes.
    let now_ms = proto::now_ms();
    let mut lines = String::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..17_280i64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = (now_ms - 172_800_000 + i * 10_000) * 1_000_000;
        lines.push_str(&format!(
            "power,site=lab,device=m1,channel=l1 power_w={}.{},voltage_v=23{}.{} {t}\n",
            x % 5000,
            x % 997,
            x % 10,
            x % 89
        ));
    }
    write(&influx, None, &lines);
    let disk = dir.path().join("backups");
    let tmpfs = Tmpfs::mount(&disk, "64k");
    let broker = BrokerSetup::new(dir.path());
    let (plan, _) = plan(&broker, dir.path(), &influx, "");
    let rt = runtime();
    let mut r = rotator(&plan, dir.path());

    let e = rt
        .block_on(r.run_once(now_ms))
        .expect_err("the disk is full");
    let text = format!("{e}");
    assert!(
        text.contains("No space left on device"),
        "the reason: {text}"
    );
    assert!(finished_sets(dir.path()).is_empty(), "a set counted");
    let left: u64 = walk(&disk)
        .iter()
        .map(|p| p.metadata().map_or(0, |m| m.len()))
        .sum();
    assert_eq!(
        left,
        0,
        "the failed run left files behind: {:?}",
        walk(&disk)
    );

    tmpfs.resize("16m");
    let set = made(rt.block_on(r.run_once(now_ms + 60_000)));
    assert_eq!((set.kind, set.points()), (SetKind::Full, 17_280));
    assert_eq!(finished_sets(dir.path()).len(), 1);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// What a break-it review did to the sets and the database, each a way a restore could have
/// come back wrong while every command said all was well:
/// - a retention policy made after the full set (restore must create it);
/// - an incremental set's manifest damaged: `verify` fails, a restore through it is refused
///   (it would leave an hour out), the full set alone still restores;
/// - another rotator's set in progress on the same prefix is left alone, an abandoned one of
///   a day ago is removed;
/// - the clock jumped years ahead for one run: later runs make sets from the present;
/// - the database lost its data: the near-empty full sets that follow never rotate the real
///   ones away.
#[test]
fn damaged_chains_foreign_sets_clock_jumps_and_a_wiped_database_never_cost_a_good_backup() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx.create_database(DB);
    let now_ms = proto::now_ms();
    let minute_lines = |from_ms: i64, n: i64| {
        (0..n)
            .map(|i| {
                let t = (from_ms + i * 60_000) * 1_000_000;
                format!("power,site=lab,device=m1 power_w={i}.5 {t}\n")
            })
            .collect::<String>()
    };
    write(&influx, None, &minute_lines(now_ms - 7_200_000, 60));
    let broker = BrokerSetup::new(dir.path());
    let (plan, cfg) = plan(
        &broker,
        dir.path(),
        &influx,
        "keep = 1\nfull_every_h = 2\nlookback_s = 60",
    );
    let cfg_s = cfg.to_str().unwrap();
    let rt = runtime();
    let mut r = rotator(&plan, dir.path());
    let full = made(rt.block_on(r.run_once(now_ms - 3_600_000)));
    assert_eq!(full.points(), 60);

    // A policy made after the full set, written to, then two incremental sets.
    influx.query(
        DB,
        &format!("CREATE RETENTION POLICY \"extra\" ON \"{DB}\" DURATION 30d REPLICATION 1"),
    );
    write(
        &influx,
        Some("extra"),
        &minute_lines(now_ms - 3_000_000, 10),
    );
    let inc1 = made(rt.block_on(r.run_once(now_ms - 1_800_000)));
    write(&influx, None, &minute_lines(now_ms - 1_700_000, 10));
    let inc2 = made(rt.block_on(r.run_once(now_ms)));
    assert_eq!(inc2.base.as_deref(), Some(full.id.as_str()));
    let restored = wattbus(&["backup", "restore", "-c", cfg_s, "--database", "whole"]);
    assert!(
        restored.status.success(),
        "{}{}",
        String::from_utf8_lossy(&restored.stdout),
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_eq!(snapshot_of(&influx, "whole"), snapshot(&influx));

    // The first incremental's manifest is damaged.
    let sets = dir.path().join("backups").join("lab");
    let m1 = sets.join(&inc1.id).join(MANIFEST);
    let original = std::fs::read(&m1).unwrap();
    std::fs::write(&m1, &original[..100]).unwrap();
    let v = wattbus(&["backup", "verify", "-c", cfg_s]);
    assert!(!v.status.success(), "verify passed a damaged manifest");
    assert!(String::from_utf8_lossy(&v.stderr).contains(&inc1.id));
    let refused = wattbus(&["backup", "restore", "-c", cfg_s, "--database", "gap"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a restore with a missing hour");
    assert!(err.contains(&inc2.id) && err.contains("missing"), "{err}");
    assert!(
        !column(&query_ns(&influx, "SHOW DATABASES"), "name").contains(&"gap".to_string()),
        "nothing is created by a refused restore"
    );
    let only_full = wattbus(&[
        "backup",
        "restore",
        "-c",
        cfg_s,
        "--database",
        "full_only",
        "--set",
        &full.id,
    ]);
    assert!(only_full.status.success());
    std::fs::write(&m1, &original).unwrap();

    // Another rotator's set in progress (now), and an abandoned one of two days ago.
    let foreign = sets.join(backup_rotator::manifest::set_id(
        now_ms * 1_000_000,
        SetKind::Full,
    ));
    let abandoned = sets.join(backup_rotator::manifest::set_id(
        (now_ms - 172_800_000) * 1_000_000,
        SetKind::Full,
    ));
    for d in [&foreign, &abandoned] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("0001.lp.gz"), b"in progress").unwrap();
    }
    write(&influx, None, &minute_lines(now_ms - 600_000, 5));
    let _ = made(rt.block_on(r.run_once(now_ms + 1_800_000)));
    assert!(
        foreign.join("0001.lp.gz").is_file(),
        "another rotator's part deleted"
    );
    assert!(!abandoned.exists(), "an abandoned set of two days ago kept");
    std::fs::remove_dir_all(&foreign).unwrap();

    // The database is wiped (a reinstall): the next full sets are near-empty. With keep = 1
    // the full set of 75 points would expire; it is kept.
    influx.query(DB, &format!("DROP DATABASE \"{DB}\""));
    influx.create_database(DB);
    write(&influx, None, &minute_lines(now_ms, 1));
    let mut r = rotator(&plan, dir.path());
    let small = made(rt.block_on(r.run_once(now_ms + 9_000_000)));
    assert_eq!((small.kind, small.points()), (SetKind::Full, 1));
    let ids: Vec<String> = finished_sets(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        ids.contains(&full.id),
        "the real backup was rotated away: {ids:?}"
    );
    assert!(ids.contains(&inc2.id), "its incremental sets too: {ids:?}");
    // One run with the clock ten years ahead, then the present again: sets go on.
    let ahead = made(rt.block_on(r.run_once(now_ms + 315_360_000_000)));
    assert!(
        finished_sets(dir.path())
            .iter()
            .any(|p| p.ends_with(&full.id)),
        "the real backup was rotated away by the jump"
    );
    assert_eq!(ahead.kind, SetKind::Full);
    let back = rt.block_on(r.run_once(now_ms + 9_600_000)).unwrap();
    assert!(
        matches!(back, RunOutcome::Made(_)),
        "no set from the present after a clock jump: {back:?}"
    );
}

/// On Azure as on a directory: the storage stopped in the middle of a run (parts uploaded, no
/// manifest) fails the run without counting a set, and the next run after its return removes
/// what the failed one left; rotation beyond `keep`; a blob changed behind the rotator's back
/// found by `verify`.
#[test]
fn azure_storage_gone_mid_run_rotation_and_a_changed_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (mut azurite, key_file) = Azurite::with_container(dir.path());
    let influx = Influxd::start(dir.path());
    influx.create_database(DB);
    // Many measurements: many parts, so a run lasts long enough to be cut in the middle.
    let now_ms = proto::now_ms();
    let t = (now_ms - 600_000) * 1_000_000;
    let lines: String = (0..300)
        .map(|i| format!("m{i:03},site=lab,device=d{i} v={i}.5,n={i}i {t}\n"))
        .collect();
    write(&influx, None, &lines);

    let broker = BrokerSetup::new(dir.path());
    let storage = azurite.storage("access_key_file", &key_file);
    let cfg = config_with_storage(
        &broker,
        dir.path(),
        &influx,
        "keep = 2\nfull_every_h = 1",
        &storage,
    );
    let cfg_s = cfg.to_str().unwrap();
    let src = ConfigSource::load(Some(&cfg)).expect("config");
    let plan = src
        .resolve::<backup_rotator::BackupRotator>()
        .expect("plan");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut r = rotator(&plan, dir.path()).with_state_file(dir.path().join("in_progress"));
    let blobs = |azurite: &Azurite| azurite.blob(&key_file, &["list", AZ_CONTAINER]);

    // The storage stops once the first part is up.
    let run = rt.spawn(async move {
        let result = r.run_once(now_ms).await;
        (r, result)
    });
    assert!(
        wait_until(Duration::from_secs(60), || blobs(&azurite)
            .contains(".lp.gz")),
        "no part was uploaded"
    );
    azurite.stop();
    let (mut r, result) = rt.block_on(run).unwrap();
    let e = match result {
        Err(e) => e,
        Ok(o) => panic!("the run finished before the storage could be stopped: {o:?}"),
    };
    assert!(e.is_transient(), "{e}");
    azurite.restart();
    let left = blobs(&azurite);
    assert!(
        left.contains(".lp.gz") && !left.contains(MANIFEST),
        "the cut run should have left parts and no manifest:\n{left}"
    );
    let full1 = made(rt.block_on(r.run_once(now_ms + 60_000)));
    assert_eq!(full1.points(), 300);
    let names = blobs(&azurite);
    assert!(
        names
            .lines()
            .all(|n| n.starts_with(&format!("lab/{}/", full1.id))),
        "the failed run's parts are still there:\n{names}"
    );

    // Rotation beyond keep = 2.
    let full2 = made(rt.block_on(r.run_once(now_ms + 3_700_000)));
    let full3 = made(rt.block_on(r.run_once(now_ms + 7_400_000)));
    let names = blobs(&azurite);
    assert!(!names.contains(&full1.id), "{names}");
    assert!(
        names.contains(&full2.id) && names.contains(&full3.id),
        "{names}"
    );

    // A part of the newest set changed behind the rotator's back.
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, b"not what was uploaded").unwrap();
    let part = format!("lab/{}/0001.lp.gz", full3.id);
    azurite.blob(
        &key_file,
        &["put", AZ_CONTAINER, &part, bogus.to_str().unwrap()],
    );
    let v = wattbus(&["backup", "verify", "-c", cfg_s]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "verify passed a changed blob:\n{out}");
    assert!(
        out.contains(&format!("{}: DAMAGED: 0001.lp.gz", full3.id)),
        "{out}"
    );
    assert!(out.contains(&format!("{}: OK", full2.id)), "{out}");
}

/// Native mode: InfluxDB's own backup (`influxd backup -portable`) stored in every full set,
/// checked by `verify`, fetched by `wattbus backup fetch` and restored by `influxd restore
/// -portable` into a database equal to the original; a failing tool costs the set nothing.
#[test]
fn native_mode_stores_influxds_own_backup_and_influxd_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx_setup(&influx, DB);
    let now_ms = proto::now_ms();
    let mut lines = String::new();
    for i in 0..300i64 {
        let t = (now_ms - 5 * 3_600_000 + i * 60_000) * 1_000_000;
        lines.push_str(&format!(
            "power,site=lab,device=m{} power_w={}.25,energy_wh={}i {t}\n",
            i % 3,
            i,
            i * 7
        ));
    }
    write(&influx, None, &lines);
    let hard = hard_lines();
    write(&influx, None, &hard);
    write(&influx, Some("minutes"), &hard);
    let before = snapshot(&influx);
    assert!(before.len() > 300, "{}", before.len());

    // A bad setting is refused, naming the key.
    let broker = BrokerSetup::new(dir.path());
    for (extra, key) in [
        (
            "[backup_rotator.native]\ntool = \"influxd\"\ncommand = \"/nonexistent/influxd\"\n",
            "backup_rotator.native.command",
        ),
        (
            "[backup_rotator.native]\ntool = \"influxd\"\nbucket = \"b\"\n",
            "backup_rotator.native.bucket",
        ),
        (
            "[backup_rotator.native]\ntool = \"influx\"\ncommand = \"/bin/true\"\n",
            "backup_rotator.native.tool",
        ),
        (
            "[backup_rotator.native]\ntool = \"influxd\"\nrpc = \"localhost\"\n",
            "backup_rotator.native.rpc",
        ),
    ] {
        let cfg = config(&broker, dir.path(), &influx, extra);
        let src = ConfigSource::load(Some(&cfg)).expect("config");
        let e = src
            .resolve::<backup_rotator::BackupRotator>()
            .expect_err(extra)
            .to_string();
        assert!(e.contains(key), "{extra}: {e}");
        let o = wattbus(&["config", "check", cfg.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(64), "{extra}");
    }
    // A machine restoring after the Pi died may not have InfluxDB's tools: `wattbus backup`
    // does not run them, so it does not ask for them.
    let cfg = config(
        &broker,
        dir.path(),
        &influx,
        "[backup_rotator.native]\ntool = \"influxd\"\ncommand = \"/nonexistent/influxd\"\n",
    );
    succeeded(&wattbus(&["backup", "list", "-c", cfg.to_str().unwrap()]));

    // The scratch directory is a directory of the rotator's own inside the one configured:
    // nothing else there is ever touched.
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("photos.jpg"), "not a backup").unwrap();
    let native = format!(
        "full_every_h = 1\n[backup_rotator.native]\ntool = \"influxd\"\nrpc = \"127.0.0.1:{}\"\ndir = \"{}\"\n",
        influx.rpc,
        shared.display()
    );
    let (p, cfg) = plan(&broker, dir.path(), &influx, &native);
    let cfg_s = cfg.to_str().unwrap();
    let state = dir.path().join("state");
    let scratch = shared.join("wattbus-native-backup-rotator");
    // What a run killed mid-way left in the scratch directory is not stored.
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("19990101T000000Z.meta"), "stale").unwrap();
    let rt = runtime();
    let mut r = rotator(&p, dir.path()).with_native(&p, &state);
    let full = made(rt.block_on(r.run_once(now_ms)));
    let n = full.native.clone().expect("a native backup");
    assert!(n.ok(), "{n:?}");
    assert_eq!(n.tool, "influxd");
    assert!(n.files.iter().any(|f| f.file.ends_with(".meta")), "{n:?}");
    assert!(n.files.iter().any(|f| f.file.ends_with(".tar.gz")), "{n:?}");
    assert!(
        !n.files.iter().any(|f| f.file.contains("19990101")),
        "the stale file was not stored: {n:?}"
    );
    assert!(!scratch.exists(), "the scratch directory is emptied");
    assert_eq!(
        std::fs::read_to_string(shared.join("photos.jpg")).unwrap(),
        "not a backup"
    );
    assert_eq!(
        full.points(),
        before.len() as u64,
        "the line protocol as before"
    );
    // Incremental sets have none (whole shards every hour would be the same bytes again).
    let inc = made(rt.block_on(r.run_once(now_ms + 1_800_000)));
    assert!(inc.native.is_none());

    let out = succeeded(&wattbus(&["backup", "list", "-c", cfg_s]));
    assert!(out.contains("native: influxd backup"), "{out}");
    succeeded(&wattbus(&["backup", "verify", "-c", cfg_s]));

    // Fetched, and restored by InfluxDB's own tool into a new database: every point.
    let fetched = dir.path().join("fetched");
    let out = succeeded(&fetch(cfg_s, &fetched, None));
    assert!(out.contains("influxd restore -portable"), "{out}");
    assert_eq!(std::fs::read_dir(&fetched).unwrap().count(), n.files.len());
    let restore = Command::new("influxd")
        .args([
            "restore",
            "-portable",
            "-db",
            DB,
            "-newdb",
            "native_restored",
        ])
        .args(["-host", &format!("127.0.0.1:{}", influx.rpc)])
        .arg(&fetched)
        .output()
        .expect("influxd restore runs");
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    // Right after a restore the shards may say "disabled" for a moment (influxdb #19510).
    let restored = std::cell::RefCell::new(Snapshot::new());
    let same = wait_until(Duration::from_secs(60), || {
        let got = std::panic::catch_unwind(|| snapshot_of(&influx, "native_restored"));
        got.is_ok_and(|s| {
            let same = s == before;
            *restored.borrow_mut() = s;
            same
        })
    });
    assert!(
        same,
        "influxd restored {} points, the database had {}",
        restored.borrow().len(),
        before.len()
    );
    // Fetching again into the same directory overwrites nothing.
    let again = fetch(cfg_s, &fetched, None);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty directory"));
    // A link planted where fetch writes its temporary file is not followed.
    let planted = dir.path().join("planted");
    std::fs::create_dir_all(&planted).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "mine").unwrap();
    let first = n.files[0].file.strip_prefix("native/").unwrap();
    std::os::unix::fs::symlink(&victim, planted.join(format!(".{first}.partial"))).unwrap();
    let f = fetch(cfg_s, &planted, None);
    assert!(!f.status.success());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine");

    // A damaged native file: verify names it and fails; fetch refuses it and leaves no file;
    // the line protocol still restores.
    let set_dir = finished_sets(dir.path())
        .into_iter()
        .find(|p| p.ends_with(&full.id))
        .unwrap();
    let victim = set_dir.join(&n.files[n.files.len() - 1].file);
    let mut data = std::fs::read(&victim).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(&victim, &data).unwrap();
    let verify = wattbus(&["backup", "verify", "-c", cfg_s]);
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(!verify.status.success());
    assert!(
        out.contains("DAMAGED") && out.contains(&n.files[n.files.len() - 1].file),
        "{out}"
    );
    let fetched2 = dir.path().join("fetched2");
    let f = fetch(cfg_s, &fetched2, None);
    assert!(!f.status.success());
    assert!(
        String::from_utf8_lossy(&f.stderr).contains("SHA-256"),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    let whole: Vec<PathBuf> = std::fs::read_dir(&fetched2)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.ends_with(victim.file_name().unwrap()) || p.to_string_lossy().ends_with(".partial")
        })
        .collect();
    assert!(whole.is_empty(), "{whole:?}");
    let dry = wattbus(&["backup", "restore", "-c", cfg_s, "--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );

    // The tool failing (InfluxDB's RPC port closed): the full set is still made and good,
    // the failure is in its manifest and in `list`.
    let closed = format!(
        "full_every_h = 1\nkeep = 1\n[backup_rotator.native]\ntool = \"influxd\"\nrpc = \"127.0.0.1:{}\"\ntimeout_s = 60\n",
        free_port()
    );
    let (plan2, _) = plan(&broker, dir.path(), &influx, &closed);
    let mut r2 = rotator(&plan2, dir.path()).with_native(&plan2, &state);
    let full2 = made(rt.block_on(r2.run_once(now_ms + 7_200_000)));
    assert_eq!(full2.kind, SetKind::Full);
    assert_eq!(full2.points(), before.len() as u64);
    let n2 = full2.native.clone().expect("the failure is recorded");
    assert!(!n2.ok() && n2.files.is_empty());
    assert!(
        n2.error.as_deref().unwrap_or("").contains("RPC port"),
        "{n2:?}"
    );
    let list = wattbus(&["backup", "list", "-c", cfg_s]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("FAILED"));
    // keep = 1, but the newest good native backup is not rotated away behind a set whose
    // tool failed; the incremental set before the new full one is.
    let kept: Vec<String> = finished_sets(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        kept.contains(&full.id) && kept.contains(&full2.id),
        "{kept:?}"
    );
    assert!(!kept.contains(&inc.id), "{kept:?}");
    let f = fetch(cfg_s, &dir.path().join("fetched3"), Some(&full2.id));
    assert!(!f.status.success());
    assert!(String::from_utf8_lossy(&f.stderr).contains("has no native backup"));
}

/// An S3-compatible server (s3s-fs: the s3s project's S3 API over a directory, checking
/// SigV4 signatures), started on a free port with its data in a directory.
struct S3Server {
    child: std::process::Child,
    port: u16,
    root: PathBuf,
    log: PathBuf,
}

const S3_KEY_ID: &str = "wattbus-test-key";
const S3_SECRET: &str = "wattbus-test-secret-0123456789";
const S3_BUCKET: &str = "wattbus-backups";

impl S3Server {
    fn start(dir: &Path) -> Self {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(S3_BUCKET)).unwrap();
        let (port, log) = (free_port(), dir.join("s3s.log"));
        Self {
            child: Self::spawn(port, &root, &log),
            port,
            root,
            log,
        }
    }

    fn spawn(port: u16, root: &Path, log: &Path) -> std::process::Child {
        let bin = std::env::var("WBTEST_S3S").unwrap_or_else(|_| {
            panic!("WBTEST_S3S is not set: run the suite with tests/run.sh, which installs s3s-fs")
        });
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY_ID, "--secret-key", S3_SECRET])
            .arg(root)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "s3s-fs did not start: see {}", log.display());
        child
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.root, &self.log);
    }

    fn storage(&self, secret_file: &Path) -> String {
        format!(
            "kind = \"s3\"\nbucket = \"{S3_BUCKET}\"\nregion = \"us-east-1\"\n\
             endpoint = \"http://127.0.0.1:{}\"\nallow_http = true\n\
             access_key_id = \"{S3_KEY_ID}\"\nsecret_access_key_file = \"{}\"\n",
            self.port,
            secret_file.display()
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// S3-compatible storage (what MinIO, Garage or AWS users set): sets made, listed, verified
/// and restored point for point; the server down mid-way is retried, a wrong secret is
/// refused as such.
#[test]
fn s3_compatible_storage_round_trip_outage_and_a_wrong_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(dir.path());
    let now_ms = proto::now_ms();
    let (influx, before) = seconds_of_power(dir.path(), now_ms, 500);

    let secret = dir.path().join("s3_secret");
    std::fs::write(&secret, S3_SECRET).unwrap();
    let wrong = dir.path().join("s3_wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let broker = BrokerSetup::new(dir.path());
    let s3_rotator = |secret: &Path| {
        let cfg = config_with_storage(
            &broker,
            dir.path(),
            &influx,
            "full_every_h = 1",
            &s3.storage(secret),
        );
        let src = ConfigSource::load(Some(&cfg)).expect("config");
        let plan = src
            .resolve::<backup_rotator::BackupRotator>()
            .expect("plan");
        (rotator(&plan, dir.path()), cfg)
    };
    let rt = runtime();

    let (mut bad, _) = s3_rotator(&wrong);
    let e = rt
        .block_on(bad.run_once(now_ms))
        .expect_err("a wrong secret");
    assert!(!e.is_transient(), "a refused secret is not transient: {e}");
    assert!(!format!("{e:?}").contains(S3_SECRET));

    let (mut r, cfg) = s3_rotator(&secret);
    let full = made(rt.block_on(r.run_once(now_ms)));
    assert_eq!((full.kind, full.points()), (SetKind::Full, 504));
    // The objects as S3 clients see them: the set's parts and its manifest in the bucket.
    let set_dir = s3.root.join(S3_BUCKET).join("lab").join(&full.id);
    assert!(set_dir.join(MANIFEST).is_file(), "{}", set_dir.display());

    s3.stop();
    let e = rt
        .block_on(r.run_once(now_ms + 1_800_000))
        .expect_err("the server is down");
    assert!(e.is_transient(), "{e}");
    s3.restart();
    let inc = made(rt.block_on(r.run_once(now_ms + 1_900_000)));
    assert_eq!(inc.kind, SetKind::Incremental);

    let cfg_s = cfg.to_str().unwrap();
    let listed = succeeded(&wattbus(&["backup", "list", "-c", cfg_s]));
    for id in [&full.id, &inc.id] {
        assert!(listed.contains(id.as_str()), "{id} not listed:\n{listed}");
    }
    succeeded(&wattbus(&["backup", "verify", "-c", cfg_s]));
    succeeded(&wattbus(&[
        "backup",
        "restore",
        "-c",
        cfg_s,
        "--database",
        "from_s3",
    ]));
    assert_eq!(snapshot_of(&influx, "from_s3"), before);
}
