//! InfluxDB on a Pi: disk and memory after N days of the demo's devices at 1 Hz, with the
//! shipped retention and downsampling (`wattbus influx setup`: raw readings 30 days, 1-minute
//! aggregates for ever) and without (one policy, kept for ever). docs/BENCHMARKS.md.
//!
//! The readings have the demo's shape (measurements, tags, fields, rates: two WE-515 meters,
//! three CT clamps, a PowMon, a fridge monitor, the Modbus line's health and six services'
//! statuses) with realistic noise, and are written as pre-built line-protocol batches of 5,000
//! lines over `/write` (what influx-writer sends), oldest first. The continuous query only
//! aggregates the last minutes as they pass, so for the shipped setup its own `SELECT … INTO`
//! is then run over the whole range, six hours at a time: what it would have produced over
//! the N days. Then InfluxDB is restarted and measured idle and under the dashboards'
//! queries.
//!
//!     cargo build --release -p wattbus -p wattbus-e2e
//!     target/release/influx-bench --days 30 --dir /tmp/influx-bench

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use wattbus_e2e::servers::{http, urlencode};
use wattbus_e2e::{Proc, free_port, wait_until};

#[derive(Parser)]
struct Cli {
    /// Days of readings.
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Where the two InfluxDB data directories go (replaced).
    #[arg(long)]
    dir: PathBuf,
    /// The wattbus binary (for `wattbus influx setup`).
    #[arg(long, default_value = "target/release/wattbus")]
    wattbus: PathBuf,
    /// Only this setup: `shipped` or `forever`.
    #[arg(long)]
    only: Option<String>,
    /// Measure the databases a previous run left in --dir, without writing again.
    #[arg(long)]
    measure_only: bool,
    /// Instead of the N-day fill: both setups side by side, each given the hours the late
    /// query looks back, then fed live at 1 Hz for this many minutes; reports what influxd
    /// wrote to the disk meanwhile (`/proc/<pid>/io`), the continuous queries' SD-card cost.
    #[arg(long)]
    live_minutes: Option<u64>,
    /// The alert rules whose queries run beside the dashboard's for the memory peak.
    #[arg(
        long,
        default_value = "grafana/provisioning/alerting/wattbus-rules.json"
    )]
    rules: PathBuf,
}

const DB: &str = "wattbus";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.measure_only {
        let _ = std::fs::remove_dir_all(&cli.dir);
    }
    std::fs::create_dir_all(&cli.dir)?;
    if let Some(minutes) = cli.live_minutes {
        return live(&cli, minutes);
    }
    let mut report = Vec::new();
    for mode in ["forever", "shipped"] {
        if cli.only.as_deref().is_some_and(|o| o != mode) {
            continue;
        }
        report.push(run(&cli, mode)?);
    }
    println!(
        "\n| setup | days | points written | write time | disk (data + wal) | of which 1-minute aggregates | RSS idle | RSS peak under queries | 6 h query | 7 d query | 30 d query | all alert queries |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in report {
        println!("{r}");
    }
    Ok(())
}

struct Influx {
    proc: Proc,
}

fn start(dir: &Path, port: u16) -> anyhow::Result<Influx> {
    start_with(dir, port, true)
}

/// `settled`: compactions after seconds of quiet instead of the defaults (10 minutes, 4 hours).
fn start_with(dir: &Path, port: u16, settled: bool) -> anyhow::Result<Influx> {
    let config = dir.join("influxdb.conf");
    // As compose runs it (docker-compose.yml): the TSI index on disk, no query or HTTP log,
    // no _internal database. With `settled`, compactions run after seconds of quiet, not the
    // default 10 minutes and 4 hours: what a month-old database on a Pi has long done anyway.
    let compaction = if settled {
        "  cache-snapshot-write-cold-duration = \"10s\"\n  compact-full-write-cold-duration = \"1m\"\n"
    } else {
        ""
    };
    std::fs::write(
        &config,
        format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
             [meta]\n  dir = \"{d}/meta\"\n\
             [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n  index-version = \"tsi1\"\n{compaction}\
             [http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n  flux-enabled = false\n\
             [monitor]\n  store-enabled = false\n\
             [logging]\n  level = \"warn\"\n",
            rpc = free_port(),
            d = dir.display(),
        ),
    )?;
    let proc = Proc::spawn(
        "influxd",
        Command::new("influxd").arg("-config").arg(&config),
        &dir.join("influxd.log"),
    );
    if !wait_until(Duration::from_secs(600), || {
        wattbus_e2e::port_open(port) && http("GET", port, "/ping", b"").0 == 204
    }) {
        bail!(
            "influxd did not start; see {}",
            dir.join("influxd.log").display()
        );
    }
    Ok(Influx { proc })
}

