//! influx-writer end to end against real servers: InfluxDB 1.6.7 (v1 API, InfluxQL read-back,
//! a refused line, an outage with the writer killed -9, a reading naming another device than
//! its topic, an implausible value) and VictoriaMetrics 1.79 (v2 API with token and gzip, read
//! back through its export API); the file output with rotation and a restart, and the demo's
//! tagged readings (WE-515 tariffs, CT power basis), read by Python's csv module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::servers::{Influxd, Victoria, http};
use wattbus_e2e::{BrokerSetup, Proc, free_port, run_ok, wait_until, wattbus_bin};

const BASE_TS_MS: i64 = 1_764_000_000_000;

struct Lab {
    dir: tempfile::TempDir,
    broker: BrokerSetup,
    _broker: Proc,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let broker = BrokerSetup::new(dir.path());
        let proc = broker.start(&dir.path().join("broker.log"));
        Lab {
            dir,
            broker,
            _broker: proc,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A writer config: `[influx_writer]` keys plus `extra` (more keys and sections).
    fn writer_config(&self, extra: &str) -> PathBuf {
        let path = self.broker.service_config(
            self.path(),
            [
                "level = \"info,rumqttd=warn\"",
                "reconnect_max_ms = 1000",
                "",
            ],
        );
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "[influx_writer]\nhealth_listen = \"127.0.0.1:{}\"\n{extra}\n",
            free_port()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start_writer(&self, config: &Path) -> Proc {
        Proc::spawn(
            "influx-writer",
            Command::new(wattbus_bin())
                .args(["run", "influx-writer", "--config"])
                .arg(config),
            &self.path().join("writer.log"),
        )
    }

    /// Publish `count` readings (`reading_n` = i at `BASE_TS_MS + i`) as site `lab`, waiting
    /// for influx-writer's acknowledgement of each. `rate` 0 = as fast as possible.
    fn produce(&self, count: u64, rate: u64, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(probe_bin());
        cmd.args(["--port", &self.broker.port.to_string()])
            .args(["--password", &self.broker.password])
            .args(["--site", "lab"])
            .arg("--data-dir")
            .arg(self.path().join("probe"))
            .args(["produce", "--count", &count.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--wait-for", "influx-writer"])
            .args(["--ack-timeout-ms", "2000"])
            .args(["--timeout-s", "120"])
            .args(extra);
        Proc::spawn("probe", &mut cmd, &self.path().join("probe.log"))
    }

    /// A writer config for InfluxDB 1.x's v1 API, database `db`, batches flushed every
    /// `flush_ms`.
    fn v1_config(&self, influx: &Influxd, db: &str, flush_ms: u64) -> PathBuf {
        self.writer_config(&format!(
            "flush_interval_ms = {flush_ms}\n[influx_writer.influx]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"{db}\"\n",
            influx.port
        ))
    }

    /// InfluxDB with database `wattbus`, a writer on its v1 API, and `count` readings
    /// produced (`extra`: more probe flags) until every one is acknowledged. The servers are
    /// returned so they live as long as the test needs them.
    fn v1_run(&self, count: u64, extra: &[&str], what: &str) -> (Influxd, Proc) {
        let influx = Influxd::start(self.path());
        influx.create_database("wattbus");
        let config = self.v1_config(&influx, "wattbus", 200);
        let writer = self.start_writer(&config);
        let mut p = self.produce(count, 0, extra);
        finish(&mut p, self, what);
        (influx, writer)
    }

    /// One of the writer's dead-letter files (`dead-letters.jsonl` for points InfluxDB
    /// refused, `dead-letters.malformed.jsonl` for messages that are not storable readings),
    /// one JSON value per letter.
    fn dead_letters(&self, file: &str) -> Vec<serde_json::Value> {
        let dead = std::fs::read_to_string(self.path().join("influx-writer").join(file))
            .expect("dead-letter file");
        dead.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }
}

fn probe_bin() -> PathBuf {
    wattbus_bin().with_file_name("probe")
}

fn finish(p: &mut Proc, lab: &Lab, what: &str) {
    let status = p.wait(Duration::from_secs(150));
    assert!(
        status.is_some_and(|s| s.success()),
        "{what}: the producer did not get every reading acknowledged ({status:?}).\n\
         probe log:\n{}\nwriter log:\n{}",
        lab.log("probe.log"),
        lab.log("writer.log")
    );
}

/// Check that measurement `probe` holds readings 0..count exactly once, every column right.
fn assert_all_stored(influx: &Influxd, db: &str, count: i64) {
    let rows = influx.rows(db, "probe");
    assert_eq!(rows.len() as i64, count, "rows stored");
    let mut seen = vec![false; count as usize];
    for r in &rows {
        let n = r["reading_n"].as_f64().expect("reading_n is a float") as i64;
        assert!((0..count).contains(&n), "{r:?}");
        assert!(!seen[n as usize], "reading {n} twice");
        seen[n as usize] = true;
        assert_eq!(r["time"].as_i64(), Some(BASE_TS_MS + n), "{r:?}");
        assert_eq!(r["site"], "lab");
        assert_eq!(r["device"], "probe-dev");
        assert_eq!(r["channel"], "ch");
        assert_eq!(r["quality"], "good");
    }
}

#[test]
fn v1_api_stores_every_reading_in_influxdb_1_6() {
    let lab = Lab::new();
    let (influx, _writer) = lab.v1_run(2000, &[], "v1 end to end");
    assert_all_stored(&influx, "wattbus", 2000);
    // Nothing was spooled or refused on the way.
    assert!(
        !lab.log("writer.log").contains("spooling"),
        "{}",
        lab.log("writer.log")
    );
    assert!(!lab.path().join("influx-writer/dead-letters.jsonl").exists());
}

/// InfluxDB with database `wattbus` in which `odd.reading_n` exists as an integer (in the
/// same shard: types are per shard, and a shard spans a week): the writer's float for it, the
/// probe's `--odd-at` reading, is a field type conflict, answered 400.
fn influx_refusing_odd(lab: &Lab) -> Influxd {
    let influx = Influxd::start(lab.path());
    influx.create_database("wattbus");
    let (status, body) = http(
        "POST",
        influx.port,
        "/write?db=wattbus&precision=ms",
        format!(
            "odd,channel=ch,device=probe-dev,quality=good,site=lab reading_n=1i {}\n",
            BASE_TS_MS - 1
        )
        .as_bytes(),
    );
    assert_eq!(status, 204, "{body}");
    influx
}

/// A refused point is acknowledged because the dead-letter file keeps it. When the file
/// cannot take it (a full disk; here `/dev/full`), the batch must not be acknowledged: the
/// producer keeps it, and a writer that can keep dead letters gets it again (hostile review:
/// 136 refused points were acknowledged with nothing written anywhere).
#[test]
fn a_refused_point_whose_dead_letter_cannot_be_written_is_not_acknowledged() {
    let lab = Lab::new();
    let influx = influx_refusing_odd(&lab);
    let influx_section = format!(
        "flush_interval_ms = 1000\n[influx_writer.influx]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"wattbus\"\n",
        influx.port
    );
    let full = lab.writer_config(&format!(
        "dead_letter_file = \"/dev/full\"\n{influx_section}"
    ));
    let mut writer = lab.start_writer(&full);
    let mut p = lab.produce(300, 0, &["--odd-at", "150"]);
    assert!(
        wait_until(Duration::from_secs(60), || lab
            .log("writer.log")
            .contains("Cannot write the dead-letter file")),
        "{}",
        lab.log("writer.log")
    );
    // Acknowledged, the producer would be done within a second or two.
    assert!(
        p.wait(Duration::from_secs(5)).is_none(),
        "the batch was acknowledged although its refused point is nowhere:\n{}",
        lab.log("probe.log")
    );
    writer.terminate(Duration::from_secs(10));
    // A writer whose dead-letter file works: the producer replays, and all is accounted for.
    let _writer = lab.start_writer(&lab.v1_config(&influx, "wattbus", 1000));
    finish(&mut p, &lab, "replayed after the dead-letter file failed");
    // What the first writer spooled (InfluxDB slow under load) is acknowledged already and
    // drains from the spool now: wait for it.
    assert!(
        wait_until(Duration::from_secs(60), || influx
            .rows("wattbus", "probe")
            .len()
            == 299),
        "stored: {}\n{}",
        influx.rows("wattbus", "probe").len(),
        lab.log("writer.log")
    );
    let dead = lab.path().join("influx-writer/dead-letters.jsonl");
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&dead)
            .is_ok_and(|t| t.contains("\"odd,"))),
        "{}",
        lab.log("writer.log")
    );
}

#[test]
fn a_line_influxdb_refuses_is_dead_lettered_and_the_rest_stored() {
    let lab = Lab::new();
    let influx = influx_refusing_odd(&lab);
    // One batch: the 300 readings arrive well within the 1 s flush interval.
    let config = lab.v1_config(&influx, "wattbus", 1000);
    let _writer = lab.start_writer(&config);
    let mut p = lab.produce(300, 0, &["--odd-at", "150"]);
    finish(&mut p, &lab, "refused line");

    let rows = influx.rows("wattbus", "probe");
    assert_eq!(rows.len(), 299, "every other reading is stored");
    assert!(rows.iter().all(|r| r["reading_n"].as_f64() != Some(150.0)));
    let odd = influx.rows("wattbus", "odd");
    assert_eq!(odd.len(), 1, "only the pre-existing point: {odd:?}");

    let lines = lab.dead_letters("dead-letters.jsonl");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        !lab.path()
            .join("influx-writer/dead-letters.malformed.jsonl")
            .exists()
    );
    let dl = &lines[0];
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("field type conflict"),
        "the server's message is kept: {dl}"
    );
    assert!(dl["payload"].as_str().unwrap().starts_with("odd,"), "{dl}");
    assert_eq!(dl["topic"], "wattbus/v1/lab/meas/probe-dev/ch");
    assert!(lab.log("writer.log").contains("dead-lettered"));
}

