// Test code: a failed setup step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The current-transformer path end to end, with real processes and virtual serial ports:
//! simulated Arduinos on socat PTY pairs → `wattbus run serial-ingest` → our broker →
//! `wattbus run rms-processor` → a sink in this test that acknowledges what it receives.
//!
//! The simulators run inside the test (on a tokio runtime of its own) on the `sim` end of each
//! socat pair; the service opens the `dev` end, as it would open `/dev/ttyACM0`. Killing socat
//! removes both ends at once: to the service and the simulator that is a USB unplug.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{Filter, Measurement, Quality, RawFrame, Sequenced};
use runtime::bus::{Bus, Identity};
use runtime::config::{BusConfig, InboxConfig};
use runtime::delivery::Inbox;
use runtime::shutdown::ShutdownTrigger;
use runtime::{Health, Secret};
use simulators::serial::{
    DriverError, Load, Port, PowMon, PowMonConfig, Prime, PrimeConfig, Waveform, checksum,
    run_powmon, run_prime,
};
use tokio::task::JoinHandle;
use wattbus_e2e::{BrokerSetup, Proc, free_port, wattbus_bin};
use wattbus_testkit::{Socat, seg, wait_until};

/// The site every service config here uses.
const SITE: &str = "lab";
/// The sink group of the test's consumer; the services' streams wait for it.
const SINK: &str = "e2e-sink";

/// A simulated device task; stopped on drop.
struct Sim {
    trigger: ShutdownTrigger,
    task: Option<JoinHandle<Result<(), DriverError>>>,
}

impl Sim {
    fn spawn(
        rt: &tokio::runtime::Runtime,
        run: impl FnOnce(runtime::Shutdown) -> JoinHandle<Result<(), DriverError>>,
    ) -> Sim {
        let (trigger, shutdown) = runtime::shutdown::channel();
        let _guard = rt.enter();
        Sim {
            trigger,
            task: Some(run(shutdown)),
        }
    }

    /// The driver's end, after the device was unplugged: it must have noticed, not hung.
    fn ended(&mut self, rt: &tokio::runtime::Runtime) -> Result<(), DriverError> {
        let task = self.task.take().expect("not ended yet");
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await })
            .expect("the simulator did not notice the unplug within 5 s")
            .expect("simulator task panicked")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.trigger.fire();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Everything a sink received, in arrival order.
type Received<T> = Arc<Mutex<Vec<T>>>;

/// A consumer on our broker: subscribes `filter` as sink group `group`, keeps every message
/// and acknowledges it (so producers that wait for `group` trim their journals).
struct Sink<T> {
    received: Received<T>,
    /// Held so the connection (and with it the subscription) lives as long as the sink.
    _bus: Bus,
    /// Event loop, acknowledgement flusher and collector: aborted on drop.
    tasks: Vec<JoinHandle<()>>,
}

impl<T: Sequenced + Send + 'static> Sink<T> {
    fn start(
        rt: &tokio::runtime::Runtime,
        b: &BrokerSetup,
        filter: &Filter<T>,
        group: &str,
    ) -> Self {
        let _guard = rt.enter();
        let cfg = BusConfig {
            port: b.port,
            username: Some(b.user.clone()),
            password: Some(Secret::new(b.password.clone())),
            reconnect_max_ms: 1000,
            ..BusConfig::default()
        };
        let id = Identity {
            service: seg("e2e"),
            instance: seg(&format!("{group}-test")),
        };
        let (bus, bus_task) = Bus::connect(&cfg, &seg(SITE), &id, &Health::default()).unwrap();
        let (mut inbox, ack_task) = Inbox::<T>::subscribe(
            &bus,
            filter,
            &seg(group),
            &InboxConfig {
                ack_interval_ms: 100,
                ..InboxConfig::default()
            },
        );
        assert!(
            rt.block_on(bus.wait_subscribed(Duration::from_secs(15))),
            "the test's sink could not subscribe on our broker"
        );
        let received: Received<T> = Arc::default();
        let keep = received.clone();
        let collector = rt.spawn(async move {
            let acker = inbox.acker();
            while let Some(d) = inbox.recv().await {
                if let Some(t) = &d.token {
                    acker.ack(t);
                }
                keep.lock().unwrap().push(d.message);
            }
        });
        Sink {
            received,
            _bus: bus,
            tasks: vec![bus_task, ack_task, collector],
        }
    }

    fn snapshot(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.received.lock().unwrap().clone()
    }
}

