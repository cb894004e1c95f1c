//! influx-writer's HTTP output end to end: real processes (broker, probe producer, writer) and
//! a user's backend, a small Python server (tests/http/receiver.py) that can be told to fail,
//! refuses a wrong token, and refuses readings it does not take with a 400.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use wattbus_e2e::receiver::{Receiver, TOKEN, writer, writer_config};
use wattbus_e2e::servers::metric;
use wattbus_e2e::{BrokerSetup, Proc, wait_until, wattbus_bin};

const SPOOL: &str = "wattbus_journal_records{service=\"influx-writer\",stream=\"http-spool\"}";

/// `count` readings at `rate`/s from a probe producer that waits for the writer's
/// acknowledgements; reading `i` is stamped `base + i` and carries `reading_n = i`.
fn produce(broker: &BrokerSetup, dir: &Path, count: u64, rate: u64, extra: &[&str]) -> Proc {
    Proc::spawn(
        "probe",
        Command::new(wattbus_bin().with_file_name("probe"))
            .args([
                "--port",
                &broker.port.to_string(),
                "--password",
                &broker.password,
            ])
            .args(["--site", "lab", "--data-dir"])
            .arg(dir.join("probe"))
            .args([
                "produce",
                "--count",
                &count.to_string(),
                "--rate",
                &rate.to_string(),
                "--wait-for",
                "influx-writer",
                "--ack-timeout-ms",
                "1000",
            ])
            .args(extra),
        &dir.join("probe.log"),
    )
}

/// A broker, the receiver answering `mode`, and the writer's config for it (`token`, `extra`
/// keys): the prologue of most tests here.
struct Setup {
    rx: Receiver,
    broker: BrokerSetup,
    cfg: PathBuf,
    health: u16,
    log: PathBuf,
    _broker: Proc,
    // Last: removed after the processes that use it.
    dir: tempfile::TempDir,
}

impl Setup {
    fn start(mode: &str, token: &str, extra: &str) -> Setup {
        let (dir, broker, proc) = world();
        let d = dir.path();
        let rx = Receiver::start(d, None);
        if mode != "ok" {
            rx.mode(mode);
        }
        let url = format!("http://127.0.0.1:{}/in", rx.port);
        let (cfg, health) = writer_config(&broker, d, &url, token, extra);
        Setup {
            rx,
            broker,
            cfg,
            health,
            log: d.join("writer.log"),
            _broker: proc,
            dir,
        }
    }

    /// Replace `from` with `to` in the writer's config (before the writer starts).
    fn set(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.cfg).unwrap();
        assert!(
            text.contains(from),
            "{from:?} is not in the writer's config"
        );
        std::fs::write(&self.cfg, text.replace(from, to)).unwrap();
    }
}

/// `n` distinct readings arrive at `rx` within `within` (`when`: under what condition, for the
/// failure message with the writer's `log`).
fn arrive(rx: &Receiver, n: u64, within: Duration, log: &Path, when: &str) {
    assert!(
        wait_until(within, || rx.identities().len() as u64 == n),
        "{} of {n} readings arrived {when}; writer log:\n{}",
        rx.identities().len(),
        read(log)
    );
}

