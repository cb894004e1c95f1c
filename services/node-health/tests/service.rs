//! node-health's `run_on` against a real broker (wattbus's own, started in the test), reading
//! a Raspberry Pi's files from a copy of `/proc` and `/sys` in a temporary directory
//! (`proc_root`, `sys_root`): readings out through its journal to a sink, as in production.
//! It logs in as the `producer` user `node-health` (its instances' client ids start with it),
//! and the sink as the sink group `test-sink`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use node_health::{MEASUREMENT, NodeHealth, Plan, identity, run_on};
use proto::{Filter, Measurement, Payload as _, Quality};
use wattbus_testkit::{Role, ServiceBuilder, Sink, TestBroker, counter, eventually, site};

const USER: &str = "node-health";
const SINK: &str = "test-sink";

/// A Pi 4's files, as a copy: `proc/` and `sys/` under one directory.
struct FakePi {
    dir: tempfile::TempDir,
}

impl FakePi {
    fn new() -> FakePi {
        let pi = FakePi {
            dir: tempfile::tempdir().unwrap(),
        };
        pi.write("proc/stat", &stat(0));
        pi.write("proc/loadavg", "0.52 0.58 0.59 1/467 12345\n");
        pi.write(
            "proc/meminfo",
            "MemTotal:        3884328 kB\nMemFree:         2012344 kB\n\
             MemAvailable:    3101204 kB\nSwapTotal:        204796 kB\nSwapFree:         153600 kB\n",
        );
        pi.write("proc/uptime", "350125.61 1379012.33\n");
        pi.write("proc/diskstats", &diskstats(0));
        pi.write("proc/sys/kernel/hostname", "raspberrypi\n");
        pi.write("sys/class/thermal/thermal_zone0/type", "cpu-thermal\n");
        pi.write("sys/class/thermal/thermal_zone0/temp", "48312\n");
        pi.write(
            "sys/devices/platform/soc/soc:firmware/get_throttled",
            "50000\n",
        );
        pi
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn plan(&self) -> Plan {
        let toml = format!(
            "[node_health]\nnode = \"pi-test\"\ninterval_ms = 1000\nblock_device = \"mmcblk0\"\n\
             proc_root = {:?}\nsys_root = {:?}\n",
            self.path("proc"),
            self.path("sys")
        );
        runtime::ConfigSource::from_parts(None, Some(&toml))
            .unwrap()
            .resolve::<NodeHealth>()
            .unwrap()
    }
}

/// `/proc/stat` after `n` seconds at 20 % busy, 5 % iowait (100 ticks a second).
fn stat(n: u64) -> String {
    format!(
        "cpu  {} 1204 {} {} {} 0 1733 0 0 0\ncpu0 1 2 3 4 5 0 0 0 0 0\nintr 1 2 3\n",
        93_842 + 15 * n,
        40_122 + 5 * n,
        5_130_467 + 75 * n,
        8_231 + 5 * n
    )
}

/// `/proc/diskstats` after `n` steps of 2 000 sectors written.
fn diskstats(n: u64) -> String {
    format!(
        " 179 0 mmcblk0 30412 9511 2203442 183320 88213 61233 {} 811632 0 402120 1003144 0 0 0 0 9862 8190\n\
          179 2 mmcblk0p2 29994 8465 2187248 182320 88211 61233 4102086 811632 0 401720 993952 0 0 0 0 0 0\n",
        4_102_088 + 2_000 * n
    )
}

async fn start(
    broker: &TestBroker,
    site: &proto::Segment,
    plan: Plan,
) -> wattbus_testkit::TestService<node_health::Error> {
    ServiceBuilder::new(broker.bus(USER), site, identity(&plan))
        .start(move |bus, ctx| async move { run_on(&bus, &plan, &ctx).await })
        .await
}

/// A broker with the service's user and a sink's, and a sink taking every reading of `site`.
async fn broker_and_sink(site: &proto::Segment) -> (TestBroker, Sink<Measurement>) {
    let broker = TestBroker::start(&[(USER, Role::Producer), (SINK, Role::Sink)]).await;
    let sink = Sink::start(
        &broker,
        site,
        SINK,
        &Filter::<Measurement>::measurements(Some(site), None),
    )
    .await;
    (broker, sink)
}

/// `path` becomes a FIFO nobody writes: opening it blocks, as a stuck read would.
fn hang(path: &std::path::Path) {
    std::fs::remove_file(path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

/// The hung read of `rel` (made by [`hang`]) returns `hung_gets`; from then on the file reads
/// `next`. The FIFO is met by a writer first (the hung open returns), a regular file takes its
/// name, and only then is the hung read given its line: the next sample cannot open the FIFO
/// again.
async fn unhang(pi: &FakePi, rel: &str, hung_gets: &'static str, next: &str) {
    let fifo = pi.path(rel);
    let writer = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().write(true).open(&fifo).unwrap()
    })
    .await
    .unwrap();
    let new = format!("{rel}.new");
    pi.write(&new, next);
    std::fs::rename(pi.path(&new), pi.path(rel)).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        writer.write_all(hung_gets.as_bytes()).unwrap();
    })
    .await
    .unwrap();
}