impl<T> Drop for Sink<T> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A service config on the broker of `b` (whose password file is in `d`): site `lab`, its own
/// data directory `d/<name>`, and `sections` (the service's own).
fn service_config(b: &BrokerSetup, d: &Path, name: &str, sections: &str) -> PathBuf {
    let data = d.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let text = format!(
        "site = \"{SITE}\"\ndata_dir = \"{data}\"\n[log]\nlevel = \"info,serial_ingest=debug,rumqttd=warn\"\n[bus]\nport = {port}\nusername = \"{user}\"\npassword_file = \"{secret}\"\nreconnect_max_ms = 1000\n{sections}\n",
        data = data.display(),
        port = b.port,
        user = b.user,
        secret = d.join("broker-password").display(),
    );
    let path = d.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn run_service(service: &str, config: &Path, log: &Path) -> Proc {
    Proc::spawn(
        service,
        Command::new(wattbus_bin())
            .args(["run", service, "--config"])
            .arg(config),
        log,
    )
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of `name{...device="<device>"...}` in a Prometheus text page (0 if absent).
fn metric(page: &str, name: &str, device: &str) -> f64 {
    let label = format!("device=\"{device}\"");
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_ready(health_port: u16, what: &str, log: &Path) {
    assert!(
        wait_until(Duration::from_secs(20), || http_get(
            health_port,
            "/healthz"
        )
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))),
        "{what} did not become ready; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

fn dump_logs(d: &Path) {
    for entry in std::fs::read_dir(d).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            eprintln!(
                "--- {} ---\n{}",
                entry.path().display(),
                std::fs::read_to_string(entry.path()).unwrap_or_default()
            );
        }
    }
}

/// A one-channel CT clamp at 2 kHz whose AC part has `rms_counts`.
fn prime(rms_counts: f64, seed: u64) -> Prime {
    let config = PrimeConfig {
        channels: vec![Waveform {
            rms_counts,
            // A little noise and a 3rd harmonic, so the RMS is not just a sine's.
            harmonic3: 0.2,
            noise_counts: 2.0,
            ..Waveform::default()
        }],
        ..PrimeConfig::default()
    };
    Prime::new(config, seed, proto::now_ms()).unwrap()
}

/// Amps per ADC count of the CT ports: the sketches README's SCT-013-000 on a 33 Ω burden.
const CT_SCALE: f64 = 5.0 / 1024.0 / 33.0 * 2000.0;

fn within(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= want.abs() * rel
}

#[test]
fn three_streaming_devices_at_once_and_one_unplugged_loses_nothing_on_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio_rt();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let sink = Sink::start(&rt, &b, &Filter::measurements(Some(&seg(SITE)), None), SINK);

    // The processor first, so its subscription is in place before the first frame.
    let rms_health = free_port();
    let rms_config = service_config(
        &b,
        d,
        "rms",
        &format!(
            "[rms_processor]\nhealth_listen = \"127.0.0.1:{rms_health}\"\ninterval_ms = 1000\nmains_hz = 50\n[rms_processor.stream]\nwait_for = [\"{SINK}\"]\nack_timeout_ms = 2000\n"
        ),
    );
    let _rms = run_service("rms-processor", &rms_config, &d.join("rms.log"));
    wait_ready(rms_health, "rms-processor", &d.join("rms.log"));

    let mut socats: Vec<Socat> = (1..=3)
        .map(|n| Socat::start(d, &format!("prime-{n}")))
        .collect();
    let mut ports = String::new();
    for (n, s) in socats.iter().enumerate() {
        ports.push_str(&format!(
            "[[serial_ingest.ports]]\npath = \"{path}\"\ndevice = \"prime-{n}\"\nprotocol = \"stream\"\nreopen_max_ms = 1000\nchannels = [{{ name = \"l1\", unit = \"a\", scale = {CT_SCALE} }}]\n",
            path = s.dev_str(),
            n = n + 1
        ));
    }
    let si_health = free_port();
    let si_config = service_config(
        &b,
        d,
        "serial",
        &format!("[serial_ingest]\nhealth_listen = \"127.0.0.1:{si_health}\"\n{ports}"),
    );
    let si_log = d.join("serial-ingest.log");
    let mut serial = run_service("serial-ingest", &si_config, &si_log);
    // The devices start once the service has their ports open, as a board plugged in before
    // the Pi boots would be read from its first line.
    assert!(
        wait_until(Duration::from_secs(20), || log_count(
            &si_log,
            "Serial port opened."
        ) == 3),
        "serial-ingest did not open its three ports"
    );

    let rms_counts = [150.0, 60.0, 260.0];
    let expected_a: Vec<f64> = rms_counts
        .iter()
        .map(|&c| prime(c, 0).analytic_rms_counts()[0] * CT_SCALE)
        .collect();
    let start_prime = |rt: &tokio::runtime::Runtime, n: usize, s: &Socat, seed: u64| {
        let model = prime(rms_counts[n], seed);
        let path = s.sim_str();
        Sim::spawn(rt, move |sd| {
            tokio::spawn(run_prime(
                model,
                Port::Path {
                    path,
                    baud: 115_200,
                },
                sd,
            ))
        })
    };
    let started_ms = proto::now_ms();
    let mut sims: Vec<Sim> = (0..3)
        .map(|n| start_prime(&rt, n, &socats[n], n as u64 + 1))
        .collect();

    let windows_of = |device: &str| -> Vec<Measurement> {
        let mut v: Vec<Measurement> = sink
            .snapshot()
            .into_iter()
            .filter(|m| m.device.as_str() == device)
            .collect();
        v.sort_by_key(|m| m.ts_ms);
        // A replayed window is the same reading again (same time, same values): keep one.
        v.dedup_by_key(|m| m.ts_ms);
        v
    };
    let progressed = |device: &str, past_ms: i64| {
        windows_of(device)
            .last()
            .is_some_and(|m| m.ts_ms >= past_ms)
    };

    // Four seconds of all three, then device 2 is unplugged for three seconds.
    assert!(
        wait_until(Duration::from_secs(20), || progressed(
            "prime-2",
            started_ms + 4000
        )),
        "no windows of prime-2 in the first seconds"
    );
    let unplugged_ms = proto::now_ms();
    socats[1].kill();
    let end = sims[1].ended(&rt);
    assert!(end.is_err(), "the simulator did not see its port go away");
    // The outage itself (a device unplugged for a while), not a synchronisation.
    std::thread::sleep(Duration::from_secs(3));
    socats[1] = Socat::start(d, "prime-2");
    let replugged_ms = proto::now_ms();
    sims[1] = start_prime(&rt, 1, &socats[1], 22);

    // Five more seconds of all three, device 2 included.
    let end_ms = replugged_ms + 5000;
    let all_done = || {
        ["prime-1", "prime-2", "prime-3"]
            .iter()
            .all(|dev| progressed(dev, end_ms))
    };
    if !wait_until(Duration::from_secs(25), all_done) {
        dump_logs(d);
        panic!(
            "not every device reached {end_ms}: last windows {:?}",
            ["prime-1", "prime-2", "prime-3"].map(|dev| windows_of(dev).last().map(|m| m.ts_ms))
        );
    }
    assert!(serial.is_running(), "serial-ingest exited");
    drop(sims);

    let all = sink.snapshot();
    let bad: Vec<&Measurement> = all.iter().filter(|m| m.quality != Quality::Good).collect();
    assert!(bad.is_empty(), "readings not good: {bad:?}");
    let check_values = |device: &str, want: f64| {
        for m in windows_of(device) {
            let got = m.fields["current_a"];
            if !within(got, want, 0.005) {
                // The logs (resyncs, gaps, reopens) and every reading of the device, to tell
                // a window cut wrong from a device that read wrong.
                dump_logs(d);
                for w in windows_of(device) {
                    eprintln!(
                        "{device} reading at {}: {} A ({:+.3}%)",
                        w.ts_ms,
                        w.fields["current_a"],
                        (w.fields["current_a"] / want - 1.0) * 100.0
                    );
                }
                eprintln!(
                    "started {started_ms}, prime-2 unplugged {unplugged_ms}, replugged {replugged_ms}"
                );
            }
            assert!(
                within(got, want, 0.005),
                "{device} at {}: {got} A, want {want} A (±0.5%)",
                m.ts_ms
            );
        }
    };
    for (n, want) in expected_a.iter().enumerate() {
        check_values(&format!("prime-{}", n + 1), *want);
    }

    // Devices 1 and 3: a reading for every second, from the start to the end, no hole.
    for device in ["prime-1", "prime-3"] {
        let ts: Vec<i64> = windows_of(device).iter().map(|m| m.ts_ms).collect();
        let holes: Vec<(i64, i64)> = ts
            .windows(2)
            .filter(|w| w[1] - w[0] != 1000)
            .map(|w| (w[0], w[1]))
            .collect();
        if !holes.is_empty() {
            dump_logs(d);
        }
        // A resync means the sample clock stayed over 50 ms behind the read time for a second,
        // or ran over 50 ms ahead of it (by design a visible step); lines read late, by a
        // stalled service or from a stalled simulator, are not one. Say which it was.
        let resyncs = std::fs::read_to_string(&si_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("drifted apart") && l.contains(device))
            .count();
        assert!(
            holes.is_empty(),
            "{device}: windows not 1 s apart: {holes:?} (sample clock resyncs: {resyncs})"
        );
        assert!(
            ts[0] <= started_ms + 2500,
            "{device}: first window at {} for a start at {started_ms}",
            ts[0]
        );
        assert!(*ts.last().unwrap() >= end_ms);
        assert!(ts.len() >= 12, "{device}: only {} windows", ts.len());
    }
    // Device 2 came back: readings before the unplug and after the replug.
    let ts2: Vec<i64> = windows_of("prime-2").iter().map(|m| m.ts_ms).collect();
    assert!(
        ts2.iter().filter(|t| **t <= unplugged_ms).count() >= 3,
        "{ts2:?}"
    );
    assert!(
        ts2.iter().filter(|t| **t > replugged_ms).count() >= 4,
        "{ts2:?}"
    );
    // And nothing was invented for the time it was away.
    assert!(
        !ts2.iter()
            .any(|t| *t > unplugged_ms + 1000 && *t < replugged_ms),
        "prime-2 has readings while unplugged: {ts2:?}"
    );
    let page = http_get(si_health, "/metrics").unwrap();
    assert!(metric(&page, "wattbus_serial_port_reopens_total", "prime-2") >= 1.0);
    assert_eq!(
        metric(&page, "wattbus_serial_port_reopens_total", "prime-1"),
        0.0
    );
}

