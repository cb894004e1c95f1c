//! node-health measured (docs/BENCHMARKS.md): the CPU and memory of `wattbus run node-health`
//! at its default rate (a sample every 10 s), as it runs on a node: beside the broker and an
//! influx-writer (files output) that acknowledges its readings, so its journal is trimmed.
//!
//!     cargo build --release -p wattbus -p wattbus-e2e
//!     target/release/node-bench --dir /tmp/node-bench

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use wattbus_e2e::{BrokerSetup, Proc, cpu_seconds, free_port, status_kb, wattbus_bin};

#[derive(Parser)]
struct Cli {
    /// Work directory (emptied first).
    #[arg(long)]
    dir: PathBuf,
    /// Steady-state windows, each this long.
    #[arg(long, default_value_t = 120)]
    window_s: u64,
    #[arg(long, default_value_t = 3)]
    windows: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = std::fs::remove_dir_all(&cli.dir);
    std::fs::create_dir_all(&cli.dir)?;
    let d = &cli.dir;
    let broker = BrokerSetup::new(d);
    let _broker = broker.start(&d.join("broker.log"));
    let config = broker.service_config(d, ["level = \"warn\"", "", ""]);
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!(
        "[influx_writer]\nhealth_listen = \"127.0.0.1:{}\"\n[node_health]\nhealth_listen = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    ));
    std::fs::write(&config, text)?;
    let run = |service: &str| {
        Proc::spawn(
            service,
            Command::new(wattbus_bin())
                .args(["run", service, "--config"])
                .arg(&config),
            &d.join(format!("{service}.log")),
        )
    };
    let mut writer = run("influx-writer");
    let mut health = run("node-health");
    // Settle: its first samples, the journal opened, the writer subscribed.
    std::thread::sleep(Duration::from_secs(15));
    let pid = health.id();
    println!("| window | CPU % of one core | VmRSS MiB | VmHWM MiB |");
    println!("|---|---|---|---|");
    for w in 1..=cli.windows {
        let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(cli.window_s));
        let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
        let rss = status_kb(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
        let hwm = status_kb(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
        println!("| {w} | {cpu:.3} | {rss:.1} | {hwm:.1} |");
    }
    let readings = std::fs::read_dir(d.join("readings"))?
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|t| t.lines().filter(|l| l.contains("node_health")).count())
        .sum::<usize>();
    println!("\nrows of node_health in the writer's files: {readings}");
    health.terminate(Duration::from_secs(10));
    writer.terminate(Duration::from_secs(10));
    Ok(())
}