#[test]
fn a_reading_whose_payload_names_another_device_is_dead_lettered_not_stored_and_acknowledged() {
    let lab = Lab::new();
    // Reading 150 is journaled and published on probe-dev's topic, but its payload says
    // device probe-forged. The producer ends only once every reading is acknowledged, the
    // mislabelled one too: a poison message does not pin its producer's journal.
    let (influx, _writer) = lab.v1_run(300, &["--mislabel-at", "150"], "mislabelled reading");

    let rows = influx.rows("wattbus", "probe");
    assert_eq!(rows.len(), 299, "every other reading is stored");
    assert!(
        rows.iter()
            .all(|r| r["device"] == "probe-dev" && r["reading_n"].as_f64() != Some(150.0)),
        "nothing is stored under the payload's identity"
    );

    // Kept apart from the points InfluxDB refused: any publisher can send such messages, and
    // a flood of them must not rotate those (whose only copy the file is) away.
    let letters = lab.dead_letters("dead-letters.malformed.jsonl");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(!lab.path().join("influx-writer/dead-letters.jsonl").exists());
    let dl = &letters[0];
    assert_eq!(dl["topic"], "wattbus/v1/lab/meas/probe-dev/ch");
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("device \"probe-forged\" (topic: \"probe-dev\")"),
        "the reason names what differs: {dl}"
    );
    assert!(
        dl["payload"]
            .as_str()
            .unwrap()
            .contains("\"reading_n\":150.0"),
        "the message is kept whole for a person: {dl}"
    );
    let log = lab.log("writer.log");
    assert!(
        log.contains("names another identity than its topic"),
        "{log}"
    );
    // Dead letters are readings: the owner's alone.
    assert_eq!(
        mode(
            &lab.path()
                .join("influx-writer/dead-letters.malformed.jsonl")
        ),
        0o600
    );
    assert_eq!(mode(&lab.path().join("influx-writer")), 0o700);
    assert_eq!(mode(&lab.path().join("influx-writer/spool")), 0o700);
}