/// `<seq>:<values>*<CS>\n` as docs/serial-protocols.md writes it.
fn stream_line(seq: u16, values: &[i64]) -> String {
    let body = format!(
        "{seq}:{}",
        values
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    format!("{body}*{:02X}\n", checksum(body.as_bytes()))
}

/// Reproducible noise: xorshift64*, so a failure can be replayed byte for byte.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A line of random bytes: never a `\n` inside, and a first byte (0xFF) that is not UTF-8, so
/// it is exactly one garbled line and never a comment or a blank.
fn garbage_line(seed: u64) -> Vec<u8> {
    let mut l = vec![0xFF];
    l.extend(noise(seed, 300).into_iter().filter(|b| *b != b'\n'));
    l.push(b'\n');
    l
}

#[test]
fn hostile_serial_input_never_stops_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio_rt();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let meas = Sink::start(&rt, &b, &Filter::measurements(Some(&seg(SITE)), None), SINK);
    // The test is the rms-processor here: the raw frames wait for that group.
    let raw = Sink::start(
        &rt,
        &b,
        &Filter::raw(Some(&seg(SITE)), None),
        "rms-processor",
    );
    let lines = Socat::start(d, "sensor");
    let stream = Socat::start(d, "prime");
    let health = free_port();
    // 200 Hz and 100 ms frames: one line of 20 samples fills a frame.
    let config = service_config(
        &b,
        d,
        "serial",
        &format!(
            "[serial_ingest]\nhealth_listen = \"127.0.0.1:{health}\"\n[serial_ingest.meas_stream]\nwait_for = [\"{SINK}\"]\nack_timeout_ms = 2000\n\
             [[serial_ingest.ports]]\npath = \"{}\"\ndevice = \"sensor\"\nprotocol = \"lines\"\n\
             [[serial_ingest.ports]]\npath = \"{}\"\ndevice = \"prime\"\nprotocol = \"stream\"\nsample_rate_hz = 200.0\nframe_ms = 100\nchannels = [{{ name = \"l1\", unit = \"a\", scale = 0.5 }}]\n",
            lines.dev_str(),
            stream.dev_str()
        ),
    );
    let log = d.join("serial-ingest.log");
    let mut service = run_service("serial-ingest", &config, &log);
    assert!(
        wait_until(Duration::from_secs(20), || log_count(
            &log,
            "Serial port opened."
        ) == 2),
        "serial-ingest did not open its two ports"
    );

    let mut sensor = lines.sim_file();
    let mut prime = stream.sim_file();
    for seed in 1..=5 {
        sensor.write_all(&garbage_line(seed)).unwrap();
    }
    let mut overlong = vec![b'x'; 10 * 1024];
    overlong.push(b'\n');
    sensor.write_all(&overlong).unwrap();
    sensor.write_all(b"temp=NaN\ntemp=inf\n").unwrap();
    prime.write_all(&garbage_line(99)).unwrap();
    let mut bad_cs = stream_line(7, &[512; 20]);
    let star = bad_cs.find('*').unwrap();
    // A checksum off by one bit: the line a marginal cable delivers.
    let wrong = u8::from_str_radix(&bad_cs[star + 1..star + 3], 16).unwrap() ^ 0x01;
    bad_cs.replace_range(star + 1..star + 3, &format!("{wrong:02X}"));
    prime.write_all(bad_cs.as_bytes()).unwrap();
    // Then a device that behaves.
    sensor.write_all(b"temp=21.5 hum=48\r\n").unwrap();
    let values: Vec<i64> = (1..=20).map(|v| 500 + v).collect();
    prime.write_all(stream_line(8, &values).as_bytes()).unwrap();
    sensor.flush().unwrap();
    prime.flush().unwrap();

    let good_reading = || {
        let got = meas.snapshot();
        let value = |ch: &str| {
            got.iter()
                .find(|m| m.device.as_str() == "sensor" && m.channel.as_str() == ch)
                .map(|m| (m.quality, m.fields.get("value").copied()))
        };
        value("temp") == Some((Quality::Good, Some(21.5)))
            && value("hum") == Some((Quality::Good, Some(48.0)))
    };
    let good_frame = || {
        raw.snapshot().iter().any(|f: &RawFrame| {
            f.device.as_str() == "prime"
                && f.channels[0].samples
                    == values.iter().map(|v| *v as f32 * 0.5).collect::<Vec<_>>()
        })
    };
    if !wait_until(Duration::from_secs(15), || good_reading() && good_frame()) {
        dump_logs(d);
        panic!(
            "the good lines did not come through: readings {:?}, frames {:?}",
            meas.snapshot(),
            raw.snapshot()
        );
    }
    // Nothing of the hostile input became a reading.
    let readings = meas.snapshot();
    assert!(
        readings
            .iter()
            .all(|m| m.channel.as_str() == "temp" || m.channel.as_str() == "hum"),
        "{readings:?}"
    );
    assert!(
        readings
            .iter()
            .all(|m| m.fields.values().all(|v| v.is_finite())),
        "{readings:?}"
    );
    assert!(service.is_running(), "serial-ingest exited");
    let page = http_get(health, "/metrics").unwrap();
    // Five lines of noise, NaN and inf on the lines port; noise and the bad checksum on the
    // stream port; the 10 kB line counted once, as overlong only.
    assert_eq!(
        metric(&page, "wattbus_serial_garbled_lines_total", "sensor"),
        7.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "wattbus_serial_overlong_lines_total", "sensor"),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "wattbus_serial_garbled_lines_total", "prime"),
        2.0,
        "{page}"
    );
    // The ports were never given up on.
    assert_eq!(
        metric(&page, "wattbus_serial_port_errors_total", "sensor"),
        0.0
    );
}

