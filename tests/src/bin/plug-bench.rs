//! plug-bridge measured (docs/BENCHMARKS.md): its CPU and memory polling 20 simulated plugs
//! (10 myStrom, 10 Shelly) at 1 s, and the time from an HTTP switch request to the answer
//! with the state read back from the plug (median, p99).
//!
//! It runs as the service runs: the broker and `wattbus run plug-bridge` as processes, the
//! plugs (services/simulators, as the vendors document them) served on loopback ports by this
//! process, the switches sent one after another over HTTP with the bearer token.
//!
//!     cargo build --release -p wattbus -p wattbus-e2e
//!     target/release/plug-bench --dir /tmp/plug-bench

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use simulators::plugs::{SimPlug, Vendor};
use wattbus_e2e::servers::http_with;
use wattbus_e2e::{
    BrokerSetup, Proc, cpu_seconds, free_port, port_open, status_kb, wait_until, wattbus_bin,
};

const TOKEN: &str = "plug-bench-token-0123456789";

#[derive(Parser)]
struct Cli {
    /// Work directory (emptied first).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 20)]
    plugs: usize,
    /// Steady-state windows, each this long.
    #[arg(long, default_value_t = 60)]
    window_s: u64,
    #[arg(long, default_value_t = 3)]
    windows: usize,
    /// Switch requests for the latency figures.
    #[arg(long, default_value_t = 500)]
    switches: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = std::fs::remove_dir_all(&cli.dir);
    std::fs::create_dir_all(&cli.dir)?;
    let d = &cli.dir;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut plugs = Vec::new();
    let mut table = String::new();
    for i in 0..cli.plugs {
        let kind = if i % 2 == 0 {
            Vendor::Mystrom
        } else {
            Vendor::Shelly
        };
        let plug = SimPlug::new(kind, 50.0 + i as f64, None);
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        rt.spawn(plug.clone().serve(listener));
        let kind = if i % 2 == 0 { "mystrom" } else { "shelly" };
        table.push_str(&format!(
            "[[plug_bridge.plugs]]\nid = \"plug-{i}\"\nkind = \"{kind}\"\nurl = \"http://127.0.0.1:{port}\"\n"
        ));
        plugs.push(plug);
    }
    let broker = BrokerSetup::new(d);
    let _broker = broker.start(&d.join("broker.log"));
    let path = broker.service_config(d, ["level = \"warn\"", "", ""]);
    let api = free_port();
    std::fs::write(d.join("token"), TOKEN)?;
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str(&format!(
        "[plug_bridge]\nhealth_listen = \"127.0.0.1:{}\"\npoll_ms = 1000\n\
         [plug_bridge.api]\nlisten = \"127.0.0.1:{api}\"\ntoken_file = \"{}\"\n{table}",
        free_port(),
        d.join("token").display()
    ));
    std::fs::write(&path, text)?;
    let mut bridge = Proc::spawn(
        "plug-bridge",
        std::process::Command::new(wattbus_bin())
            .args(["run", "plug-bridge", "--config"])
            .arg(&path),
        &d.join("bridge.log"),
    );
    if !wait_until(Duration::from_secs(30), || port_open(api)) {
        bail!(
            "plug-bridge did not start; see {}",
            d.join("bridge.log").display()
        );
    }
    let pid = bridge.id();
    // Every plug polled at least twice before measuring.
    let polled = wait_until(Duration::from_secs(30), || {
        plugs.iter().all(|p| p.requests() >= 2)
    });
    if !polled {
        bail!("not every plug was polled");
    }
    std::thread::sleep(Duration::from_secs(5));
    println!("| window | polls/s | plug-bridge CPU | RSS / peak |");
    println!("|---|---|---|---|");
    for w in 1..=cli.windows {
        let (cpu0, req0, t0) = (cpu_seconds(pid), total(&plugs), Instant::now());
        std::thread::sleep(Duration::from_secs(cli.window_s));
        let secs = t0.elapsed().as_secs_f64();
        let cpu = (cpu_seconds(pid) - cpu0) / secs * 100.0;
        let rate = (total(&plugs) - req0) as f64 / secs;
        println!(
            "| {w} | {rate:.1} | {cpu:.2}% | {:.1} / {:.1} MiB |",
            mib(status_kb(pid, "VmRSS:")),
            mib(status_kb(pid, "VmHWM:"))
        );
    }
    // Switches, one after another, alternating on and off on every plug in turn.
    let mut took = Vec::with_capacity(cli.switches);
    let auth = format!("Bearer {TOKEN}");
    for n in 0..cli.switches {
        let i = n % cli.plugs;
        let action = if (n / cli.plugs) % 2 == 0 {
            "off"
        } else {
            "on"
        };
        let body = format!("{{\"action\":\"{action}\"}}");
        let t = Instant::now();
        let (status, answer) = http_with(
            "POST",
            api,
            &format!("/api/v1/plugs/plug-{i}/relay"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        );
        took.push(t.elapsed());
        if status != 200 {
            bail!("switch {n}: {status} {answer}");
        }
        let v: serde_json::Value = serde_json::from_str(&answer).context("answer")?;
        if v["relay_on"] != (action == "on") || plugs[i].relay_on() != (action == "on") {
            bail!("switch {n}: the plug is not as asked: {answer}");
        }
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "\n{} switches: median {:.2} ms, p99 {:.2} ms, max {:.2} ms; plug-bridge RSS after {:.1} MiB",
        took.len(),
        at(0.5),
        at(0.99),
        at(1.0),
        mib(status_kb(pid, "VmRSS:"))
    );
    bridge.terminate(Duration::from_secs(10));
    Ok(())
}

fn total(plugs: &[SimPlug]) -> u64 {
    plugs.iter().map(SimPlug::requests).sum()
}

fn mib(kb: Option<u64>) -> f64 {
    kb.unwrap_or(0) as f64 / 1024.0
}
