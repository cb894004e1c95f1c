//! influx-writer's HTTP output measured (docs/BENCHMARKS.md): readings per second into a local
//! endpoint in batches (plain and gzip) side by side with one POST per reading, PowMon's way.
//!
//! The writer's side is the output's own request path — each reading encoded as the spool
//! and the body hold it, the request built, POSTed over a kept-alive connection and its
//! answer sorted — through `influx_writer::post::PostClient`. The endpoint is a minimal
//! HTTP/1.1 server in this process (a thread per connection, answers 200 at once), so the
//! figures are the writer's and the connection's cost, not a backend's.
//!
//!     cargo build --release -p wattbus-e2e --bin http-bench
//!     target/release/http-bench

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use influx_writer::config::{Config, HttpConfig};
use influx_writer::post::PostClient;
use influx_writer::sink::Endpoint as _;
use proto::{Measurement, Origin, Quality, Segment};

#[derive(Parser)]
struct Cli {
    /// Readings sent in batches.
    #[arg(long, default_value_t = 200_000)]
    batched: u64,
    /// Readings sent one per request.
    #[arg(long, default_value_t = 10_000)]
    single: u64,
}

/// What the endpoint received.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

fn serve(conn: TcpStream, counts: Arc<Counts>) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        counts.requests.fetch_add(1, Ordering::Relaxed);
        counts.bytes.fetch_add(len as u64, Ordering::Relaxed);
        out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

fn reading(i: u64) -> anyhow::Result<Measurement> {
    let seg = Segment::new;
    Ok(Measurement {
        origin: Some(Origin {
            producer: seg("modbus-ingest")?,
            stream: seg("meas")?,
            epoch: None,
            seq: i + 1,
        }),
        site: seg("home")?,
        device: Segment::new(format!("we515-{}", i % 10))?,
        channel: seg("main")?,
        measurement: seg("power")?,
        ts_ms: 1_796_000_000_000 + i as i64 * 100,
        quality: Quality::Good,
        fields: [
            ("voltage_v", 230.1),
            ("current_a", 4.37),
            ("power_w", 1003.5),
            ("reactive_power_var", 12.0),
            ("power_factor", 0.99),
            ("frequency_hz", 50.01),
            ("energy_wh", 1_234_567.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v + (i % 7) as f64))
        .collect(),
        tags: Default::default(),
    })
}

async fn run(
    name: &str,
    url: &str,
    config: HttpConfig,
    count: u64,
    counts: &Counts,
) -> anyhow::Result<()> {
    let plan = Config {
        http: Some(HttpConfig {
            url: url.to_string(),
            ..config
        }),
        ..Config::default()
    }
    .resolve("influx_writer")?;
    let target = plan
        .http_target()
        .ok_or_else(|| anyhow::anyhow!("no HTTP target"))?;
    let client = PostClient::new(target, &Segment::new("home")?)?;
    let (max_lines, max_bytes) = client.limits();
    let readings: Vec<Measurement> = (0..count).map(reading).collect::<Result<_, _>>()?;
    let before = (
        counts.requests.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    let mut lines = String::new();
    let mut n = 0;
    for m in &readings {
        client
            .encode(m, &mut lines)
            .map_err(|e| anyhow::anyhow!(e))?;
        lines.push('\n');
        n += 1;
        if n >= max_lines || lines.len() >= max_bytes {
            let outcome = client.write(&lines, n).await;
            anyhow::ensure!(
                outcome == influx_writer::http::WriteOutcome::Written,
                "{outcome:?}"
            );
            lines.clear();
            n = 0;
        }
    }
    if n > 0 {
        let outcome = client.write(&lines, n).await;
        anyhow::ensure!(
            outcome == influx_writer::http::WriteOutcome::Written,
            "{outcome:?}"
        );
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = counts.requests.load(Ordering::Relaxed) - before.0;
    let bytes = counts.bytes.load(Ordering::Relaxed) - before.1;
    println!(
        "| {name} | {count} | {requests} | {:.0} | {:.1} | {:.0} |",
        count as f64 / secs,
        bytes as f64 / count as f64,
        secs * 1e6 / count as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/readings", listener.local_addr()?);
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let c = c.clone();
            std::thread::spawn(move || serve(conn, c));
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "| mode | readings | requests | readings/s | bytes/reading on the wire | µs/reading |"
    );
    println!("|---|---|---|---|---|---|");
    rt.block_on(async {
        run(
            "batches of 1000",
            &url,
            HttpConfig::default(),
            cli.batched,
            &counts,
        )
        .await?;
        run(
            "batches of 1000, gzip",
            &url,
            HttpConfig {
                gzip: true,
                ..HttpConfig::default()
            },
            cli.batched,
            &counts,
        )
        .await?;
        run(
            "one reading per request",
            &url,
            HttpConfig {
                one_per_request: true,
                ..HttpConfig::default()
            },
            cli.single,
            &counts,
        )
        .await
    })
}