#[test]
fn a_powmon_device_is_polled_and_converted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio_rt();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let meas = Sink::start(&rt, &b, &Filter::measurements(Some(&seg(SITE)), None), SINK);
    let port = Socat::start(d, "powmon");
    let config = service_config(
        &b,
        d,
        "serial",
        &format!(
            "[serial_ingest]\nhealth_listen = \"127.0.0.1:{}\"\n[serial_ingest.meas_stream]\nwait_for = [\"{SINK}\"]\nack_timeout_ms = 2000\n\
             [[serial_ingest.ports]]\npath = \"{}\"\ndevice = \"powmon\"\nprotocol = \"request-response\"\npoll_interval_ms = 300\nresponse_timeout_ms = 250\n\
             channels = [{{ name = \"heater\" }}, {{ name = \"kettle\" }}]\n",
            free_port(),
            port.dev_str()
        ),
    );
    let log = d.join("serial-ingest.log");
    let _service = run_service("serial-ingest", &config, &log);
    let normal_amps = 6.5;
    let model = PowMon::new(PowMonConfig {
        sensors: vec![Load::Constant { amps: normal_amps }, Load::saturated()],
        ..PowMonConfig::default()
    })
    .unwrap();
    let raw_normal = model.raw_for_amps(normal_amps);
    let raw_saturated = model.raw_for_amps(13.9);
    let path = port.sim_str();
    let _sim = Sim::spawn(&rt, move |sd| {
        tokio::spawn(run_powmon(
            model,
            Port::Path {
                path,
                baud: 115_200,
            },
            sd,
        ))
    });

    let latest = |ch: &str| {
        meas.snapshot()
            .into_iter()
            .rfind(|m| m.device.as_str() == "powmon" && m.channel.as_str() == ch)
    };
    if !wait_until(Duration::from_secs(20), || {
        latest("heater").is_some() && latest("kettle").is_some()
    }) {
        dump_logs(d);
        panic!("no PowMon readings");
    }
    // The doc's conversion with the default constants (5 V / 1024, 2.5 V, 0.066 V/A, 230 V).
    let convert = |raw: u16| {
        let volts = f64::from(raw) * (5.0 / 1024.0) - 2.5;
        let amps = volts / 0.066;
        (volts, amps, amps * 230.0)
    };
    let check = |m: &Measurement, raw: u16, quality: Quality| {
        let (volts, amps, watts) = convert(raw);
        assert_eq!(m.quality, quality, "{m:?}");
        assert_eq!(m.measurement.as_str(), "current");
        assert_eq!(m.fields["adc_counts"], f64::from(raw), "{m:?}");
        assert!((m.fields["sensor_v"] - volts).abs() < 1e-9, "{m:?}");
        assert!((m.fields["current_a"] - amps).abs() < 1e-9, "{m:?}");
        assert!((m.fields["power_w"] - watts).abs() < 1e-6, "{m:?}");
    };
    check(&latest("heater").unwrap(), raw_normal, Quality::Good);
    // The doc's table: raw 600 is 6.5104 A, raw 700 is 13.9086 A and out of range.
    assert_eq!((raw_normal, raw_saturated), (600, 700));
    let saturated = latest("kettle").unwrap();
    check(&saturated, raw_saturated, Quality::OutOfRange);
    assert!(
        (saturated.fields["current_a"] - 13.908_617).abs() < 1e-5,
        "a saturated reading keeps its value: {saturated:?}"
    );
    // Polled, not read once: readings keep coming at the poll interval.
    let count = || {
        meas.snapshot()
            .iter()
            .filter(|m| m.channel.as_str() == "heater")
            .count()
    };
    let before = count();
    assert!(wait_until(Duration::from_secs(5), || count() >= before + 5));
}