fn query(port: u16, q: &str) -> anyhow::Result<String> {
    let (status, body) = http(
        "POST",
        port,
        &format!("/query?db={DB}&q={}", urlencode(q)),
        b"",
    );
    if status != 200 || body.contains("\"error\"") {
        bail!("{q}: {status} {body}");
    }
    Ok(body)
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes the files take on the disk (allocated blocks, not apparent sizes: TSI's index files
/// are sparse).
fn du(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    let out = Command::new("du").arg("-sB1").arg(path).output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn run(cli: &Cli, mode: &str) -> anyhow::Result<String> {
    let dir = cli.dir.join(mode);
    std::fs::create_dir_all(&dir)?;
    let port = free_port();
    let mut influx = start(&dir, port)?;
    let url = format!("http://127.0.0.1:{port}");
    let shipped = mode == "shipped";
    if cli.measure_only {
        influx.proc.terminate(Duration::from_secs(600));
        return measure(cli, &dir, port, shipped, 0, Duration::ZERO);
    }
    if mode == "shipped" {
        let out = Command::new(&cli.wattbus)
            .args(["influx", "setup", "--url", &url, "--database", DB])
            .output()
            .context("wattbus influx setup")?;
        if !out.status.success() {
            bail!("influx setup: {}", String::from_utf8_lossy(&out.stderr));
        }
    } else {
        query(port, &format!("CREATE DATABASE {DB}"))?;
    }
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?;
    // An hour inside the raw retention, so none of it is refused as too old.
    let start_s = now - i64::from(cli.days) * 86_400 + 3600;
    let t = Instant::now();
    let points = write_days(&[port], start_s, now, false)?;
    let write_time = t.elapsed();
    eprintln!("{mode}: {points} points in {write_time:?}");
    if mode == "shipped" {
        let cqs = query(port, "SHOW CONTINUOUS QUERIES")?;
        let v: serde_json::Value = serde_json::from_str(&cqs)?;
        let cq = v["results"][0]["series"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == DB)
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r[1].as_str().map(str::to_string))
            .find(|q| q.contains("wattbus_1m_v2"))
            .context("no continuous query")?;
        let select = cq
            .split(" BEGIN ")
            .nth(1)
            .context("CQ shape")?
            .trim_end_matches(" END");
        let (head, group) = select.split_once(" GROUP BY ").context("CQ shape")?;
        let t = Instant::now();
        let mut from = start_s - start_s % 60;
        while from < now {
            let to = from + 6 * 3600;
            query(
                port,
                &format!("{head} WHERE time >= {from}s AND time < {to}s GROUP BY {group}"),
            )?;
            from = to;
        }
        eprintln!("{mode}: aggregates in {:?}", t.elapsed());
    }
    influx.proc.terminate(Duration::from_secs(600));
    measure(cli, &dir, port, shipped, points, write_time)
}

/// What the process wrote to the block layer so far (`write_bytes` of `/proc/<pid>/io`).
fn written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("write_bytes:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Both setups fed the same live readings; InfluxDB with compose's settings.
fn live(cli: &Cli, minutes: u64) -> anyhow::Result<()> {
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?;
    // The late query looks 6 hours back (LATE_HOURS in services/wattbus/src/influx.rs).
    let history = 6 * 3600 + 600;
    let mut setups = Vec::new();
    for mode in ["forever", "shipped"] {
        let dir = cli.dir.join(format!("live-{mode}"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let influx = start_with(&dir, port, false)?;
        if mode == "shipped" {
            let url = format!("http://127.0.0.1:{port}");
            let out = Command::new(&cli.wattbus)
                .args(["influx", "setup", "--url", &url, "--database", DB])
                .output()
                .context("wattbus influx setup")?;
            if !out.status.success() {
                bail!("influx setup: {}", String::from_utf8_lossy(&out.stderr));
            }
        } else {
            query(port, &format!("CREATE DATABASE {DB}"))?;
        }
        // The hours before: what the late query finds when it runs.
        write_days(&[port], now - history, now, false)?;
        setups.push((mode, port, influx));
    }
    let ports: Vec<u16> = setups.iter().map(|s| s.1).collect();
    let before: Vec<u64> = setups.iter().map(|s| written(s.2.proc.id())).collect();
    let start_s = now + 1;
    let end_s = start_s + i64::try_from(minutes)? * 60;
    write_days(&ports, start_s, end_s, true)?;
    println!("\n| setup | minutes live | written by influxd | per hour |");
    println!("|---|---|---|---|");
    for ((mode, _, mut influx), before) in setups.into_iter().zip(before) {
        let bytes = written(influx.proc.id()).saturating_sub(before);
        #[allow(clippy::cast_precision_loss)]
        let per_hour = bytes as f64 / minutes as f64 * 60.0 / 1e6;
        println!(
            "| {mode} | {minutes} | {:.1} MB | {per_hour:.1} MB |",
            bytes as f64 / 1e6
        );
        influx.proc.terminate(Duration::from_secs(120));
    }
    Ok(())
}

/// Every alert rule's InfluxQL, with Grafana's `$timeFilter` for the rule's own range.
fn alert_queries(rules: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(rules).with_context(|| format!("{}", rules.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let mut out = Vec::new();
    for group in v["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            for d in rule["data"].as_array().into_iter().flatten() {
                if let Some(q) = d["model"]["query"].as_str() {
                    let from = d["relativeTimeRange"]["from"].as_u64().unwrap_or(600);
                    out.push(q.replace("$timeFilter", &format!("time > now() - {from}s")));
                }
            }
        }
    }
    if out.is_empty() {
        bail!("no alert queries in {}", rules.display());
    }
    Ok(out)
}

/// Restart (as after a reboot), wait for the snapshots and compactions to finish (the size on
/// disk unchanged for a minute), then measure idle and under the dashboards' queries.
fn measure(
    cli: &Cli,
    dir: &Path,
    port: u16,
    shipped: bool,
    points: u64,
    write_time: Duration,
) -> anyhow::Result<String> {
    let alerts = alert_queries(&cli.rules)?;
    let mut influx = start(dir, port)?;
    let size = || du(&dir.join("data")) + du(&dir.join("wal"));
    let mut disk = size();
    let mut still = 0;
    let settle = Instant::now();
    while still < 6 && settle.elapsed() < Duration::from_secs(1200) {
        std::thread::sleep(Duration::from_secs(10));
        let now = size();
        still = if now == disk { still + 1 } else { 0 };
        disk = now;
    }
    let idle = status_kb(influx.proc.id(), "VmRSS:");
    // What the Overview's power panel asks at three ranges (Grafana's $__interval for ~1,200
    // points): raw below a minute, the 1-minute aggregates from a minute when they exist.
    let panel = |range: &str, interval: &str, aggregates: bool| {
        if aggregates {
            format!(
                "SELECT mean(\"mean_power_w\") FROM \"minutes\".\"power\" WHERE \"quality\" = 'good' AND time > now() - {range} GROUP BY time({interval}), \"device\", \"channel\" fill(null)"
            )
        } else {
            format!(
                "SELECT mean(\"power_w\") FROM \"power\" WHERE \"quality\" = 'good' AND time > now() - {range} GROUP BY time({interval}), \"device\", \"channel\" fill(null)"
            )
        }
    };
    // The peak from here on: the queries' own, not the start's index loading and compactions.
    let _ = std::fs::write(format!("/proc/{}/clear_refs", influx.proc.id()), "5");
    let mut times = Vec::new();
    for (range, interval) in [("6h", "20s"), ("7d", "10m"), ("30d", "30m")] {
        let q = panel(range, interval, shipped && interval != "20s");
        let t = Instant::now();
        for _ in 0..3 {
            query(port, &q)?;
        }
        times.push(t.elapsed() / 3);
    }
    // Grafana evaluates every rule each minute beside whatever the dashboards ask.
    let t = Instant::now();
    for q in &alerts {
        query(port, q)?;
    }
    let alert_time = t.elapsed();
    let minutes = du(&dir.join("data").join(DB).join("minutes"));
    let peak = status_kb(influx.proc.id(), "VmHWM:");
    influx.proc.terminate(Duration::from_secs(120));
    Ok(format!(
        "| {} | {} | {points} | {:.0} s | {:.0} MB | {:.0} MB | {:.0} MB | {:.0} MB | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
        if shipped {
            "shipped: raw 30 d + 1-minute aggregates"
        } else {
            "one policy, kept for ever"
        },
        cli.days,
        write_time.as_secs_f64(),
        disk as f64 / 1e6,
        minutes as f64 / 1e6,
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        times[0].as_secs_f64(),
        times[1].as_secs_f64(),
        times[2].as_secs_f64(),
        alert_time.as_secs_f64(),
    ))
}

/// A deterministic pseudo-random stream (xorshift), so both setups get the same readings.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        #[allow(clippy::cast_precision_loss)]
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        unit - 0.5
    }
}

/// Round to `step`, as a meter's register or a sensor's resolution would.
fn q(v: f64, step: f64) -> f64 {
    (v / step).round() * step
}

/// The demo's readings from `start_s` to `end_s`, posted in 5,000-line batches.
/// With `live`, each second's readings are posted when that second comes, as influx-writer
/// would (it batches for a second), to every port.
fn write_days(ports: &[u16], start_s: i64, end_s: i64, live: bool) -> anyhow::Result<u64> {
    let mut n = Noise(0x9e37_79b9_7f4a_7c15);
    let mut batch = String::with_capacity(1 << 20);
    let mut lines = 0usize;
    let mut points = 0u64;
    let mut energy = [1_907_000.0_f64, 1_944_000.0];
    let mut ct_import = [0.0_f64; 3];
    let services = [
        "serial-ingest",
        "modbus-ingest",
        "rms-processor",
        "influx-writer",
        "serial-ingest-demo",
        "modbus-ingest-demo",
    ];
    let flush = |batch: &mut String, lines: &mut usize| -> anyhow::Result<()> {
        if *lines == 0 {
            return Ok(());
        }
        for &port in ports {
            let (status, body) = http(
                "POST",
                port,
                &format!("/write?db={DB}&precision=ms"),
                batch.as_bytes(),
            );
            if status != 204 {
                bail!("write: {status} {body}");
            }
        }
        batch.clear();
        *lines = 0;
        Ok(())
    };
    let site = "site=demo";
    for s in start_s..end_s {
        #[allow(clippy::cast_precision_loss)]
        let hour = ((s % 86_400) as f64) / 3600.0;
        // A household's day: low at night, peaks in the morning and evening.
        let load = 300.0
            + 900.0 * (-(hour - 7.5).powi(2) / 2.0).exp()
            + 1500.0 * (-(hour - 19.0).powi(2) / 3.0).exp();
        // Each device's readings arrive with their own jitter (a Modbus answer, a serial line,
        // a timer tick): up to ±30 ms around the second, as influx-writer stamps them. Exact
        // one-second steps would compress far better than anything a Pi records.
        let base = s * 1000 + 120;
        #[allow(clippy::cast_possible_truncation)]
        let ms_of = |n: &mut Noise| base + (n.next() * 60.0) as i64;
        for (i, device) in ["house", "heat-pump"].into_iter().enumerate() {
            let ms = ms_of(&mut n);
            let p = q(load * (0.6 + 0.4 * i as f64) + 40.0 * n.next(), 1.0);
            let v = q(230.0 + 2.0 * n.next(), 0.1);
            let pf = q(0.95 + 0.04 * n.next(), 0.001);
            let a = q(p / (v * pf), 0.001);
            let var = q(p * 0.12 + 5.0 * n.next(), 1.0);
            let f = q(50.0 + 0.05 * n.next(), 0.01);
            let _ = writeln!(
                batch,
                "power,channel=l1,device={device},quality=good,{site} apparent_power_va={},current_a={a},power_factor={pf},power_w={p},reactive_power_var={var},voltage_v={v} {ms}",
                q(p / pf, 1.0)
            );
            let _ = writeln!(
                batch,
                "power,channel=total,device={device},quality=good,{site} apparent_power_va={},frequency_hz={f},power_factor={pf},power_w={p},reactive_power_var={var} {ms}",
                q(p / pf, 1.0)
            );
            lines += 2;
            energy[i] += p / 3600.0;
            if s % 10 == 0 {
                let total = q(energy[i], 10.0);
                let _ = writeln!(
                    batch,
                    "energy,channel=total,device={device},quality=good,{site} energy_wh={total},reactive_energy_varh={} {ms}",
                    q(total * 0.1, 10.0)
                );
                let t1 = q(total * 0.6, 10.0);
                let _ = writeln!(
                    batch,
                    "energy,channel=total,device={device},quality=good,{site},tariff=t1 energy_wh={t1},reactive_energy_varh={} {ms}",
                    q(t1 * 0.1, 10.0)
                );
                let t2 = q(total - t1, 10.0);
                let _ = writeln!(
                    batch,
                    "energy,channel=total,device={device},quality=good,{site},tariff=t2 energy_wh={t2},reactive_energy_varh={} {ms}",
                    q(t2 * 0.1, 10.0)
                );
                for t in ["t3", "t4"] {
                    let _ = writeln!(
                        batch,
                        "energy,channel=total,device={device},quality=good,{site},tariff={t} energy_wh=0,reactive_energy_varh=0 {ms}"
                    );
                }
                lines += 5;
            }
        }
        for (i, device) in ["ct-1", "ct-2", "ct-3"].into_iter().enumerate() {
            let ms = ms_of(&mut n);
            let amps = (load / 230.0) * [0.8, 0.16, 0.4][i] + 0.05 * n.next();
            let va = amps * 230.0;
            if i == 0 {
                let v = 230.0 + 2.0 * n.next();
                let pf = 0.87 + 0.02 * n.next();
                ct_import[0] += va * pf / 3600.0;
                let _ = writeln!(
                    batch,
                    "power,channel=ct1,device={device},power_basis=measured,quality=good,{site} apparent_power_va={va},current_a={amps},energy_export_wh=0,energy_import_wh={},energy_resets=0,power_factor={pf},power_w={},voltage_v={v} {ms}",
                    ct_import[0],
                    va * pf
                );
            } else {
                ct_import[i] += va / 3600.0;
                let _ = writeln!(
                    batch,
                    "power,channel=ct1,device={device},power_basis=nominal_voltage,quality=good,{site} apparent_energy_vah={},apparent_power_va={va},current_a={amps},energy_resets=0,nominal_voltage_v=230 {ms}",
                    ct_import[i]
                );
            }
            lines += 1;
        }
        let powmon_ms = ms_of(&mut n);
        for (i, channel) in ["fridge", "kettle"].into_iter().enumerate() {
            let ms = powmon_ms;
            let on = i == 0 || (s % 3600) < 180;
            let amps = if on {
                q([0.44, 8.7][i] + 0.01 * n.next(), 0.0001)
            } else {
                0.0
            };
            let _ = writeln!(
                batch,
                "current,channel={channel},device=powmon,quality=good,{site} adc_counts={},current_a={amps},power_w={},sensor_v={} {ms}",
                q(512.0 + amps * 14.0, 1.0),
                q(amps * 230.0, 0.1),
                q(amps * 0.066, 0.0001)
            );
            lines += 1;
        }
        if s % 2 == 0 {
            let ms = ms_of(&mut n);
            let _ = writeln!(
                batch,
                "temperature,channel=fridge,device=kitchen,quality=good,{site} temperature_c={} {ms}",
                q(5.0 + 0.6 * n.next(), 0.01)
            );
            let _ = writeln!(
                batch,
                "temperature,channel=freezer,device=kitchen,quality=good,{site} temperature_c={} {ms}",
                q(-19.0 + 0.8 * n.next(), 0.01)
            );
            lines += 2;
        }
        if s % 10 == 0 {
            let ms = ms_of(&mut n);
            let up = (s - start_s) as f64;
            let _ = writeln!(
                batch,
                "modbus_bus,channel=health,device=rs485,quality=good,{site} error_rate=0,errors=0,latency_ms={},reconnects=0,requests={},retries=0,utilisation={} {ms}",
                q(23.0 + 2.0 * n.next(), 0.01),
                up * 2.2,
                q(0.18 + 0.01 * n.next(), 0.0001)
            );
            for device in ["house", "heat-pump"] {
                let _ = writeln!(
                    batch,
                    "modbus_device,channel=health,device={device},quality=good,{site} crc_errors=0,degraded=0,exceptions=0,requests={},retries=0,timeouts=0,wrong_slave=0 {ms}",
                    up * 1.1
                );
            }
            for service in services {
                let ms = ms_of(&mut n);
                let _ = writeln!(
                    batch,
                    "service,channel=status,device={service},quality=good,service={service},{site} dead_letters=0,errors=0,journal_oldest_s=0,journal_records={},received={},replayed=0,sent={},up=1,uptime_s={up} {ms}",
                    q(3.0 + 3.0 * n.next(), 1.0),
                    up * 13.0,
                    up * 7.0
                );
            }
            lines += 9;
        }
        points += 1;
        if live {
            let due = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(s + 1)?);
            if let Ok(wait) = due.duration_since(std::time::SystemTime::now()) {
                std::thread::sleep(wait);
            }
            flush(&mut batch, &mut lines)?;
        } else if lines >= 5000 {
            flush(&mut batch, &mut lines)?;
        }
    }
    flush(&mut batch, &mut lines)?;
    // Seconds written; the points per second are fixed by the shape above.
    let per_s = 2 * 2 + 3 + 2; // power (4), CT (3), PowMon (2)
    Ok(points * per_s + (points / 2) * 2 + (points / 10) * (10 + 9))
}