/// The dead letters the writer of `d` kept.
fn dead_letters(d: &Path) -> Vec<serde_json::Value> {
    read(&d.join("influx-writer").join("dead-letters.jsonl"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A test's world: its directory, a broker and (not yet started) nothing else.
fn world() -> (tempfile::TempDir, BrokerSetup, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerSetup::new(dir.path());
    let proc = broker.start(&dir.path().join("broker.log"));
    (dir, broker, proc)
}

/// The probe in `d` ends with every reading acknowledged (stored, or spooled) in `within`.
fn all_acknowledged(producer: &mut Proc, d: &Path, within: Duration, writer_log: &Path) {
    let status = producer.wait(within);
    assert!(
        status.is_some_and(|s| s.success()),
        "the producer's readings were not all acknowledged; its log:\n{}\nwriter log:\n{}",
        read(&d.join("probe.log")),
        read(writer_log)
    );
}

/// A directory for one more writer on the broker of `d` (its service config reads the
/// broker's password from its own directory).
fn subdir(d: &Path, name: &str) -> PathBuf {
    let sub = d.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(d.join("broker-password"), sub.join("broker-password")).unwrap();
    sub
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Every reading stored holds the value its producer sent: `reading_n` is its number, and
/// its time is the probe's base plus that number.
fn assert_values_right(received: &[serde_json::Value]) -> i64 {
    let base = received
        .iter()
        .map(|r| r["ts_ms"].as_i64().unwrap() - r["fields"]["reading_n"].as_f64().unwrap() as i64)
        .next()
        .unwrap();
    for r in received {
        let n = r["fields"]["reading_n"].as_f64().unwrap() as i64;
        assert_eq!(r["ts_ms"].as_i64().unwrap(), base + n, "{r}");
        assert_eq!(r["device"], "probe-dev", "{r}");
        assert_eq!(r["quality"], "good", "{r}");
        assert!(r["origin"]["seq"].as_u64().is_some(), "no origin: {r}");
    }
    base
}

/// Readings flow while the backend answers 503, then is gone altogether (connection
/// refused), and the writer is killed with -9 twice in between: once the backend is back,
/// every reading has arrived — exactly once after dedup by identity and time — and the
/// spool is empty.
#[test]
fn readings_reach_the_endpoint_exactly_once_through_an_outage_and_kill_9() {
    let (dir, broker, _broker) = world();
    let d = dir.path();
    let mut rx = Receiver::start(d, None);
    let url = format!("http://127.0.0.1:{}/api/readings?source=wattbus", rx.port);
    let (cfg, health) = writer_config(&broker, d, &url, TOKEN, "max_readings = 50");
    let log = d.join("writer.log");
    let mut w = writer(&cfg, &log);
    let count = 3000;
    let mut producer = produce(&broker, d, count, 150, &[]);

    assert!(
        wait_until(Duration::from_secs(60), || rx.received().len() >= 100),
        "no readings reached the endpoint; writer log:\n{}",
        read(&log)
    );
    // The backend answers 503: readings go to the spool.
    rx.mode("503");
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, SPOOL)
            .is_some_and(|n| n >= 5.0)),
        "the spool did not fill while the endpoint answered 503; writer log:\n{}",
        read(&log)
    );
    w.kill9();
    w = writer(&cfg, &log);
    // Gone altogether: connections refused.
    rx.stop();
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, SPOOL)
            .is_some_and(|n| n >= 10.0)),
        "the restarted writer did not go on spooling; its log:\n{}",
        read(&log)
    );
    w.kill9();
    w = writer(&cfg, &log);
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, SPOOL)
            .is_some_and(|n| n >= 10.0)),
        "the writer did not come back up; its log:\n{}",
        read(&log)
    );
    rx.restart();
    all_acknowledged(&mut producer, d, Duration::from_secs(180), &log);
    arrive(&rx, count, Duration::from_secs(120), &log, "");
    assert!(
        wait_until(Duration::from_secs(60), || metric(health, SPOOL)
            == Some(0.0)),
        "the spool kept readings the endpoint has"
    );
    let received = rx.received();
    let base = assert_values_right(&received);
    let ids = rx.identities();
    let times: Vec<i64> = ids.keys().map(|k| k.4).collect();
    assert_eq!(
        times,
        (0..count as i64).map(|i| base + i).collect::<Vec<_>>()
    );
    // Batches: far fewer requests than readings, none above max_readings.
    let stats = rx.stats();
    assert!(
        stats["by_status"]["200"].as_u64().unwrap() * 10 < count,
        "{stats}"
    );
    // The outage was seen and said once, and the token never appears in the log.
    let text = read(&log);
    assert!(
        text.contains("The HTTP endpoint cannot take writes"),
        "{text}"
    );
    assert!(!text.contains(TOKEN), "the token is in the log:\n{text}");
    w.terminate(Duration::from_secs(10));
}