/// Samples that did not finish in time, so far (process-wide).
fn stuck_count() -> u64 {
    counter(
        "wattbus_errors_total",
        &[("service", "node-health"), ("kind", "stuck")],
    )
}

fn channel(m: &Measurement) -> &str {
    m.channel.as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pi_s_health_reaches_a_sink_as_valid_readings_and_rates_follow_from_the_second_sample() {
    let pi = FakePi::new();
    let site = site("node-health-readings");
    let (broker, mut sink) = broker_and_sink(&site).await;
    let plan = pi.plan();
    assert_eq!(plan.instance.as_str(), "node-health-pi-test");
    let mut svc = start(&broker, &site, plan).await;
    svc.wait_ready().await;

    // The first sample: everything but the rates.
    let first = sink
        .until(Duration::from_secs(10), |got| {
            got.iter().any(|m| channel(m) == "uptime")
        })
        .await;
    let channels: Vec<&str> = first.iter().map(channel).collect();
    assert_eq!(
        channels,
        [
            "load",
            "memory",
            "temperature",
            "throttling",
            "disk",
            "uptime"
        ]
    );
    let disk = first.iter().find(|m| channel(m) == "disk").unwrap();
    assert!(!disk.fields.contains_key("disk_write_bytes_per_s"));
    assert!(disk.fields["disk_total_bytes"] > 0.0);

    // A second later the counters have moved: CPU use and the write rate appear.
    pi.write("proc/stat", &stat(1));
    pi.write("proc/diskstats", &diskstats(1));
    let wrote = |m: &Measurement| {
        channel(m) == "disk"
            && m.fields
                .get("disk_write_bytes_per_s")
                .is_some_and(|r| *r > 0.0)
    };
    let more = sink
        .until(Duration::from_secs(10), |got| got.iter().any(wrote))
        .await;
    let cpu = more.iter().find(|m| channel(m) == "cpu").unwrap();
    assert!((cpu.fields["cpu_use_pct"] - 20.0).abs() < 1e-9, "{cpu:?}");
    assert!((cpu.fields["cpu_iowait_pct"] - 5.0).abs() < 1e-9, "{cpu:?}");
    let disk = more.iter().find(|m| wrote(m)).unwrap();
    // 1 024 000 bytes over about a second (the ticks' own timing).
    let rate = disk.fields["disk_write_bytes_per_s"];
    assert!((500_000.0..2_000_000.0).contains(&rate), "{disk:?}");

    for m in first.iter().chain(&more) {
        m.validate().unwrap();
        assert_eq!(m.device.as_str(), "pi-test");
        assert_eq!(m.site, site);
        assert_eq!(m.measurement.as_str(), MEASUREMENT);
        assert_eq!(m.quality, Quality::Good);
        assert_eq!(m.implausible().count(), 0, "{m:?}");
        assert_eq!(
            m.origin.as_ref().unwrap().producer.as_str(),
            "node-health-pi-test"
        );
    }
    let t = first.iter().find(|m| channel(m) == "throttling").unwrap();
    assert_eq!(t.fields["under_voltage_occurred"], 1.0);
    assert_eq!(t.fields["throttled_occurred"], 1.0);
    assert_eq!(t.fields["under_voltage_now"], 0.0);
    assert_eq!(t.fields["throttled_flags"], f64::from(0x50000u32));
    let temp = first.iter().find(|m| channel(m) == "temperature").unwrap();
    assert_eq!(temp.fields["cpu_temperature_c"], 48.312);

    svc.stop().await;
    sink.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_fails_is_left_out_counted_and_comes_back() {
    let pi = FakePi::new();
    let site = site("node-health-failing");
    let (broker, mut sink) = broker_and_sink(&site).await;
    let errors = || {
        counter(
            "wattbus_errors_total",
            &[("service", "node-health"), ("kind", "source")],
        )
    };
    let before = errors();
    std::fs::remove_file(pi.path("proc/meminfo")).unwrap();
    pi.write("sys/class/thermal/thermal_zone0/temp", "garbage\n");
    let mut svc = start(&broker, &site, pi.plan()).await;
    svc.wait_ready().await;
    // Two samples: neither has memory; the zone answered garbage at start, so there is no
    // readable zone and the temperature is left out as not available.
    let got = sink
        .until(Duration::from_secs(10), |got| {
            got.iter().filter(|m| channel(m) == "uptime").count() >= 2
        })
        .await;
    assert!(
        got.iter()
            .all(|m| channel(m) != "memory" && channel(m) != "temperature")
    );
    assert!(got.iter().all(|m| m.fields.values().all(|v| v.is_finite())));
    assert!(errors() >= before + 2, "{} → {}", before, errors());

    // It reads again: memory is back.
    pi.write(
        "proc/meminfo",
        "MemTotal: 1000 kB\nMemAvailable: 250 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n",
    );
    let back = sink
        .until(Duration::from_secs(10), |got| {
            got.iter().any(|m| channel(m) == "memory")
        })
        .await;
    let mem = back.iter().find(|m| channel(m) == "memory").unwrap();
    assert_eq!(mem.fields["mem_used_pct"], 75.0);
    svc.stop().await;
    sink.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_hangs_skips_samples_and_makes_the_service_unready_until_it_returns() {
    let pi = FakePi::new();
    let site = site("node-health-hanging");
    let (broker, mut sink) = broker_and_sink(&site).await;
    let mut svc = start(&broker, &site, pi.plan()).await;
    svc.wait_ready().await;
    sink.until(Duration::from_secs(10), |got| {
        got.iter().any(|m| channel(m) == "uptime")
    })
    .await;

    // /proc/loadavg becomes a FIFO nobody writes: opening it blocks, as a stuck read would.
    let fifo = pi.path("proc/loadavg");
    hang(&fifo);
    let before = stuck_count();
    assert!(
        eventually(Duration::from_secs(10), async || stuck_count() > before
            && !svc.health().is_ready())
        .await,
        "a hanging read was not noticed"
    );
    // Nothing is published meanwhile (what was on its way is drained first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    while sink.try_next().is_some() {}
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(sink.try_next().is_none(), "readings while a sample hangs");
    assert!(!svc.health().is_ready());

    // The read returns.
    unhang(
        &pi,
        "proc/loadavg",
        "0.1 0.2 0.3 1/1 1\n",
        "0.7 0.6 0.5 1/1 1\n",
    )
    .await;
    let resumed = sink
        .until(Duration::from_secs(10), |got| {
            got.iter().any(|m| channel(m) == "load")
        })
        .await;
    let load = resumed.iter().find(|m| channel(m) == "load").unwrap();
    // The hung sample's own reading is stale and dropped: the next one is published.
    assert_eq!(load.fields["load_1m"], 0.7);
    assert!(svc.health().is_ready());
    svc.stop().await;
    sink.close().await;
}

/// A thermal zone whose read hangs while the sources are found at start: the service says so
/// as for a hang later (not ready, an ERROR, `stuck` counted), never a silent service that
/// looks ready; once the read returns, readings flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_hangs_at_start_is_seen_not_silent() {
    let pi = FakePi::new();
    let site = site("node-health-hanging-start");
    let (broker, mut sink) = broker_and_sink(&site).await;
    let fifo = pi.path("sys/class/thermal/thermal_zone0/temp");
    hang(&fifo);
    let before = stuck_count();
    let svc = start(&broker, &site, pi.plan()).await;
    assert!(
        eventually(Duration::from_secs(10), async || stuck_count() > before
            && !svc.health().is_ready())
        .await,
        "a read hanging at start went unnoticed"
    );
    // The zone answers: the service finds its sources and publishes.
    unhang(
        &pi,
        "sys/class/thermal/thermal_zone0/temp",
        "47000\n",
        "47000\n",
    )
    .await;
    let got = sink
        .until(Duration::from_secs(10), |got| {
            got.iter().any(|m| channel(m) == "uptime")
        })
        .await;
    assert!(got.iter().any(|m| channel(m) == "uptime"));
    assert!(
        eventually(Duration::from_secs(10), async || svc.health().is_ready()).await,
        "not ready after the read returned"
    );
    svc.stop().await;
    sink.close().await;
}