/// Permission bits of a file or directory.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn an_impossible_power_is_stored_with_quality_out_of_range_not_good() {
    let lab = Lab::new();
    // Reading 7 also carries power_w = 1e308.
    let (influx, _writer) = lab.v1_run(50, &["--implausible-at", "7"], "implausible reading");

    let rows = influx.rows("wattbus", "probe");
    assert_eq!(rows.len(), 50, "no reading is dropped");
    for r in &rows {
        let n = r["reading_n"].as_f64().unwrap();
        if n == 7.0 {
            assert_eq!(r["quality"], "out_of_range", "{r:?}");
            assert_eq!(
                r["power_w"].as_f64(),
                Some(1e308),
                "the value is kept: {r:?}"
            );
        } else {
            assert_eq!(r["quality"], "good", "{r:?}");
        }
    }
    let log = lab.log("writer.log");
    assert!(
        log.contains("power_w = 1e308 is not a plausible active power"),
        "{log}"
    );
}

#[test]
fn v2_api_with_token_and_gzip_into_victoriametrics() {
    let lab = Lab::new();
    let vm = Victoria::start(lab.path());
    std::fs::write(lab.path().join("token"), "t0ken-from-a-file\n").unwrap();
    let config = lab.writer_config(&format!(
        "flush_interval_ms = 200\n[influx_writer.influx]\nurl = \"http://127.0.0.1:{}/\"\napi = \"v2\"\norg = \"home\"\nbucket = \"wattbus\"\ntoken_file = \"{}\"\ngzip = true\n",
        vm.port,
        lab.path().join("token").display()
    ));
    let _writer = lab.start_writer(&config);
    let mut p = lab.produce(1000, 0, &[]);
    finish(&mut p, &lab, "v2 end to end");

    let series = vm.export("{__name__=\"probe_reading_n\"}");
    assert_eq!(series.len(), 1, "{series:?}");
    let s = &series[0];
    assert_eq!(s["metric"]["device"], "probe-dev");
    assert_eq!(s["metric"]["channel"], "ch");
    assert_eq!(s["metric"]["site"], "lab");
    assert_eq!(s["metric"]["quality"], "good");
    let values: Vec<f64> = s["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let stamps: Vec<i64> = s["timestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(values.len(), 1000);
    for (i, (v, t)) in values.iter().zip(&stamps).enumerate() {
        assert_eq!(*v, i as f64);
        assert_eq!(*t, BASE_TS_MS + i as i64);
    }
    // The token never reaches the log.
    assert!(!lab.log("writer.log").contains("t0ken-from-a-file"));
}

#[test]
fn influxdb_outage_with_the_writer_killed_loses_nothing() {
    let lab = Lab::new();
    let mut influx = Influxd::start(lab.path());
    influx.create_database("wattbus");
    let config = lab.writer_config(&format!(
        "flush_interval_ms = 200\n[influx_writer.influx]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"wattbus\"\nretry_min_ms = 200\nretry_max_ms = 1000\ntimeout_ms = 2000\n",
        influx.port
    ));
    let mut writer = lab.start_writer(&config);
    // 100 readings/s for 20 s.
    let mut p = lab.produce(2000, 100, &[]);
    std::thread::sleep(Duration::from_secs(3));
    influx.stop();
    assert!(
        wait_until(Duration::from_secs(15), || lab
            .log("writer.log")
            .contains("spooling readings to disk")),
        "the writer did not start spooling:\n{}",
        lab.log("writer.log")
    );
    std::thread::sleep(Duration::from_secs(3));
    // A crash with the spool holding readings that were already acknowledged upstream.
    writer.kill9();
    let spool = lab.path().join("influx-writer/spool");
    assert!(spool.is_dir(), "no spool at {}", spool.display());
    std::thread::sleep(Duration::from_secs(1));
    let _writer = lab.start_writer(&config);
    std::thread::sleep(Duration::from_secs(3));
    influx.resume();
    finish(&mut p, &lab, "outage");
    // The spool drains after the producer is done: wait for every reading.
    assert!(
        wait_until(Duration::from_secs(60), || influx
            .rows("wattbus", "probe")
            .len()
            == 2000),
        "{} of 2000 stored after the outage; writer log:\n{}",
        influx.rows("wattbus", "probe").len(),
        lab.log("writer.log")
    );
    assert_all_stored(&influx, "wattbus", 2000);
    assert!(lab.log("writer.log").contains("draining"));
}

#[test]
fn escaping_survives_a_round_trip_through_influxdb_1_6() {
    use influx_writer::config::{InfluxConfig, InfluxTarget, WriteApi};
    use influx_writer::http::{WriteClient, WriteOutcome};
    use influx_writer::{FieldValue, Point, encode_batch};

    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx.create_database("esc");
    let nasty = [
        "with space",
        "comma,here",
        "equals=sign",
        "quote\"d",
        "back\\slash",
        "ünïcødé ⚡",
        "all of it: a, b=c \"d\" \\e",
    ];
    let points: Vec<Point<'_>> = nasty
        .iter()
        .enumerate()
        .map(|(i, s)| Point {
            measurement: "esc m,1",
            tags: vec![("tag key,=", s)],
            fields: vec![
                ("text", FieldValue::Str(s)),
                ("n", FieldValue::Int(i as i64)),
            ],
            timestamp: BASE_TS_MS + i as i64,
        })
        .chain(std::iter::once(Point {
            measurement: "esc m,1",
            tags: vec![],
            fields: vec![("bad", FieldValue::Float(f64::NAN))],
            timestamp: BASE_TS_MS + 99,
        }))
        .collect();
    let (body, bad) = encode_batch(&points);
    assert_eq!(bad.len(), 1, "the NaN point alone is refused");
    assert_eq!(bad[0].0, nasty.len());

    let target = InfluxTarget {
        cfg: InfluxConfig {
            url: format!("http://127.0.0.1:{}", influx.port),
            api: WriteApi::V1,
            database: Some("esc".into()),
            ..InfluxConfig::default()
        },
        auth: None,
        retry: runtime::backoff::Backoff::constant(
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(60),
        ),
    };
    let client = WriteClient::new(&target).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(
        rt.block_on(client.write(body.as_bytes())),
        WriteOutcome::Written
    );

    let rows = influx.rows("esc", "esc m,1");
    assert_eq!(rows.len(), nasty.len(), "{rows:?}");
    for r in rows {
        let i = r["n"].as_i64().unwrap() as usize;
        assert_eq!(r["text"], nasty[i], "string field {i}");
        assert_eq!(r["tag key,="], nasty[i], "tag value {i}");
        assert_eq!(r["time"].as_i64(), Some(BASE_TS_MS + i as i64));
    }
}

#[test]
fn wrong_database_is_a_clear_error_and_data_waits_for_the_fix() {
    let lab = Lab::new();
    let influx = Influxd::start(lab.path());
    let config = lab.writer_config(&format!(
        "flush_interval_ms = 200\n[influx_writer.influx]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"not_created_yet\"\nretry_min_ms = 200\nretry_max_ms = 1000\n",
        influx.port
    ));
    let _writer = lab.start_writer(&config);
    let mut p = lab.produce(200, 0, &[]);
    assert!(
        wait_until(Duration::from_secs(20), || lab
            .log("writer.log")
            .contains("check influx.url and that the database exists")),
        "{}",
        lab.log("writer.log")
    );
    let log = lab.log("writer.log");
    assert!(log.contains("ERROR"), "{log}");
    assert!(
        log.contains("check influx.url and that the database exists"),
        "{log}"
    );
    // The person fixes it; everything arrives.
    influx.create_database("not_created_yet");
    finish(&mut p, &lab, "after the fix");
    assert!(
        wait_until(Duration::from_secs(30), || influx
            .rows("not_created_yet", "probe")
            .len()
            == 200),
        "{}",
        lab.log("writer.log")
    );
    assert_all_stored(&influx, "not_created_yet", 200);
}

#[test]
fn files_rotate_restart_cleanly_and_parse_as_csv() {
    let lab = Lab::new();
    let readings = lab.path().join("readings");
    let config = lab.writer_config(&format!(
        "flush_interval_ms = 100\n[influx_writer.files]\ndir = \"{}\"\nmax_bytes = 8192\n",
        readings.display()
    ));
    let mut writer = lab.start_writer(&config);
    let mut p = lab.produce(300, 0, &[]);
    finish(&mut p, &lab, "files, first run");
    assert!(
        writer
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    // A second run appends to the same directory (the last file continues).
    let _writer = lab.start_writer(&config);
    let mut p = lab.produce(300, 0, &["--instance", "probe-producer-2"]);
    finish(&mut p, &lab, "files, second run");

    let out = Command::new("python3")
        .arg("-c")
        .arg(
            r#"
import csv, glob, os, sys, collections
rows = []
files = sorted(glob.glob(sys.argv[1] + "/readings-*.csv"))
for f in files:
    # Rotation is decided per row: no file is larger than max_bytes.
    assert os.path.getsize(f) <= int(sys.argv[2]), (f, os.path.getsize(f))
    with open(f, newline="") as fh:
        r = list(csv.reader(fh))
        assert r[0] == ["time","site","device","channel","measurement","field","value","quality","tags"], (f, r[0])
        for row in r[1:]:
            assert len(row) == 9, (f, row)
            rows.append(row)
n = collections.Counter(float(row[6]) for row in rows)
print(len(files), len(rows), len(n), max(n.values()))
"#,
        )
        .arg(&readings)
        .arg("8192")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<usize> = text
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let (files, rows, distinct, max_repeat) = (nums[0], nums[1], nums[2], nums[3]);
    // 600 rows of ~70 bytes in 8 KiB files.
    assert!(files >= 5, "rotated by size: {files} files");
    // Readings are private: the directory 0700, every file 0600.
    assert_eq!(mode(&readings), 0o700);
    for f in std::fs::read_dir(&readings).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }
    // Both runs wrote readings 0..300: 600 rows, 300 distinct values, each exactly twice.
    assert_eq!(rows, 600, "{text}");
    assert_eq!(distinct, 300);
    assert_eq!(max_repeat, 2);
}

#[test]
fn csv_keeps_we515_tariffs_and_ct_power_basis_apart_and_python_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let readings = dir.path().join("readings");
    // The demo's own devices: two simulated WE-515s over Modbus RTU (whose energy total and
    // four tariff registers share time, device, channel, measurement and field) and a CT
    // sensor through rms-processor (power_basis tag), all into the default CSV output.
    let mut demo = Proc::spawn(
        "demo",
        Command::new(wattbus_bin())
            .args(["demo", "--meters", "1", "--readings-dir"])
            .arg(&readings)
            .arg("--data-dir")
            .arg(dir.path().join("data")),
        &dir.path().join("demo.log"),
    );
    let script = r#"
import csv, glob, sys, collections
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/readings-*.csv")):
    with open(f, newline="") as fh:
        r = list(csv.reader(fh))
        assert r[0] == ["time","site","device","channel","measurement","field","value","quality","tags"], (f, r[0])
        for row in r[1:]:
            assert len(row) == 9, (f, row)
            rows.append(row)
# The key of a value: (time, site, device, channel, measurement, field, tags). Delivery is at
# least once, so a key may repeat, but always with the same value.
values = collections.defaultdict(set)
for row in rows:
    values[tuple(row[:6] + row[8:])].add(row[6])
clashes = [(k, v) for k, v in values.items() if len(v) > 1]
assert not clashes, clashes[:5]
# One WE-515 poll: the energy total and the four tariffs, five keys at one time.
tariffs = collections.defaultdict(set)
for k in values:
    time, site, device, channel, measurement, field, tags = k
    if device in ("house", "heat-pump") and field == "energy_wh":
        tariffs[(time, device)].add(tags)
complete = [t for t, tags in tariffs.items() if tags == {"", "tariff=t1", "tariff=t2", "tariff=t3", "tariff=t4"}]
ct = [k for k in values if k[2] == "ct-1"]
bases = {k[6] for k in ct}
print(len(rows), len(complete), len(ct), ";".join(sorted(bases)))
"#;
    let check = || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&readings)
            .output()
            .expect("python3")
    };
    // Wait until a whole WE-515 energy poll and CT readings are in the files (the demo
    // writes them within seconds; a loaded machine may take longer).
    // Polled every half second, not every 20 ms: each poll is a Python process.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (done, last) = loop {
        let out = check();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let n: Vec<&str> = text.split_whitespace().collect();
        if out.status.success()
            && n.len() == 4
            && n[1].parse::<u32>().is_ok_and(|c| c >= 1)
            && n[2].parse::<u32>().is_ok_and(|c| c >= 1)
        {
            break (true, text);
        }
        if std::time::Instant::now() > deadline {
            break (false, text);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        demo.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default()
    );
    assert!(
        done,
        "no complete WE-515 poll and CT readings in the CSV files: {last}"
    );
    // Read again after the demo stopped: every row it wrote still parses.
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let bases = text.split_whitespace().nth(3).unwrap_or_default();
    assert!(
        !bases.is_empty() && bases.split(';').all(|b| b.starts_with("power_basis=")),
        "every CT row carries its power basis: {text}"
    );
}

