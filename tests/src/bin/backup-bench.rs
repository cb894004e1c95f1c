//! backup-rotator on a month of readings: how long a full and an hourly incremental set take,
//! the service's memory while it makes them, what the sets weigh, how long `wattbus backup
//! restore` takes to write it all back, and the same database through `influxd backup
//! -portable` for comparison. docs/BENCHMARKS.md.
//!
//! It runs on the database influx-bench leaves (30 days of the demo's devices, the shipped
//! retention and aggregates), as the services run: the broker, `wattbus run backup-rotator`
//! with a schedule of every minute (the first run at start makes the full set, the next
//! minute's an incremental one), then `wattbus backup restore` into a new database.
//!
//!     cargo build --release -p wattbus -p wattbus-e2e
//!     target/release/influx-bench --days 30 --dir /tmp/influx-bench --only shipped
//!     target/release/backup-bench --influx-dir /tmp/influx-bench/shipped --dir /tmp/backup-bench

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use wattbus_e2e::servers::{http, urlencode};
use wattbus_e2e::{
    BrokerSetup, Proc, cpu_seconds, free_port, port_open, status_kb, wait_until, wattbus_bin,
};

const DB: &str = "wattbus";

#[derive(Parser)]
struct Cli {
    /// A directory influx-bench filled (with its influxdb.conf).
    #[arg(long)]
    influx_dir: PathBuf,
    /// Work directory: the sets, the restore's logs, the native backup (emptied first).
    #[arg(long)]
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = std::fs::remove_dir_all(&cli.dir);
    std::fs::create_dir_all(&cli.dir)?;
    let conf = std::fs::read_to_string(cli.influx_dir.join("influxdb.conf"))
        .context("influxdb.conf: run influx-bench first")?;
    let port = conf_port(&conf, "[http]")?;
    let rpc = conf_port(&conf, "")?;
    let _influx = Proc::spawn(
        "influxd",
        Command::new("influxd")
            .arg("-config")
            .arg(cli.influx_dir.join("influxdb.conf")),
        &cli.dir.join("influxd.log"),
    );
    if !wait_until(Duration::from_secs(600), || {
        port_open(port) && http("GET", port, "/ping", b"").0 == 204
    }) {
        bail!(
            "influxd did not start; see {}",
            cli.dir.join("influxd.log").display()
        );
    }
    let _ = query(port, "DROP DATABASE bench_restored");

