//! node-health end to end on this machine's own /proc and /sys: `wattbus run node-health`
//! publishes the node's health, influx-writer sends it on (its HTTP output, to the test
//! receiver), and every value is checked against the kernel's files read here, independently
//! of the service's parsers. Sources this machine does not have are absent, never zero.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::receiver::{Receiver, TOKEN, writer, writer_config};
use wattbus_e2e::{BrokerSetup, Proc, free_port, run_ok, wait_until, wattbus_bin};

const NODE: &str = "testnode";

/// `/proc/meminfo`'s `key`, in bytes.
fn meminfo(key: &str) -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap();
    let kb: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024.0
}

/// The newest reading of each channel of the node, as the receiver stored it.
fn latest(rx: &Receiver) -> BTreeMap<String, serde_json::Value> {
    let mut by_channel = BTreeMap::new();
    for r in rx.received() {
        if r["device"] == NODE && r["measurement"] == "node_health" {
            by_channel.insert(r["channel"].as_str().unwrap().to_string(), r);
        }
    }
    by_channel
}

fn field(r: &serde_json::Value, name: &str) -> f64 {
    r["fields"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no field {name} in {r}"))
}

#[test]
fn node_health_matches_proc_and_sys_and_leaves_out_what_the_machine_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = BrokerSetup::new(d);
    let _broker = broker.start(&d.join("broker.log"));
    let rx = Receiver::start(d, None);
    let url = format!("http://127.0.0.1:{}/in", rx.port);
    let (cfg, _) = writer_config(&broker, d, &url, TOKEN, "");
    // The node-health section beside the writer's, in the same file.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[node_health]\ninterval_ms = 1000\nnode = \"{NODE}\"\nhealth_listen = \"127.0.0.1:{}\"\n",
        free_port()
    ));
    std::fs::write(&cfg, text).unwrap();
    let wlog = d.join("writer.log");
    let mut w = writer(&cfg, &wlog);
    let log = d.join("node-health.log");
    let mut health = Proc::spawn(
        "node-health",
        Command::new(wattbus_bin())
            .args(["run", "node-health", "--config"])
            .arg(&cfg),
        &log,
    );
    let wanted = ["cpu", "load", "memory", "disk", "uptime"];
    assert!(
        wait_until(Duration::from_secs(60), || {
            let l = latest(&rx);
            wanted.iter().all(|c| l.contains_key(*c))
        }),
        "not every channel arrived: {:?}\nnode-health log:\n{}\nwriter log:\n{}",
        latest(&rx).keys().collect::<Vec<_>>(),
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(&wlog).unwrap_or_default()
    );
    // A few more rounds, so the CPU and write rates come from full intervals.
    let first = rx.received().len();
    assert!(wait_until(Duration::from_secs(30), || rx.received().len()
        >= first + 3 * wanted.len()));
    let l = latest(&rx);
    for r in l.values() {
        assert_eq!(r["quality"], "good", "{r}");
        assert_eq!(r["site"], "lab", "{r}");
    }

    // Memory: the total is the kernel's exactly; what is available moves, within a tenth.
    let m = &l["memory"];
    assert_eq!(field(m, "mem_total_bytes"), meminfo("MemTotal"));
    let total = meminfo("MemTotal");
    assert!((field(m, "mem_available_bytes") - meminfo("MemAvailable")).abs() < total / 10.0);
    let used = field(m, "mem_used_pct");
    let used_here = 100.0 * (1.0 - meminfo("MemAvailable") / total);
    assert!((used - used_here).abs() < 10.0, "{used} vs {used_here}");
    assert_eq!(field(m, "swap_total_bytes"), meminfo("SwapTotal"));

    // Load: as /proc/loadavg says, give or take what changed in a few seconds.
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
    let here: Vec<f64> = loadavg
        .split_whitespace()
        .take(3)
        .map(|v| v.parse().unwrap())
        .collect();
    for (name, now) in ["load_1m", "load_5m", "load_15m"].iter().zip(&here) {
        let v = field(&l["load"], name);
        assert!(
            v >= 0.0 && (v - now).abs() <= 2.0 + now * 0.5,
            "{name} {v} vs {now}"
        );
    }

    // CPU use and iowait are shares of time.
    for name in ["cpu_use_pct", "cpu_iowait_pct"] {
        let v = field(&l["cpu"], name);
        assert!((0.0..=100.0).contains(&v), "{name} {v}");
    }

    // Uptime: /proc/uptime now, less the reading's age.
    let up = &l["uptime"];
    let uptime_now: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let age_s = (proto::now_ms() - up["ts_ms"].as_i64().unwrap()) as f64 / 1000.0;
    assert!(
        (field(up, "uptime_s") - (uptime_now - age_s)).abs() < 3.0,
        "{} vs {uptime_now} - {age_s}",
        field(up, "uptime_s")
    );

    // Disk: the data directory's file system, as df counts it.
    let out = run_ok(
        Command::new("df")
            .args(["-B1", "--output=size,avail"])
            .arg(d),
    );
    let df = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<f64> = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let disk = &l["disk"];
    assert_eq!(field(disk, "disk_total_bytes"), nums[0]);
    assert!(
        (field(disk, "disk_available_bytes") - nums[1]).abs() < 512.0 * 1024.0 * 1024.0,
        "{} vs {}",
        field(disk, "disk_available_bytes"),
        nums[1]
    );
    let pct = field(disk, "disk_used_pct");
    assert!((0.0..=100.0).contains(&pct), "{pct}");
    // Writes per second: this machine has a block device under the data directory's file
    // system or physical disks to sum, so the rate is there, and never negative.
    assert!(field(disk, "disk_write_bytes_per_s") >= 0.0);

    // Temperature: only where the kernel has a thermal zone with a readable temperature.
    let zones: Vec<f64> = std::fs::read_dir("/sys/class/thermal")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
                .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
                .filter_map(|t| t.trim().parse::<f64>().ok())
                .map(|m| m / 1000.0)
                .collect()
        })
        .unwrap_or_default();
    match l.get("temperature") {
        None => assert!(zones.is_empty(), "zones {zones:?} but no temperature"),
        Some(t) => {
            let c = field(t, "cpu_temperature_c");
            assert!(
                zones.iter().any(|z| (z - c).abs() < 5.0),
                "{c} °C is none of {zones:?}"
            );
        }
    }
    // Throttling: only on a Raspberry Pi, whose firmware driver has the file.
    let pi = Path::new("/sys/devices/platform/soc/soc:firmware/get_throttled").exists();
    assert_eq!(l.contains_key("throttling"), pi, "{:?}", l.keys());
    // Nothing is published as zero for a source that is missing: every reading has fields.
    for r in l.values() {
        assert!(!r["fields"].as_object().unwrap().is_empty(), "{r}");
    }

    health.terminate(Duration::from_secs(10));
    w.terminate(Duration::from_secs(10));
}