#[test]
fn a_device_that_never_answers_is_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio_rt();
    let b = BrokerSetup::new(d);
    let _broker = b.start(&d.join("broker.log"));
    let meas = Sink::start(&rt, &b, &Filter::measurements(Some(&seg(SITE)), None), SINK);
    // Nobody on the far end of this one: polls go out, nothing ever answers.
    let mute = Socat::start(d, "mute");
    let lines = Socat::start(d, "sensor");
    let health = free_port();
    let config = service_config(
        &b,
        d,
        "serial",
        &format!(
            "[serial_ingest]\nhealth_listen = \"127.0.0.1:{health}\"\n[serial_ingest.meas_stream]\nwait_for = [\"{SINK}\"]\nack_timeout_ms = 2000\n\
             [[serial_ingest.ports]]\npath = \"{}\"\ndevice = \"mute\"\nprotocol = \"request-response\"\npoll_interval_ms = 200\nresponse_timeout_ms = 100\n\
             [[serial_ingest.ports]]\npath = \"{}\"\ndevice = \"sensor\"\nprotocol = \"lines\"\n",
            mute.dev_str(),
            lines.dev_str()
        ),
    );
    let log = d.join("serial-ingest.log");
    let mut service = run_service("serial-ingest", &config, &log);
    assert!(
        wait_until(Duration::from_secs(20), || log_count(
            &log,
            "Serial port opened."
        ) == 2),
        "serial-ingest did not open its two ports"
    );
    let timeouts = || {
        http_get(health, "/metrics")
            .map_or(0.0, |p| metric(&p, "wattbus_serial_timeouts_total", "mute"))
    };
    // Past max_silent_polls (5): the mute port has been reopened at least once too.
    assert!(
        wait_until(Duration::from_secs(20), || timeouts() >= 8.0),
        "timeouts not counted: {}",
        http_get(health, "/metrics").unwrap_or_default()
    );
    // The other port is read as if nothing were wrong.
    let mut sensor = lines.sim_file();
    for i in 0..5 {
        writeln!(sensor, "temp={}", 20 + i).unwrap();
    }
    let temps = || {
        meas.snapshot()
            .iter()
            .filter(|m| m.device.as_str() == "sensor")
            .map(|m| m.fields["value"])
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || temps()
            == [20.0, 21.0, 22.0, 23.0, 24.0]),
        "sensor readings: {:?}",
        temps()
    );
    assert!(service.is_running(), "serial-ingest exited");
    assert!(
        meas.snapshot().iter().all(|m| m.device.as_str() != "mute"),
        "a reading was invented for a device that never answered"
    );
    let page = http_get(health, "/metrics").unwrap();
    assert!(
        metric(&page, "wattbus_serial_port_reopens_total", "mute") >= 1.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "wattbus_serial_timeouts_total", "sensor"),
        0.0
    );
}