    let broker = BrokerSetup::new(&cli.dir);
    let _broker = broker.start(&cli.dir.join("broker.log"));
    let sets = cli.dir.join("sets");
    let cfg = broker.service_config(
        &cli.dir,
        [
            "level = \"info\"",
            "",
            &format!(
                "\n[backup_rotator]\nschedule = \"* * * * *\"\nsettle_s = 0\nhealth_listen = \"127.0.0.1:{}\"\n\
                 [backup_rotator.influx]\nurl = \"http://127.0.0.1:{port}\"\ntimeout_ms = 600000\n\
                 [backup_rotator.storage]\ndir = \"{}\"\n",
                free_port(),
                sets.display()
            ),
        ],
    );
    let mut rotator = Proc::spawn(
        "backup-rotator",
        Command::new(wattbus_bin())
            .args(["run", "backup-rotator", "-c"])
            .arg(&cfg),
        &cli.dir.join("rotator.log"),
    );
    let mut peak_kb = 0;
    let mut manifests = Vec::new();
    let done = wait_until(Duration::from_secs(7200), || {
        peak_kb = peak_kb.max(status_kb(rotator.id(), "VmHWM:").unwrap_or(0));
        manifests = finished(&sets);
        manifests.len() >= 2
    });
    let cpu_s = cpu_seconds(rotator.id());
    rotator.terminate(Duration::from_secs(30));
    if !done {
        bail!("no two sets; see {}", cli.dir.join("rotator.log").display());
    }
    let read = |p: &Path| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            p.join("manifest.json"),
        )?)?)
    };
    let full = read(&manifests[0])?;
    let inc = read(&manifests[1])?;
    let sum = |m: &serde_json::Value, k: &str| -> u64 {
        m["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p[k].as_u64())
            .sum()
    };
    let (full_points, full_bytes) = (sum(&full, "points"), sum(&full, "bytes"));
    let ms = |m: &serde_json::Value| m["duration_ms"].as_u64().unwrap_or(0);

    // Restore everything into a new database, as a user would after losing the card.
    let started = Instant::now();
    let mut restore = Proc::spawn(
        "restore",
        Command::new(wattbus_bin())
            .args(["backup", "restore", "-c"])
            .arg(&cfg)
            .args(["--database", "bench_restored", "--set"])
            .arg(manifests[0].file_name().unwrap_or_default()),
        &cli.dir.join("restore.log"),
    );
    let mut restore_peak_kb = 0;
    let status = loop {
        restore_peak_kb = restore_peak_kb.max(status_kb(restore.id(), "VmHWM:").unwrap_or(0));
        if let Some(s) = restore.wait(Duration::from_millis(200)) {
            break s;
        }
    };
    let restore_s = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "restore failed; see {}",
            cli.dir.join("restore.log").display()
        );
    }
    let log = std::fs::read_to_string(cli.dir.join("restore.log"))?;
    let restored: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("Restored "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no \"Restored N points\" in restore.log")?;

    // InfluxDB's own portable backup of the same database.
    let native = cli.dir.join("native");
    let started = Instant::now();
    let o = Command::new("influxd")
        .args(["backup", "-portable", "-database", DB, "-host"])
        .arg(format!("127.0.0.1:{rpc}"))
        .arg(&native)
        .output()?;
    let native_s = started.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!("influxd backup: {}", String::from_utf8_lossy(&o.stderr));
    }
    let native_bytes = du(&native)?;

    #[allow(clippy::cast_precision_loss)]
    let per_point = |b: u64| b as f64 / full_points.max(1) as f64;
    println!("| what | time | peak RSS | size | bytes per point |");
    println!("|---|---|---|---|---|");
    #[allow(clippy::cast_precision_loss)]
    {
        println!(
            "| full set, {full_points} points ({} parts) | {:.1} s (service CPU {cpu_s:.1} s for both sets) | {:.1} MB (service) | {:.1} MB | {:.2} |",
            full["parts"].as_array().map_or(0, Vec::len),
            ms(&full) as f64 / 1000.0,
            peak_kb as f64 / 1024.0,
            full_bytes as f64 / 1e6,
            per_point(full_bytes),
        );
        println!(
            "| incremental set, {} points (the last minute + 10 min lookback) | {:.2} s | | {:.3} MB | |",
            sum(&inc, "points"),
            ms(&inc) as f64 / 1000.0,
            sum(&inc, "bytes") as f64 / 1e6,
        );
        println!(
            "| `wattbus backup restore` of the full set into a new database | {restore_s:.1} s | {:.1} MB | | |",
            restore_peak_kb as f64 / 1024.0
        );
        println!(
            "| `influxd backup -portable` (for comparison) | {native_s:.1} s | | {:.1} MB | {:.2} |",
            native_bytes as f64 / 1e6,
            per_point(native_bytes),
        );
    }
    println!(
        "\nPoints in the full set: {full_points}; written back by the restore: {restored}{}",
        if full_points == restored {
            " (all)"
        } else {
            " — MISMATCH"
        }
    );
    Ok(())
}

/// `bind-address` under `section` ("" for the top level) of an influxdb.conf.
fn conf_port(conf: &str, section: &str) -> anyhow::Result<u16> {
    let mut current = "";
    for line in conf.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t;
            continue;
        }
        if current == section
            && let Some(v) = t.strip_prefix("bind-address = ")
        {
            let v = v.trim_matches('"');
            return v
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .context("bind-address port");
        }
    }
    bail!("no bind-address in {section:?}")
}

fn finished(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join("lab"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.join("manifest.json").is_file());
    out.sort();
    out
}

fn query(port: u16, q: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http("POST", port, &format!("/query?q={}", urlencode(q)), b"");
    if status != 200 {
        bail!("{q}: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

fn du(p: &Path) -> anyhow::Result<u64> {
    let o = Command::new("du").args(["-sb"]).arg(p).output()?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("du")
}
