// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! A full disk, for real: `wattbus run simulator` journals onto a small tmpfs, publishing
//! through mosquitto with no sink running; the disk is filled, then freed, then a sink starts.
//!
//! The defect this guards against: the simulator logged one ERROR, stopped producing for good,
//! kept answering 200 on /healthz, and its journal gauges read 0 while hundreds of records were
//! held. Now: one ERROR for the episode, /healthz not ready, the unjournaled counter growing,
//! the gauges true; once space returns it journals again by itself (a WARN says how many
//! readings could not be journaled); and a sink then receives every journaled reading, the
//! readings of the outage being the only gap — exactly as many as were logged and counted.
//!
//! Mounting a tmpfs needs root. Without it the test re-runs itself in a user and mount
//! namespace (`unshare -m --map-root-user`), where the mount is allowed; if neither works it
//! fails saying so. It never skips.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::{Proc, Tmpfs, free_port, rerun_in_mount_namespace, wait_until, wattbus_bin};
use wattbus_testkit::mosquitto;

/// Set in the re-run inside a namespace, so it does not re-run itself again.
// Not `WATTBUS_…`: the children would take it for a config override.
const IN_NAMESPACE: &str = "FULL_DISK_TEST_IN_NAMESPACE";
const TEST: &str = "a_full_disk_stops_no_producer_and_every_journaled_reading_is_delivered";

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of a metric series whose line contains `name{` and every label of `labels`.
fn metric(port: u16, name: &str, labels: &str) -> Option<f64> {
    let text = http_get(port, "/metrics")?;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn ready(port: u16) -> Option<bool> {
    let r = http_get(port, "/healthz")?;
    Some(r.starts_with("HTTP/1.1 200"))
}

/// Fill the file system at `dir` with one file until it refuses another byte.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x55u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    path
}

/// The log without terminal colours (`ESC [ … m`), which a log file may carry.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seqs the probe consumer stored for `producer` (`<ts_ms> <producer> <seq>` lines).
fn stored_seqs(store: &Path, producer: &str) -> BTreeSet<u64> {
    std::fs::read_to_string(store)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split(' ');
            let (_ts, who, seq) = (p.next()?, p.next()?, p.next()?);
            (who == producer).then(|| seq.parse().ok()).flatten()
        })
        .collect()
}

/// Runs of seqs missing below the highest stored one.
fn gaps(seqs: &BTreeSet<u64>) -> Vec<[u64; 2]> {
    let mut out = Vec::new();
    let mut expect = 1;
    for &s in seqs {
        if s > expect {
            out.push([expect, s - 1]);
        }
        expect = s + 1;
    }
    out
}