#[test]
fn two_writers_in_one_group_split_the_readings_and_store_them_all() {
    let lab = Lab::new();
    let influx = Influxd::start(lab.path());
    influx.create_database("wattbus");
    let mut procs = Vec::new();
    for n in 1..=2 {
        let config = lab.writer_config(&format!(
            "instance = \"writer-{n}\"\nflush_interval_ms = 200\n[influx_writer.inbox]\nshared = true\n[influx_writer.influx]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"wattbus\"\n",
            influx.port
        ));
        let renamed = lab.path().join(format!("writer-{n}.toml"));
        std::fs::rename(&config, &renamed).unwrap();
        procs.push(Proc::spawn(
            "influx-writer",
            Command::new(wattbus_bin())
                .args(["run", "influx-writer", "--config"])
                .arg(&renamed),
            &lab.path().join(format!("writer-{n}.log")),
        ));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut p = lab.produce(3000, 1000, &[]);
    finish(&mut p, &lab, "two writers");
    assert_all_stored(&influx, "wattbus", 3000);
    // Both did real work: the broker split the stream between them.
    let mut total = 0;
    for n in 1..=2 {
        let config = std::fs::read_to_string(lab.path().join(format!("writer-{n}.toml"))).unwrap();
        // The writer's own health port (the file also holds the simulator's).
        let section = config.split("[influx_writer]").nth(1).unwrap_or_default();
        let port: u16 = section
            .lines()
            .find_map(|l| l.strip_prefix("health_listen = \"127.0.0.1:"))
            .and_then(|p| p.trim_end_matches('"').parse().ok())
            .expect("health port");
        let (_, metrics) = http("GET", port, "/metrics", b"");
        let written: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("wattbus_influx_points_written_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(written > 300, "writer {n} wrote only {written} points");
        total += written;
    }
    assert!(total >= 3000);
}

#[test]
fn the_demo_writes_to_influxdb_when_one_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx.create_database("demo");
    let out = Command::new(wattbus_bin())
        .args([
            "demo",
            "--duration-s",
            "4",
            "--meters",
            "2",
            "--influx-database",
            "demo",
        ])
        .args(["--influx-url", &format!("http://127.0.0.1:{}", influx.port)])
        .arg("--readings-dir")
        .arg(dir.path().join("readings"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = influx.rows("demo", "power");
    for meter in ["sim-meter-1", "sim-meter-2"] {
        let n = rows.iter().filter(|r| r["device"] == meter).count();
        assert!(n >= 2, "{meter}: {n} readings in InfluxDB");
    }
    // The household meters only consume.
    assert!(
        rows.iter()
            .filter(|r| r["device"]
                .as_str()
                .is_some_and(|d| d.starts_with("sim-meter")))
            .all(|r| r["power_w"].as_f64().is_some_and(|w| w > 0.0))
    );
    // The serial and Modbus devices reach InfluxDB too: the CT sensor with a voltage channel
    // (real power), the WE-515s (signed power, so no sign is asserted).
    for device in ["ct-1", "house", "heat-pump"] {
        assert!(
            rows.iter()
                .any(|r| r["device"] == device && r["power_w"].as_f64().is_some()),
            "{device}: no power_w in InfluxDB"
        );
    }
    // InfluxDB given, no --files: no files.
    assert!(!dir.path().join("readings").exists());
}

/// The PowMon layout has columns for current and power only. A reading with neither must
/// not be acknowledged as stored when it is in no file: it goes to the dead-letter file
/// first (third hostile review: a temperature and an energy reading were acknowledged and
/// kept nowhere).
#[test]
fn csv_powmon_dead_letters_what_it_cannot_hold_before_acknowledging() {
    let lab = Lab::new();
    let readings = lab.path().join("readings");
    let config = lab.writer_config(&format!(
        "flush_interval_ms = 100\n[influx_writer.files]\ndir = \"{}\"\nformat = \"csv-powmon\"\n",
        readings.display()
    ));
    let _writer = lab.start_writer(&config);
    // The probe's readings carry `reading_n` only.
    let mut p = lab.produce(50, 0, &[]);
    finish(&mut p, &lab, "csv-powmon");
    let letters = lab.dead_letters("dead-letters.jsonl");
    assert_eq!(
        letters.len(),
        50,
        "every reading the layout cannot hold is kept"
    );
    assert!(
        letters.iter().all(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.contains("csv-powmon"))
            && l["payload"]
                .as_str()
                .is_some_and(|p| p.contains("reading_n"))),
        "{:?}",
        letters.first()
    );
}

/// `wattbus influx setup` on a fresh InfluxDB 1.6.7: raw readings kept for the retention
/// given (and changed when it is changed), 1-minute aggregates kept for ever by one continuous
/// query, however often it runs; the aggregates it stores equal those of the raw readings they
/// cover, both through the query InfluxDB stored (for a past minute) and through InfluxDB
/// running it (for the current one).
#[test]
fn influx_setup_keeps_raw_readings_for_their_retention_and_minute_aggregates_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    let url = format!("http://127.0.0.1:{}", influx.port);
    let setup = |retention: &str| {
        run_ok(
            Command::new(wattbus_bin())
                .args(["influx", "setup", "--url", &url, "--database", "wb"])
                .args(["--raw-retention", retention, "--wait-s", "10"]),
        );
    };
    let write = |lines: &str| {
        let (status, text) = http(
            "POST",
            influx.port,
            "/write?db=wb&precision=ms",
            lines.as_bytes(),
        );
        assert_eq!(status, 204, "{text}");
    };
    let policies = || {
        let v = influx.query("wb", "SHOW RETENTION POLICIES ON \"wb\"");
        v["results"][0]["series"][0]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                    r[4].as_bool().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let queries = || {
        let v = influx.query("wb", "SHOW CONTINUOUS QUERIES");
        let mut out = Vec::new();
        for s in v["results"][0]["series"].as_array().unwrap() {
            if s["name"] == "wb" {
                for r in s["values"].as_array().into_iter().flatten() {
                    out.push((
                        r[0].as_str().unwrap().to_string(),
                        r[1].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
        out
    };
    setup("30d");
    setup("30d");
    let p = policies();
    assert!(
        p.contains(&("autogen".into(), "720h0m0s".into(), true)),
        "{p:?}"
    );
    assert!(p.contains(&("minutes".into(), "0s".into(), false)), "{p:?}");
    let mut q = queries();
    q.sort();
    assert_eq!(q.len(), 2, "{q:?}");
    assert_eq!(q[0].0, "wattbus_1m_late_v1");
    assert!(q[0].1.contains("RESAMPLE EVERY 1h FOR 6h"), "{}", q[0].1);
    assert_eq!(q[1].0, "wattbus_1m_v2");
    assert!(q[1].1.contains("RESAMPLE EVERY 1m FOR 2m"), "{}", q[1].1);
    setup("8w");
    let p = policies();
    assert!(
        p.contains(&("autogen".into(), "1344h0m0s".into(), true)),
        "{p:?}"
    );
    assert_eq!(queries().len(), 2);

    // A past minute, through the query InfluxDB stored.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = (now_ms / 60_000 - 10) * 60_000;
    let power = [230.5, 180.0, 410.25, 95.0, 300.0, 120.75];
    let mut body = String::new();
    for (i, w) in power.iter().enumerate() {
        let ts = t0 + i as i64 * 10_000;
        body.push_str(&format!(
            "power,site=home,device=house,channel=total power_w={w},energy_wh={} {ts}\n",
            1000 + i * 3
        ));
    }
    // A measurement with a string field and an integer one: mean() and min() take no string,
    // and the query must not fail on it (every other measurement would go unaggregated).
    body.push_str(&format!(
        "event,site=home,device=house note=\"door\",count=3i {t0}\n"
    ));
    // The next minute's reading is no part of it.
    body.push_str(&format!(
        "power,site=home,device=house,channel=total power_w=9999,energy_wh=2000 {}\n",
        t0 + 60_000
    ));
    write(&body);
    let stored = &queries()
        .into_iter()
        .find(|(name, _)| name == "wattbus_1m_v2")
        .unwrap()
        .1;
    let select = stored
        .split_once(" BEGIN ")
        .and_then(|(_, rest)| rest.rsplit_once(" END"))
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("no body in {stored}"));
    let (head, group) = select.split_once(" GROUP BY ").unwrap();
    let once = format!(
        "{head} WHERE time >= {t0}ms AND time < {}ms GROUP BY {group}",
        t0 + 60_000
    );
    let v = influx.query("wb", &once);
    assert!(v["results"][0]["error"].is_null(), "{v}");
    let v = influx.query(
        "wb",
        "SELECT * FROM \"wb\".\"minutes\".\"power\" WHERE device = 'house'",
    );
    let s = &v["results"][0]["series"][0];
    let cols: Vec<&str> = s["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let rows = s["values"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "one minute, one row: {s}");
    let get = |name: &str| {
        let i = cols
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("{name} not in {cols:?}"));
        rows[0][i].clone()
    };
    assert_eq!(get("time"), t0);
    let mean = power.iter().sum::<f64>() / power.len() as f64;
    assert!((get("mean_power_w").as_f64().unwrap() - mean).abs() < 1e-9);
    assert_eq!(get("max_power_w").as_f64().unwrap(), 410.25);
    assert_eq!(get("min_power_w").as_f64().unwrap(), 95.0);
    assert_eq!(get("last_energy_wh").as_f64().unwrap(), 1015.0);
    assert_eq!(get("channel"), "total", "tags are kept: {cols:?}");
    let v = influx.query("wb", "SELECT * FROM \"wb\".\"minutes\".\"event\"");
    let s = &v["results"][0]["series"][0];
    assert!(
        s.to_string().contains("\"door\"") && s["columns"].to_string().contains("mean_count"),
        "strings keep their last value, numbers their aggregates: {s}"
    );

    // The current minute, through InfluxDB running the query (at the minute's end).
    let now_line = format!(
        "power,site=home,device=fridge,channel=total power_w=80 {}\n",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    write(&now_line);
    assert!(
        wait_until(Duration::from_secs(150), || {
            let v = influx.query(
                "wb",
                "SELECT mean_power_w FROM \"wb\".\"minutes\".\"power\" WHERE device = 'fridge'",
            );
            v["results"][0]["series"][0]["values"][0][1].as_f64() == Some(80.0)
        }),
        "InfluxDB did not run the continuous query within 150 s"
    );

    // Readings two days late (a long outage drained from the spool): neither continuous query
    // looks that far back; `wattbus influx backfill` makes their minute.
    let late = (now_ms / 60_000 - 2 * 24 * 60) * 60_000;
    write(&format!(
        "power,site=home,device=shed,channel=total power_w=100 {late}\npower,site=home,device=shed,channel=total power_w=300 {}\n",
        late + 30_000
    ));
    let aggregated = || {
        let v = influx.query(
            "wb",
            "SELECT mean_power_w, max_power_w FROM \"wb\".\"minutes\".\"power\" WHERE device = 'shed'",
        );
        v["results"][0]["series"][0]["values"][0].clone()
    };
    assert!(aggregated().is_null());
    let backfill = run_ok(
        Command::new(wattbus_bin())
            .args(["influx", "backfill", "--url", &url, "--database", "wb"])
            .args(["--since", "3d", "--until", "1d"]),
    );
    assert!(
        String::from_utf8_lossy(&backfill.stdout).contains("are made again"),
        "{backfill:?}"
    );
    let row = aggregated();
    assert_eq!(row[0].as_i64(), Some(late), "{row}");
    assert_eq!(row[1].as_f64(), Some(200.0), "{row}");
    assert_eq!(row[2].as_f64(), Some(300.0), "{row}");

    // Shortening the raw retention where readings are stored is refused, unless asked for:
    // a reading three days old, and 2 days asked.
    write(&format!(
        "power,site=home,device=house,channel=total power_w=1 {}\n",
        now_ms - 3 * 86_400_000
    ));
    let shorter = || {
        let mut c = Command::new(wattbus_bin());
        c.args(["influx", "setup", "--url", &url, "--database", "wb"])
            .args(["--raw-retention", "2d", "--wait-s", "10"]);
        c
    };
    // (An upgrade that finds a query missing still gets it, refusal or not.)
    influx.query(
        "wb",
        "DROP CONTINUOUS QUERY \"wattbus_1m_late_v1\" ON \"wb\"",
    );
    let out = shorter().output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shorten"));
    assert!(policies().contains(&("autogen".into(), "1344h0m0s".into(), true)));
    assert_eq!(
        queries().len(),
        2,
        "the aggregates are set up even when shortening is refused"
    );
    run_ok(shorter().arg("--shorten"));
    assert!(policies().contains(&("autogen".into(), "48h0m0s".into(), true)));
    assert_eq!(queries().len(), 2);
}

#[test]
fn influx_setup_refuses_a_bad_retention_naming_the_flag() {
    let out = Command::new(wattbus_bin())
        .args(["influx", "setup", "--raw-retention", "30x", "--wait-s", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--raw-retention") && err.contains("h, d or w"),
        "{err}"
    );
}
