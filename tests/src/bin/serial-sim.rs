//! Streaming (`Prime`) serial devices for benchmarks (tests/bench/serial-ingest.sh): one
//! simulator per `--path` (a socat PTY end), each streaming `--channels` channels at
//! `--rate-hz` in lines of `--samples-per-line`, until SIGTERM or SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Context as _;
use clap::Parser;
use simulators::serial::Port;
use simulators::serial::{Prime, PrimeConfig, Waveform, run_prime};

#[derive(Parser, Debug)]
struct Cli {
    /// Device end of a serial port; repeat for several devices.
    #[arg(long = "path", required = true)]
    paths: Vec<String>,
    #[arg(long, default_value_t = 2000)]
    rate_hz: u32,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    #[arg(long, default_value_t = 20)]
    samples_per_line: usize,
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::telemetry::init_logging(&runtime::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    })?;
    let (trigger, shutdown) = runtime::shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, path) in cli.paths.iter().enumerate() {
        let config = PrimeConfig {
            sample_rate_hz: cli.rate_hz,
            samples_per_line: cli.samples_per_line,
            channels: (0..cli.channels)
                .map(|c| Waveform {
                    rms_counts: 80.0 + 20.0 * (i + c) as f64,
                    noise_counts: 2.0,
                    ..Waveform::default()
                })
                .collect(),
            ..PrimeConfig::default()
        };
        let model = Prime::new(config, i as u64, proto::now_ms())
            .with_context(|| format!("simulator for {path}"))?;
        let port = Port::Path {
            path: path.clone(),
            baud: cli.baud,
        };
        let shutdown = shutdown.clone();
        let path = path.clone();
        tasks.spawn(async move {
            run_prime(model, port, shutdown)
                .await
                .with_context(|| format!("simulator on {path}"))
        });
    }
    println!("{{\"running\":{}}}", cli.paths.len());
    tokio::select! {
        _ = runtime::shutdown::fire_on_signal(&trigger) => {}
        Some(done) = tasks.join_next() => {
            // A simulator that ends before we are asked to stop is a broken bench.
            trigger.fire();
            done??;
            anyhow::bail!("a simulator ended before shutdown");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}