#[test]
fn a_full_disk_stops_no_producer_and_every_journaled_reading_is_delivered() {
    if rerun_in_mount_namespace(TEST, IN_NAMESPACE) {
        return;
    }
    let broker = mosquitto();
    let password = broker.password.as_ref().unwrap().expose().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let _tmpfs = Tmpfs::mount(&data, "2m");
    let id = format!("fulldisk-{}", std::process::id());
    let site = format!("fulldisk-{}", std::process::id());
    let device = format!("{id}-1");
    let health = free_port();
    let secret = d.join("mq-password");
    std::fs::write(&secret, &password).unwrap();
    // `max_bytes` far above the tmpfs: the disk fills long before the journal's own bound.
    // Segments of one tmpfs page: a record that does not fit starts a new file, which needs a
    // new page, so once the disk is full every append fails until space returns — no record
    // slips into the slack of a page and splits the outage in two.
    let config = d.join("wattbus.toml");
    std::fs::write(
        &config,
        format!(
            "site = \"{site}\"\ndata_dir = \"{data}\"\n[log]\nlevel = \"info\"\n\
             [bus]\nhost = \"{host}\"\nport = {port}\nusername = \"{user}\"\npassword_file = \"{secret}\"\n\
             reconnect_max_ms = 1000\n\
             [simulator]\ninstance = \"{id}\"\ndevice_prefix = \"{id}\"\ndevices = 1\ninterval_ms = 20\n\
             health_listen = \"127.0.0.1:{health}\"\n\
             [simulator.stream]\nwait_for = [\"probe-sink\"]\n\
             max_bytes = 268435456\nsegment_bytes = 4096\n\
             ack_timeout_ms = 1000\nack_timeout_max_ms = 2000\n",
            data = data.display(),
            host = broker.host,
            port = broker.port,
            user = broker.username.as_deref().unwrap(),
            secret = secret.display(),
        ),
    )
    .unwrap();
    let sim_log = d.join("simulator.log");
    let mut sim = Proc::spawn(
        "simulator",
        Command::new(wattbus_bin())
            .args(["run", "simulator", "--config"])
            .arg(&config),
        &sim_log,
    );
    let log = || strip_ansi(&std::fs::read_to_string(&sim_log).unwrap_or_default());
    let labels = "service=\"simulator\",stream=\"meas\"";
    let m = |name: &str| metric(health, name, labels);
    let journaled = || {
        Some(
            metric(
                health,
                "wattbus_messages_sent_total",
                "service=\"simulator\"",
            )? + m("wattbus_deferred_messages_total").unwrap_or(0.0),
        )
    };
    let segments_bytes = || -> u64 {
        std::fs::read_dir(data.join("journal").join(&id).join("meas"))
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                    .map(|e| e.metadata().map_or(0, |m| m.len()))
                    .sum()
            })
            .unwrap_or(0)
    };
    let fail = |what: &str| -> ! {
        panic!("{what}\n--- simulator log ---\n{}", log());
    };

    // Producing normally, no sink: readings pile up in the journal, and the gauges say so.
    if !wait_until(Duration::from_secs(60), || {
        ready(health) == Some(true) && m("wattbus_journal_records").is_some_and(|r| r >= 50.0)
    }) {
        fail("the simulator did not start journaling");
    }

    // The disk fills.
    let filler = fill(&data);
    if !wait_until(Duration::from_secs(60), || {
        m("wattbus_unjournaled_messages_total").is_some_and(|n| n >= 1.0)
    }) {
        fail("no reading was counted as unjournaled after the disk filled");
    }
    let during = http_get(health, "/healthz").unwrap_or_default();
    assert!(
        during.starts_with("HTTP/1.1 503"),
        "still ready while it cannot journal: {during}"
    );
    assert!(
        during.contains(&format!("\"journal:{id}/meas\":false")),
        "no readiness check names the journal: {during}"
    );
    // It keeps producing (and counting) rather than stopping.
    let first = m("wattbus_unjournaled_messages_total").unwrap();
    if !wait_until(Duration::from_secs(60), || {
        m("wattbus_unjournaled_messages_total").is_some_and(|n| n >= first + 25.0)
    }) {
        fail("the simulator stopped producing on a full disk");
    }
    let errors = log().matches("Cannot journal readings").count();
    assert_eq!(
        errors,
        1,
        "one ERROR per episode, not one per reading:\n{}",
        log()
    );
    // The gauges are true while nothing is acknowledged: every journaled record is held.
    if !wait_until(Duration::from_secs(30), || {
        let (records, journaled, bytes) = (
            m("wattbus_journal_records"),
            journaled(),
            m("wattbus_journal_bytes"),
        );
        records.is_some() && records == journaled && bytes == Some(segments_bytes() as f64)
    }) {
        fail(&format!(
            "journal gauges are not true: records {:?}, journaled {:?}, bytes {:?}, on disk {}",
            m("wattbus_journal_records"),
            journaled(),
            m("wattbus_journal_bytes"),
            segments_bytes()
        ));
    }
    let held = m("wattbus_journal_records").unwrap();
    assert!(held >= 50.0, "{held}");

    // Space returns: it journals again by itself and says how many readings it could not.
    std::fs::remove_file(&filler).unwrap();
    if !wait_until(Duration::from_secs(60), || {
        log().contains("Journaling again")
            && ready(health) == Some(true)
            && m("wattbus_journal_records").is_some_and(|r| r >= held + 25.0)
    }) {
        fail("journaling did not resume after the space came back");
    }
    let recovered = log()
        .lines()
        .find(|l| l.contains("Journaling again"))
        .map(str::to_string)
        .unwrap();
    let logged: u64 = recovered
        .split_whitespace()
        .find_map(|w| w.strip_prefix("unjournaled=")?.parse().ok())
        .unwrap_or_else(|| panic!("no unjournaled= in {recovered:?}"));
    let counted = m("wattbus_unjournaled_messages_total").unwrap();
    assert_eq!(logged as f64, counted, "the log and the counter disagree");
    assert!(logged >= 25, "{recovered}");

    // A sink starts: every journaled reading reaches it; the outage is the only gap, and it is
    // exactly the readings logged and counted as not journaled.
    let store = d.join("store.txt");
    let _sink = Proc::spawn(
        "sink",
        Command::new(env!("CARGO_BIN_EXE_probe"))
            .args(["--port", &broker.port.to_string(), "--user"])
            .arg(broker.username.as_deref().unwrap())
            .args(["--password", &password, "--site", &site, "--data-dir"])
            .arg(d.join("sink"))
            .args([
                "consume",
                "--device",
                &device,
                "--instance",
                &format!("{id}-sink"),
                "--store",
            ])
            .arg(&store),
        &d.join("sink.log"),
    );
    let settled = wait_until(Duration::from_secs(120), || {
        let seqs = stored_seqs(&store, &id);
        seqs.len() as f64 >= held + 25.0
            && gaps(&seqs).len() == 1
            && m("wattbus_journal_records").is_some_and(|r| r < 25.0)
    });
    let seqs = stored_seqs(&store, &id);
    if !settled {
        fail(&format!(
            "the journal was not delivered: {} stored, gaps {:?}, journal holds {:?}",
            seqs.len(),
            gaps(&seqs),
            m("wattbus_journal_records")
        ));
    }
    let gap = gaps(&seqs)[0];
    eprintln!(
        "full disk: {held} records held when the disk filled, {logged} readings not journaled \
         (seqs {}-{}), {} delivered",
        gap[0],
        gap[1],
        seqs.len()
    );
    assert_eq!(
        gap[1] - gap[0] + 1,
        logged,
        "the readings missing are not exactly those that could not be journaled"
    );
    assert_eq!(
        sim.terminate(Duration::from_secs(20)).map(|s| s.success()),
        Some(true),
        "the simulator did not stop cleanly"
    );
}