/// A reading the backend refuses (400) is dead-lettered with the backend's message, and the
/// rest of its batch arrives.
#[test]
fn a_reading_the_endpoint_refuses_is_dead_lettered_with_its_answer_and_the_rest_arrive() {
    let s = Setup::start("ok", TOKEN, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let mut w = writer(&s.cfg, log);
    let count = 1000;
    let mut producer = produce(broker, d, count, 0, &["--odd-at", "437"]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    arrive(rx, count - 1, Duration::from_secs(60), log, "");
    let received = rx.received();
    let base = assert_values_right(&received);
    assert!(
        !rx.identities().keys().any(|k| k.4 == base + 437),
        "the refused reading was stored"
    );
    // In the dead-letter file, with what the backend said.
    let letters = dead_letters(d);
    let dead = format!("{letters:?}");
    assert_eq!(letters.len(), 1, "{dead}");
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("400") && reason.contains("measurement odd is not accepted by this API"),
        "{reason}"
    );
    let payload: serde_json::Value =
        serde_json::from_str(letters[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload["measurement"], "odd", "{dead}");
    assert_eq!(payload["ts_ms"].as_i64().unwrap(), base + 437, "{dead}");
    // And an ERROR in the log saying so.
    let text = read(log);
    assert!(
        text.contains("ERROR") && text.contains("measurement odd is not accepted by this API"),
        "{text}"
    );
    w.terminate(Duration::from_secs(10));
}

/// A wrong token: the backend answers 401, the writer says which setting to check in an
/// ERROR, and the readings wait in the spool — acknowledged to their producer, never
/// dead-lettered. With the token fixed and the writer restarted, they all arrive.
#[test]
fn a_wrong_token_is_a_clear_error_and_the_readings_wait_for_the_right_one() {
    let wrong = "not-the-token-of-the-backend";
    let s = Setup::start("ok", wrong, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let health = s.health;
    let mut w = writer(&s.cfg, log);
    let count = 300;
    let mut producer = produce(broker, d, count, 0, &[]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    assert!(
        wait_until(Duration::from_secs(30), || read(log)
            .contains("refused the writer's credentials")),
        "no error about the credentials; writer log:\n{}",
        read(log)
    );
    let text = read(log);
    let line = text
        .lines()
        .find(|l| l.contains("refused the writer's credentials"))
        .unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("401"), "{line}");
    assert!(line.contains("influx_writer.http.token"), "{line}");
    assert!(!text.contains(wrong), "the token is in the log:\n{text}");
    assert!(rx.received().is_empty());
    assert!(
        metric(health, SPOOL).is_some_and(|n| n >= 1.0),
        "the readings are not in the spool"
    );
    assert!(!d.join("influx-writer").join("dead-letters.jsonl").exists());

    w.terminate(Duration::from_secs(10));
    std::fs::write(d.join("http-token"), TOKEN).unwrap();
    let mut w = writer(&s.cfg, log);
    arrive(
        rx,
        count,
        Duration::from_secs(60),
        log,
        "after the token was fixed",
    );
    assert_values_right(&rx.received());
    w.terminate(Duration::from_secs(10));
}

/// HTTPS to a backend whose certificate a private CA signed (`ca_file`), gzip bodies; and a
/// second writer that sends one reading per request.
#[test]
fn tls_with_a_private_ca_gzip_and_one_reading_per_request() {
    let (dir, broker, _broker) = world();
    let d = dir.path();
    let certs = d.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    wattbus_e2e::iothub::certificates(&certs);

    // HTTPS, gzip, the private CA.
    let tls_dir = subdir(d, "tls");
    let rx = Receiver::start(
        &tls_dir,
        Some((certs.join("hub.pem"), certs.join("hub.key"))),
    );
    let url = format!("https://localhost:{}/in", rx.port);
    let (cfg, _) = writer_config(
        &broker,
        &tls_dir,
        &url,
        TOKEN,
        &format!(
            "gzip = true\nca_file = \"{}\"",
            certs.join("ca.pem").display()
        ),
    );
    let log = tls_dir.join("writer.log");
    let mut w = writer(&cfg, &log);
    let mut producer = produce(&broker, &tls_dir, 500, 0, &[]);
    all_acknowledged(&mut producer, &tls_dir, Duration::from_secs(120), &log);
    assert!(
        wait_until(Duration::from_secs(60), || rx.identities().len() == 500),
        "{} of 500 over HTTPS; writer log:\n{}",
        rx.identities().len(),
        read(&log)
    );
    assert_values_right(&rx.received());
    w.terminate(Duration::from_secs(10));

    // Without the CA the same endpoint is not trusted: an error, nothing sent.
    let untrusted = subdir(d, "untrusted");
    let (cfg, health) = writer_config(&broker, &untrusted, &url, TOKEN, "");
    let log = untrusted.join("writer.log");
    let mut w = writer(&cfg, &log);
    let mut producer = produce(&broker, &untrusted, 20, 0, &[]);
    all_acknowledged(&mut producer, &untrusted, Duration::from_secs(120), &log);
    assert!(
        wait_until(Duration::from_secs(30), || metric(health, SPOOL)
            .is_some_and(|n| n >= 1.0)),
        "an untrusted certificate did not keep the readings in the spool; log:\n{}",
        read(&log)
    );
    assert!(
        read(&log).to_lowercase().contains("certificate"),
        "{}",
        read(&log)
    );
    w.terminate(Duration::from_secs(10));
    let stats = rx.stats();
    assert!(stats["gzip"].as_u64().unwrap() >= 1, "{stats}");

    // One reading per request, the body the reading itself.
    let single_dir = subdir(d, "single");
    let rx = Receiver::start(&single_dir, None);
    let url = format!("http://127.0.0.1:{}/in", rx.port);
    let (cfg, _) = writer_config(&broker, &single_dir, &url, TOKEN, "one_per_request = true");
    let log = single_dir.join("writer.log");
    let mut w = writer(&cfg, &log);
    let mut producer = produce(&broker, &single_dir, 40, 0, &[]);
    all_acknowledged(&mut producer, &single_dir, Duration::from_secs(120), &log);
    assert!(
        wait_until(Duration::from_secs(60), || rx.identities().len() == 40),
        "{} of 40 one per request; log:\n{}",
        rx.identities().len(),
        read(&log)
    );
    let stats = rx.stats();
    assert_eq!(stats["requests"].as_u64().unwrap(), 40, "{stats}");
    w.terminate(Duration::from_secs(10));
}

/// An endpoint (or a proxy before it) that refuses every request with a 400 — a changed API,
/// gzip it cannot read: nothing is dead-lettered, the writer says what to check, and the
/// readings wait; once the endpoint takes them again, every one arrives.
#[test]
fn an_endpoint_refusing_everything_loses_nothing_and_says_what_to_check() {
    let s = Setup::start("400all", TOKEN, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let health = s.health;
    let mut w = writer(&s.cfg, log);
    let count = 300;
    let mut producer = produce(broker, d, count, 0, &[]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    assert!(
        wait_until(Duration::from_secs(30), || read(log)
            .contains("refuses every reading")
            || read(log).contains("took none of")),
        "no error saying the endpoint refuses everything; log:\n{}",
        read(log)
    );
    assert!(
        metric(health, SPOOL).is_some_and(|n| n >= 1.0),
        "the readings are not in the spool"
    );
    assert!(
        !d.join("influx-writer").join("dead-letters.jsonl").exists(),
        "readings were dead-lettered: {}",
        read(&d.join("influx-writer").join("dead-letters.jsonl"))
    );
    rx.mode("ok");
    arrive(
        rx,
        count,
        Duration::from_secs(60),
        log,
        "once the endpoint took them",
    );
    assert_values_right(&rx.received());
    assert!(!d.join("influx-writer").join("dead-letters.jsonl").exists());
    w.terminate(Duration::from_secs(10));
}

/// A busy endpoint that says when to come back (429 with `Retry-After: 4`): the writer waits
/// that long rather than its own shorter backoff (from 100 ms), the readings
/// wait in the spool, and every one arrives once the endpoint takes them.
#[test]
fn a_busy_endpoint_s_retry_after_is_obeyed_and_nothing_is_lost() {
    let s = Setup::start("429wait", TOKEN, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    // Retry-After is obeyed up to retry_max_ms: 10 s here, above the 4 s asked.
    s.set("retry_max_ms = 1000", "retry_max_ms = 10000");
    let mut w = writer(&s.cfg, log);
    let count = 200;
    let mut producer = produce(broker, d, count, 0, &[]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    let waits = || -> Vec<u64> {
        read(log)
            .lines()
            .filter(|l| l.contains("cannot take writes"))
            .filter_map(|l| l.split("retry_in_ms=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || !waits().is_empty()),
        "no WARN that the endpoint cannot take writes; log:\n{}",
        read(log)
    );
    assert!(
        waits().iter().all(|ms| *ms > 3_500),
        "the writer did not wait the 4 s the endpoint asked for: {:?}",
        waits()
    );
    rx.mode("ok");
    arrive(
        rx,
        count,
        Duration::from_secs(60),
        log,
        "once the endpoint took them",
    );
    assert_values_right(&rx.received());
    w.terminate(Duration::from_secs(10));
}

/// An endpoint that accepts connections and never answers, with a long request timeout: the
/// writer stops at once when asked (it does not wait out the request), spools what it had,
/// and after a restart every reading arrives.
#[test]
fn a_writer_stops_at_once_while_its_endpoint_hangs_and_loses_nothing() {
    let s = Setup::start("hang", TOKEN, "timeout_ms = 60000");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let mut w = writer(&s.cfg, log);
    let count = 100;
    let mut producer = produce(broker, d, count, 0, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || rx.stats()["requests"]
            .as_u64()
            .unwrap_or(0)
            > 0),
        "no request reached the endpoint; log:\n{}",
        read(log)
    );
    let status = w.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the writer did not stop cleanly ({status:?}); log:\n{}",
        read(log)
    );
    assert!(
        !read(log).contains("grace period"),
        "the writer waited out the hanging request; log:\n{}",
        read(log)
    );
    rx.mode("ok");
    let mut w = writer(&s.cfg, log);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    arrive(rx, count, Duration::from_secs(60), log, "after the restart");
    assert_values_right(&rx.received());
    w.terminate(Duration::from_secs(10));
}

/// An API that refuses readings too old for it, after an outage: the spool's head is a run of
/// refused readings longer than a round (batch_points 100 here), and new readings keep coming
/// (they are spooled behind it while the writer backs off). The old ones are dead-lettered with
/// the API's answer and the new ones arrive: the spool does not stall behind its head.
#[test]
fn a_run_of_refused_readings_at_the_spool_head_does_not_hold_back_the_rest() {
    let s = Setup::start("503", TOKEN, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    s.set(
        "flush_interval_ms = 100",
        "flush_interval_ms = 100\nbatch_points = 100",
    );
    let mut w = writer(&s.cfg, log);
    // 300 readings stamped on a day in 2025, spooled while the endpoint is down.
    let old = 300;
    let mut producer = produce(broker, d, old, 0, &[]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    // The API is back, and takes nothing stamped before now; new readings keep coming.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    rx.mode(&format!("400before:{now_ms}"));
    let new = 100;
    std::fs::create_dir_all(d.join("fresh")).unwrap();
    let mut fresh = produce(
        broker,
        &d.join("fresh"),
        new,
        20,
        &["--instance", "probe-fresh", "--base-ts-ms", "now"],
    );
    all_acknowledged(&mut fresh, &d.join("fresh"), Duration::from_secs(120), log);
    arrive(rx, new, Duration::from_secs(120), log, "(the new ones)");
    assert!(
        wait_until(Duration::from_secs(120), || dead_letters(d).len() as u64
            >= old),
        "{} of the {old} refused readings dead-lettered; log:\n{}",
        dead_letters(d).len(),
        read(log)
    );
    let dead = dead_letters(d);
    assert!(
        dead.iter()
            .all(|l| l["reason"].as_str().unwrap_or("").contains("too old")),
        "{dead:?}"
    );
    assert!(
        rx.received()
            .iter()
            .all(|r| r["ts_ms"].as_u64().unwrap() as u128 >= now_ms)
    );
    w.terminate(Duration::from_secs(10));
}

/// One reading the backend fails on (a 500 for any request holding it, a bug in the
/// backend): after a few failed rounds the writer finds it by splitting, keeps it in the spool
/// (a 5xx is never a reason to drop a reading) with an ERROR naming it, and every other reading
/// arrives — the output does not stop behind it.
#[test]
fn a_reading_the_endpoint_fails_on_is_held_and_the_rest_flow() {
    let s = Setup::start("500odd", TOKEN, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let health = s.health;
    let mut w = writer(&s.cfg, log);
    let count = 600;
    let mut producer = produce(broker, d, count, 100, &["--odd-at", "50"]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    arrive(rx, count - 1, Duration::from_secs(120), log, "");
    let base = assert_values_right(&rx.received());
    assert!(!rx.identities().keys().any(|k| k.4 == base + 50));
    assert!(
        wait_until(Duration::from_secs(30), || read(log)
            .contains("fails on this reading alone")),
        "no ERROR naming the reading; log:\n{}",
        read(log)
    );
    // Held, not dropped: in the spool, not a dead letter.
    assert!(dead_letters(d).is_empty());
    assert!(metric(health, SPOOL).is_some_and(|n| n >= 1.0));
    // The backend fixed: it arrives too.
    rx.mode("takeall");
    arrive(
        rx,
        count,
        Duration::from_secs(120),
        log,
        "(the held one among them) once the endpoint took it",
    );
    w.terminate(Duration::from_secs(10));
}

/// An endpoint that takes readings and then, mid-stream, refuses every request (an API
/// deployed that expects something else), one reading per request: nothing is dead-lettered;
/// the readings wait. And a load balancer with one backend down (every second request 502):
/// every reading arrives, none is dropped.
#[test]
fn an_endpoint_changing_or_flaky_mid_stream_dead_letters_nothing() {
    let s = Setup::start("okthen400:40", TOKEN, "one_per_request = true");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let mut w = writer(&s.cfg, log);
    let count = 300;
    let mut producer = produce(broker, d, count, 0, &[]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    assert!(
        wait_until(Duration::from_secs(30), || read(log)
            .contains("refuses every reading")),
        "no error saying the endpoint refuses everything; log:\n{}",
        read(log)
    );
    assert_eq!(rx.identities().len(), 40);
    assert!(dead_letters(d).is_empty(), "{:?}", dead_letters(d));
    rx.mode("alt502");
    arrive(
        rx,
        count,
        Duration::from_secs(120),
        log,
        "through the flaky endpoint",
    );
    assert!(dead_letters(d).is_empty(), "{:?}", dead_letters(d));
    w.terminate(Duration::from_secs(10));
}

/// An error answer whose body never ends is read only as far as its message: the writer's
/// memory stays small (it grew by gigabytes in seconds when the whole body was read).
#[test]
fn an_error_answer_without_end_does_not_fill_the_memory() {
    let s = Setup::start("400flood", TOKEN, "");
    let (d, broker, rx, log) = (s.dir.path(), &s.broker, &s.rx, &s.log);
    let mut w = writer(&s.cfg, log);
    let mut producer = produce(broker, d, 50, 0, &[]);
    all_acknowledged(&mut producer, d, Duration::from_secs(120), log);
    assert!(
        wait_until(Duration::from_secs(60), || rx.stats()["requests"]
            .as_u64()
            .is_some_and(|n| n >= 10)),
        "the writer did not retry; log:\n{}",
        read(log)
    );
    let peak_kb = wattbus_e2e::status_kb(w.id(), "VmHWM:").unwrap();
    assert!(
        peak_kb < 256 * 1024,
        "the writer's memory peaked at {} MiB",
        peak_kb / 1024
    );
    w.terminate(Duration::from_secs(10));
}
