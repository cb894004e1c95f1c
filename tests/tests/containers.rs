//! The shipped deployment on a real container engine: compose/docker-compose.yml, unchanged,
//! with the image the shipped Dockerfile builds (from the binary under test), the demo
//! profile's simulated devices and an InfluxDB. tests/run.sh provides the engine and images
//! (tests/containers/engine.sh); tests/containers/compose.ci.yml only leaves Grafana out,
//! which cannot run here, and INFLUXDB_IMAGE swaps in Debian's InfluxDB 1.6.7.
//!
//! What a user relies on: readings reach InfluxDB; a service killed -9 (the writer, the
//! broker) is restarted by its policy and no reading the producers journaled is missing
//! afterwards; `--scale influx-writer=2` splits the work and stores everything once;
//! `docker compose down` / `up` (a reboot) keeps journals and energy registers, and energy
//! keeps counting up; containers run as non-root on a read-only root filesystem; no secret
//! shows in `docker inspect`, the environment or the logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use wattbus_e2e::servers::{http, urlencode};
use wattbus_e2e::{free_port, wait_until};

/// The demo profile's simulated meters read every second.
const INTERVAL_MS: i64 = 1000;
const DEVICES: [&str; 2] = ["sim-meter-1", "sim-meter-2"];
/// Long enough for a container to be restarted and pass its healthcheck on a loaded machine.
const RESTART: Duration = Duration::from_secs(120);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with tests/run.sh, which starts a Docker engine")
    })
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .env("DOCKER_HOST", env("WBTEST_DOCKER_HOST"))
        .output()
        .expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(o.status.success(), "docker {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// One compose project: a copy of compose/ (so its secrets stay out of the repository), the
/// project's own name and host ports.
struct Stack {
    dir: tempfile::TempDir,
    project: String,
    influx_port: u16,
    plug_api_port: u16,
}

impl Stack {
    fn new(name: &str) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let compose = dir.path().join("compose");
        std::fs::create_dir(&compose).unwrap();
        for f in [
            "docker-compose.yml",
            "wattbus.toml",
            "demo.toml",
            "make-secrets.sh",
        ] {
            std::fs::copy(repo().join("compose").join(f), compose.join(f)).unwrap();
        }
        std::fs::copy(
            repo().join("tests/containers/compose.ci.yml"),
            compose.join("ci.yml"),
        )
        .unwrap();
        std::os::unix::fs::symlink(repo().join("grafana"), dir.path().join("grafana")).unwrap();
        // Run by `sh`, not exec'd: the copy above held the file open for writing, and a
        // child another test thread forked meanwhile inherits that descriptor, so exec'ing it
        // can fail with ETXTBSY ("Text file busy"). `sh` only reads it.
        let o = Command::new("sh")
            .arg("./make-secrets.sh")
            .current_dir(&compose)
            .output()
            .unwrap();
        assert!(o.status.success(), "make-secrets.sh: {}", stderr(&o));
        Stack {
            dir,
            project: format!("wbt-{name}-{}", std::process::id()),
            influx_port: free_port(),
            plug_api_port: free_port(),
        }
    }

    fn compose_dir(&self) -> PathBuf {
        self.dir.path().join("compose")
    }

    fn compose(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(["compose", "-f", "docker-compose.yml", "-f", "ci.yml"])
            .args(["-p", &self.project])
            .args(args)
            .current_dir(self.compose_dir())
            .env("DOCKER_HOST", env("WBTEST_DOCKER_HOST"))
            .env("WATTBUS_IMAGE", env("WBTEST_IMAGE"))
            .env("INFLUXDB_IMAGE", env("WBTEST_INFLUXDB_IMAGE"))
            .env("COMPOSE_PROFILES", "demo")
            // Whatever this machine is called (a CI machine may be `localhost`, a name
            // node-health does not take on its own).
            .env("NODE_NAME", "ci-node")
            .env("MQTT_PUBLISH", format!("127.0.0.1:{}", free_port()))
            .env("INFLUX_PUBLISH", self.influx_port.to_string())
            .env("GRAFANA_PUBLISH", free_port().to_string())
            .env("PLUG_API_PUBLISH", self.plug_api_port.to_string())
            .output()
            .expect("run docker compose")
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        let o = self.compose(args);
        assert!(
            o.status.success(),
            "docker compose {args:?} failed: {}\n{}",
            stderr(&o),
            self.logs()
        );
        stdout(&o)
    }

    fn up(&self, extra: &[&str]) {
        let mut args = vec!["up", "-d", "--wait", "--wait-timeout", "180"];
        args.extend_from_slice(extra);
        self.compose_ok(&args);
    }

    fn logs(&self) -> String {
        stdout(&self.compose(&["logs", "--no-color", "--tail", "200"]))
    }

    fn all_logs(&self) -> String {
        let o = self.compose(&["logs", "--no-color"]);
        stdout(&o) + &stderr(&o)
    }

    /// The container ids of a service (one per replica).
    fn containers(&self, service: &str) -> Vec<String> {
        let args: &[&str] = if service.is_empty() {
            &["ps", "-q"]
        } else {
            &["ps", "-q", service]
        };
        self.compose_ok(args).lines().map(str::to_string).collect()
    }

    fn one(&self, service: &str) -> String {
        let ids = self.containers(service);
        assert_eq!(ids.len(), 1, "{service}: {ids:?}");
        ids[0].clone()
    }

    fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.compose_dir().join("secrets").join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    /// An InfluxQL query against the stack's InfluxDB, as Grafana's read-only user (the
    /// writer's user may only write).
    fn query(&self, q: &str) -> serde_json::Value {
        let target = format!(
            "/query?db=wattbus&epoch=ms&u=grafana&p={}&q={}",
            urlencode(&self.secret("influx_grafana_password")),
            urlencode(q)
        );
        let (status, body) = http("POST", self.influx_port, &target, b"");
        assert_eq!(status, 200, "{q}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// InfluxDB's retention policies (name, duration) and the database's continuous queries,
    /// asked as InfluxDB's admin (only an admin may list queries), once the `influx-setup`
    /// container has run and exited 0.
    fn retention(&self) -> (Vec<(String, String)>, Vec<String>) {
        let setup = self
            .compose_ok(&["ps", "-a", "-q", "influx-setup"])
            .trim()
            .to_string();
        assert!(!setup.is_empty(), "no influx-setup container");
        assert!(
            wait_until(Duration::from_secs(120), || {
                docker_ok(&[
                    "inspect",
                    "-f",
                    "{{.State.Status}} {{.State.ExitCode}}",
                    &setup,
                ])
                .trim()
                    == "exited 0"
            }),
            "influx-setup did not finish with 0\n{}",
            self.logs()
        );
        let ask = |q: &str| {
            let target = format!(
                "/query?db=wattbus&u=admin&p={}&q={}",
                urlencode(&self.secret("influx_admin_password")),
                urlencode(q)
            );
            let (status, body) = http("POST", self.influx_port, &target, b"");
            assert_eq!(status, 200, "{q}: {body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        };
        let v = ask("SHOW RETENTION POLICIES ON \"wattbus\"");
        let policies = v["results"][0]["series"][0]["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r[0].as_str().unwrap_or("").to_string(),
                    r[1].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let v = ask("SHOW CONTINUOUS QUERIES");
        let mut queries = Vec::new();
        for s in v["results"][0]["series"].as_array().into_iter().flatten() {
            if s["name"] == "wattbus" {
                for r in s["values"].as_array().into_iter().flatten() {
                    queries.push(r[0].as_str().unwrap_or("").to_string());
                }
            }
        }
        queries.sort();
        (policies, queries)
    }

    /// `device`'s readings as (time ms → energy_wh).
    fn energy(&self, device: &str) -> BTreeMap<i64, f64> {
        let v = self.query(&format!(
            "SELECT energy_wh FROM power WHERE device = '{device}'"
        ));
        let mut out = BTreeMap::new();
        if let Some(rows) = v["results"][0]["series"][0]["values"].as_array() {
            for r in rows {
                out.insert(r[0].as_i64().unwrap(), r[1].as_f64().unwrap());
            }
        }
        out
    }

    /// The first column of every row of `q` (after the time), as (time ms, value).
    fn column(&self, q: &str) -> BTreeMap<i64, f64> {
        let v = self.query(q);
        let mut out = BTreeMap::new();
        if let Some(rows) = v["results"][0]["series"][0]["values"].as_array() {
            for r in rows {
                if let (Some(t), Some(x)) = (r[0].as_i64(), r[1].as_f64()) {
                    out.insert(t, x);
                }
            }
        }
        out
    }

    /// Every device name InfluxDB holds readings of.
    fn devices(&self) -> std::collections::BTreeSet<String> {
        let v = self.query("SHOW TAG VALUES WITH KEY = \"device\"");
        let mut out = std::collections::BTreeSet::new();
        for series in v["results"][0]["series"].as_array().into_iter().flatten() {
            for row in series["values"].as_array().into_iter().flatten() {
                if let Some(d) = row[1].as_str() {
                    out.insert(d.to_string());
                }
            }
        }
        out
    }

    /// The simulated WE-515 `meter`'s total import register (Wh), as modbus-ingest read it.
    fn meter_energy(&self, meter: &str) -> BTreeMap<i64, f64> {
        self.column(&format!(
            "SELECT energy_wh FROM energy WHERE device = '{meter}' AND channel = 'total' AND tariff = ''"
        ))
    }

    /// The newest reading time of every simulated meter, once all have one.
    fn newest(&self) -> Option<i64> {
        DEVICES
            .iter()
            .map(|d| self.energy(d).keys().next_back().copied())
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().min())
    }

    /// Wait until every meter has readings up to at least `t`, then assert there is one at
    /// every interval from `from` to `t` for each: no reading missing, none stored twice
    /// (InfluxDB keeps one point per series and time), every energy value growing.
    fn assert_complete(&self, from: i64, to: i64) {
        let ok = wait_until(Duration::from_secs(120), || {
            self.newest().is_some_and(|n| n >= to)
        });
        assert!(ok, "readings stopped before {to}\n{}", self.logs());
        for device in DEVICES {
            let mut missing = Vec::new();
            // Replays after a restart arrive late: wait for them, not for a time.
            let complete = wait_until(Duration::from_secs(120), || {
                let got = self.energy(device);
                missing = (from / INTERVAL_MS..=to / INTERVAL_MS)
                    .map(|k| k * INTERVAL_MS)
                    .filter(|t| !got.contains_key(t))
                    .collect();
                missing.is_empty()
            });
            assert!(
                complete,
                "{device}: {} readings missing between {from} and {to}: {:?}\n{}",
                missing.len(),
                &missing[..missing.len().min(20)],
                self.logs()
            );
            let got = self.energy(device);
            let off_grid: Vec<i64> = got
                .range(from..=to)
                .map(|(t, _)| *t)
                .filter(|t| t % INTERVAL_MS != 0)
                .collect();
            assert!(
                off_grid.is_empty(),
                "{device}: points off the grid: {off_grid:?}"
            );
            let values: Vec<f64> = got.range(from..=to).map(|(_, e)| *e).collect();
            assert!(
                values.windows(2).all(|w| w[1] >= w[0]),
                "{device}: energy went down: {values:?}"
            );
        }
    }

    /// Kill -9 the main process of `service`'s container from the host (what a crash does;
    /// `docker kill` would not be restarted, as documented), then wait until the restart
    /// policy brought it back and its healthcheck passes.
    fn crash(&self, service: &str) {
        let id = self.one(service);
        let state = |f: &str| docker_ok(&["inspect", "-f", f, &id]).trim().to_string();
        let restarts: u32 = state("{{.RestartCount}}").parse().unwrap();
        let pid = state("{{.State.Pid}}");
        let o = Command::new("kill").args(["-9", &pid]).output().unwrap();
        assert!(o.status.success(), "kill -9 {pid}: {}", stderr(&o));
        let back = wait_until(RESTART, || {
            state("{{.RestartCount}}").parse::<u32>().unwrap() > restarts
                && state("{{.State.Health.Status}}") == "healthy"
        });
        assert!(back, "{service} was not restarted healthy\n{}", self.logs());
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "2"]);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The shipped files are valid as they are, for every way the docs tell users to run them.
#[test]
fn the_shipped_compose_files_and_dockerfiles_are_valid() {
    let compose = repo().join("compose");
    let env = env("WBTEST_DOCKER_HOST");
    // The secrets the files name must exist for `config` to check them: made in a copy.
    let stack = Stack::new("config");
    for f in ["docker-compose.influxdb2.yml", ".env.example"] {
        std::fs::copy(compose.join(f), stack.compose_dir().join(f)).unwrap();
    }
    for (files, profiles) in [
        (&["docker-compose.yml"][..], ""),
        (&["docker-compose.yml"][..], "demo"),
        (
            &["docker-compose.yml", "docker-compose.influxdb2.yml"][..],
            "",
        ),
        (
            &["docker-compose.yml", "docker-compose.influxdb2.yml"][..],
            "demo",
        ),
    ] {
        let mut cmd = Command::new("docker");
        cmd.arg("compose");
        for f in files {
            cmd.args(["-f", f]);
        }
        let o = cmd
            .args(["config", "-q"])
            .current_dir(stack.compose_dir())
            .env("DOCKER_HOST", &env)
            .env("COMPOSE_PROFILES", profiles)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "docker compose {files:?} (profiles {profiles:?}) config: {}",
            stderr(&o)
        );
    }
    // .env.example is what users copy: with it, the stock file still validates.
    std::fs::copy(
        compose.join(".env.example"),
        stack.compose_dir().join(".env"),
    )
    .unwrap();
    let o = Command::new("docker")
        .args(["compose", "config", "-q"])
        .current_dir(stack.compose_dir())
        .env("DOCKER_HOST", &env)
        .output()
        .unwrap();
    assert!(o.status.success(), "with .env.example: {}", stderr(&o));

    for dockerfile in [
        repo().join("Dockerfile"),
        repo().join("tests/containers/influxdb/Dockerfile"),
    ] {
        let o = Command::new("hadolint").arg(&dockerfile).output().unwrap();
        assert!(
            o.status.success(),
            "hadolint {}: {}{}",
            dockerfile.display(),
            stdout(&o),
            stderr(&o)
        );
    }

    // make-secrets.sh keeps what exists and makes its directory private.
    let before = stack.secret("broker_reader");
    let o = Command::new("sh")
        .arg("./make-secrets.sh")
        .current_dir(stack.compose_dir())
        .output()
        .unwrap();
    assert!(stdout(&o).contains("all secrets exist"), "{}", stdout(&o));
    assert_eq!(stack.secret("broker_reader"), before);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(stack.compose_dir().join("secrets"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// The demo stack stores readings; kill -9 of the writer, then of the broker: each comes
/// back by its restart policy and afterwards no reading is missing or stored twice. The
/// containers run as non-root on a read-only root, and no secret shows anywhere a user or
/// an attacker with `docker inspect` would look.
#[test]
fn the_demo_stack_keeps_every_reading_through_kill_9_of_the_writer_and_the_broker() {
    let stack = Stack::new("crash");
    stack.up(&[]);
    assert!(
        wait_until(Duration::from_secs(120), || stack.newest().is_some()),
        "no readings reached InfluxDB\n{}",
        stack.logs()
    );
    let from = stack.newest().unwrap();

    // Retention and downsampling, set by the one-shot influx-setup with InfluxDB's admin.
    let (policies, queries) = stack.retention();
    assert!(
        policies.contains(&("autogen".into(), "720h0m0s".into()))
            && policies.contains(&("minutes".into(), "0s".into())),
        "{policies:?}"
    );
    assert_eq!(queries, ["wattbus_1m_late_v1", "wattbus_1m_v2"]);

    // Non-root, read-only root filesystem, every wattbus service.
    let secrets: Vec<String> = [
        "broker_modbus_ingest",
        "broker_serial_ingest",
        "broker_simulator",
        "broker_rms_processor",
        "broker_influx_writer",
        "broker_backup_rotator",
        "broker_plug_bridge",
        "broker_node_health",
        "broker_reader",
        "influx_password",
        "influx_admin_password",
        "influx_grafana_password",
        "grafana_admin_password",
        "plug_api_token",
    ]
    .iter()
    .map(|s| stack.secret(s))
    .collect();
    // Every simulated device of the demo profile reaches InfluxDB through the service a real
    // one would go through: the meters over Modbus RTU (behind a TCP gateway) through
    // modbus-ingest, the Arduino sensors over serial-over-TCP through serial-ingest, and the
    // CT clamps' samples through rms-processor, with the values the devices were made with.
    let want: Vec<&str> = [
        &DEVICES[..],
        &[
            "house",
            "heat-pump",
            "ct-1",
            "ct-2",
            "ct-3",
            "powmon",
            "kitchen",
        ],
    ]
    .concat();
    let all_there = wait_until(Duration::from_secs(120), || {
        let have = stack.devices();
        want.iter().all(|d| have.contains(*d))
    });
    assert!(
        all_there,
        "demo devices missing from InfluxDB: have {:?}, want {want:?}\n{}",
        stack.devices(),
        stack.logs()
    );
    let last = |q: &str| {
        let c = stack.column(q);
        *c.values()
            .next_back()
            .unwrap_or_else(|| panic!("no rows for {q}"))
    };
    // ct-1: 100 ADC counts RMS at 0.05 A per count; ct-2: 16 counts.
    let ct1 = last("SELECT current_a FROM power WHERE device = 'ct-1' AND channel = 'ct1'");
    assert!((ct1 - 5.0).abs() < 0.25, "ct-1 current {ct1} A, want 5 A");
    let ct2 = last("SELECT current_a FROM power WHERE device = 'ct-2' AND channel = 'ct1'");
    assert!((ct2 - 0.8).abs() < 0.05, "ct-2 current {ct2} A, want 0.8 A");
    let fridge = last(
        "SELECT temperature_c FROM temperature WHERE device = 'kitchen' AND channel = 'fridge'",
    );
    assert!((0.0..10.0).contains(&fridge), "fridge at {fridge} °C");
    // node-health: this machine's own health, in InfluxDB like any reading (the containers
    // share the test machine's kernel, so its memory total is the one /proc says here).
    assert!(
        wait_until(Duration::from_secs(120), || !stack
            .column("SELECT mem_total_bytes FROM node_health")
            .is_empty()),
        "no node_health readings in InfluxDB\n{}",
        stack.logs()
    );
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap()
        * 1024.0;
    assert_eq!(
        last("SELECT mem_total_bytes FROM node_health WHERE device = 'ci-node'"),
        mem_total
    );
    let disk = last("SELECT disk_used_pct FROM node_health");
    assert!((0.0..=100.0).contains(&disk), "disk {disk} % used");
    let volts = last("SELECT voltage_v FROM power WHERE device = 'house' AND channel = 'l1'");
    assert!((200.0..260.0).contains(&volts), "house meter at {volts} V");
    // Energy is polled every 10 s: wait for a register reading, not for a time.
    assert!(
        wait_until(Duration::from_secs(120), || !stack
            .meter_energy("heat-pump")
            .is_empty()),
        "no energy register of the heat pump in InfluxDB\n{}",
        stack.logs()
    );
    assert!(
        stack
            .meter_energy("heat-pump")
            .values()
            .all(|&e| e > 1_000_000.0),
        "the heat pump's register shows its years of use"
    );

    for service in [
        "broker",
        "influx-writer",
        "rms-processor",
        "modbus-ingest",
        "serial-ingest",
        "simulator",
        "demo-modbus-ingest",
        "demo-serial-ingest",
        "backup-rotator",
        "plug-bridge",
        "node-health",
    ] {
        let id = stack.one(service);
        assert_eq!(
            docker_ok(&["exec", &id, "id", "-u"]).trim(),
            "10001",
            "{service}"
        );
        assert_eq!(
            docker_ok(&["inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", &id]).trim(),
            "true",
            "{service}"
        );
        let o = docker(&["exec", &id, "touch", "/usr/local/bin/x"]);
        assert!(
            !o.status.success(),
            "{service}: the root filesystem is writable"
        );
        let environ = docker_ok(&["exec", &id, "cat", "/proc/1/environ"]);
        for s in &secrets {
            assert!(
                !environ.contains(s.as_str()),
                "{service}: a secret in its environment"
            );
        }
    }
    // plug-bridge's API, as compose wires it: the token from its secret file, nothing without it.
    let token = stack.secret("plug_api_token");
    let api = |auth: Option<&str>| {
        let header = auth.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("Authorization", h.as_str()))
            .collect();
        wattbus_e2e::servers::http_with("GET", stack.plug_api_port, "/api/v1/plugs", &headers, b"")
    };
    assert_eq!(
        api(None).0,
        401,
        "plug-bridge's API answered without the token"
    );
    assert_eq!(api(Some("not-the-token-0123456789")).0, 401);
    let (status, body) = api(Some(&token));
    assert_eq!((status, body.as_str()), (200, r#"{"plugs":[]}"#));
    // InfluxDB reads its passwords from the secrets in its entrypoint, not the environment.
    let influxdb = stack.one("influxdb");
    let environ = docker_ok(&["exec", &influxdb, "cat", "/proc/1/environ"]);
    for s in &secrets {
        assert!(
            !environ.contains(s.as_str()),
            "influxdb: a secret in its environment"
        );
    }
    let inspect = docker_ok(
        &[
            &["inspect"][..],
            &stack
                .containers("")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ]
        .concat(),
    );
    for s in &secrets {
        assert!(!inspect.contains(s.as_str()), "a secret in docker inspect");
    }

    // backup-rotator made its first full set at start, as InfluxDB's read-only user, into
    // the backups volume, and reports it on the bus: a status reading stored like any other.
    let rotator = stack.one("backup-rotator");
    let backed_up = wait_until(Duration::from_secs(120), || {
        let o = docker(&["exec", &rotator, "wattbus", "backup", "list"]);
        o.status.success() && stdout(&o).lines().any(|l| l.contains(" full "))
    });
    assert!(
        backed_up,
        "no full backup set:\n{}\n{}",
        stdout(&docker(&["exec", &rotator, "wattbus", "backup", "list"])),
        stack.logs()
    );
    let o = docker(&["exec", &rotator, "wattbus", "backup", "verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        wait_until(Duration::from_secs(120), || {
            stack
                .column("SELECT last_run_ok FROM backup WHERE device = 'backup-rotator'")
                .values()
                .next_back()
                == Some(&1.0)
        }),
        "no backup status reading in InfluxDB\n{}",
        stack.logs()
    );

    stack.crash("influx-writer");
    stack.crash("broker");
    // Readings journaled while each was down must all arrive.
    let to = now_ms() + 5_000;
    stack.assert_complete(from, to);
    let logs = stack.all_logs();
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret in the logs");
    }
}

/// Two writers in one shared group: both take readings, each in its own slot of the one
/// volume, and every reading is stored (one point per reading: InfluxDB overwrites a point
/// written twice, and `assert_complete` finds no point off the one-second grid). Scaled
/// back to one during an InfluxDB outage, the writer left writes the other's spool.
#[test]
fn scaled_writers_split_the_readings_and_store_each_once() {
    let stack = Stack::new("scale");
    stack.up(&["--scale", "influx-writer=2"]);
    let writers = stack.containers("influx-writer");
    assert_eq!(writers.len(), 2);
    assert!(wait_until(Duration::from_secs(120), || stack
        .newest()
        .is_some()));
    let from = stack.newest().unwrap();
    let to = from + 20 * INTERVAL_MS;
    stack.assert_complete(from, to);

    let mut slots = Vec::new();
    for id in &writers {
        let logs = stdout(&docker(&["logs", id])) + &stderr(&docker(&["logs", id]));
        let slot = if logs.contains("instance=influx-writer-2") {
            "influx-writer-2"
        } else {
            assert!(logs.contains("instance=influx-writer"), "{logs}");
            "influx-writer"
        };
        slots.push(slot);
        let metrics = docker_ok(&["exec", id, "wattbus", "health", "--metrics"]);
        let received: f64 = metrics
            .lines()
            .find(|l| {
                l.starts_with("wattbus_messages_received_total")
                    && l.contains("service=\"influx-writer\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{slot}: no messages_received_total in\n{metrics}"));
        assert!(received > 0.0, "{slot} took no readings");
    }
    slots.sort_unstable();
    assert_eq!(slots, ["influx-writer", "influx-writer-2"]);

    // InfluxDB goes away: both writers spool what they take (and acknowledge it: the spool
    // is its only copy). Then one writer is scaled away with its spool full, and InfluxDB
    // comes back: the writer left takes over the free slot's spool, and nothing is missing.
    stack.compose_ok(&["stop", "influxdb"]);
    let spooled = |id: &str| -> f64 {
        let m = stdout(&docker(&["exec", id, "wattbus", "health", "--metrics"]));
        m.lines()
            .find(|l| l.starts_with("wattbus_influx_spooled_points_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(120), || writers
            .iter()
            .all(|id| spooled(id) > 0.0)),
        "the writers did not spool while InfluxDB was away\n{}",
        stack.logs()
    );
    stack.compose_ok(&["up", "-d", "--scale", "influx-writer=1", "influx-writer"]);
    assert_eq!(stack.containers("influx-writer").len(), 1);
    let outage_end = now_ms();
    stack.compose_ok(&["up", "-d", "--wait", "influxdb"]);
    stack.assert_complete(from, outage_end);
    let left = stack.one("influx-writer");
    let logs = stdout(&docker(&["logs", &left])) + &stderr(&docker(&["logs", &left]));
    assert!(
        logs.contains("Writing the spool of a writer slot nobody holds"),
        "the remaining writer never took over the free slot's spool:\n{logs}"
    );
}

/// `docker compose down` then `up`, as a reboot does: the volumes keep the journals and the
/// simulated meters' energy registers; energy continues from where it was, and every
/// reading taken before the stop is stored.
#[test]
fn down_and_up_keep_journals_and_energy_keeps_counting_up() {
    let stack = Stack::new("reboot");
    stack.up(&[]);
    assert!(wait_until(Duration::from_secs(120), || stack
        .newest()
        .is_some()));
    let from = stack.newest().unwrap();
    let to = from + 5 * INTERVAL_MS;
    assert!(wait_until(Duration::from_secs(60), || stack
        .newest()
        .is_some_and(|n| n >= to)));
    // Each WE-515's register is polled every 10 s: one must be stored before the stop.
    assert!(
        wait_until(Duration::from_secs(120), || ["house", "heat-pump"]
            .iter()
            .all(|m| !stack.meter_energy(m).is_empty())),
        "no meter register in InfluxDB before the stop\n{}",
        stack.logs()
    );
    // SIGTERM to process 1 is handled: each service flushes and exits 0 by itself, not
    // killed (137) when the stop timeout runs out.
    let ids: Vec<(&str, String)> = [
        "broker",
        "influx-writer",
        "rms-processor",
        "simulator",
        "demo-modbus-ingest",
        "demo-serial-ingest",
    ]
    .iter()
    .map(|s| (*s, stack.one(s)))
    .collect();
    let stopping = now_ms();
    stack.compose_ok(&["stop"]);
    for (service, id) in &ids {
        let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", id]);
        assert_eq!(
            code.trim(),
            "0",
            "{service} did not exit cleanly on SIGTERM"
        );
    }
    stack.compose_ok(&["down"]);
    let stopped = now_ms();
    let volumes = docker_ok(&["volume", "ls", "-q"]);
    for v in [
        "simulator",
        "influx-writer",
        "rms-processor",
        "demo-modbus-ingest",
    ] {
        assert!(
            volumes.contains(&format!("{}_{v}", stack.project)),
            "volume {v} is gone after down: {volumes}"
        );
    }
    stack.up(&[]);
    // influx-setup ran again at this `up`, and changed nothing.
    let (_, queries) = stack.retention();
    assert_eq!(queries, ["wattbus_1m_late_v1", "wattbus_1m_v2"]);
    // Everything up to the stop is stored (what was journaled and not yet stored is
    // replayed from the volume), and energy continues upwards.
    stack.assert_complete(from, stopping - INTERVAL_MS);
    assert!(wait_until(Duration::from_secs(120), || stack
        .newest()
        .is_some_and(|n| n > stopped)));
    for device in DEVICES {
        let e = stack.energy(device);
        let (_, energy_before) = e.range(..stopped).next_back().unwrap();
        let (_, first_after) = e.range(stopped..).next().unwrap();
        assert!(
            first_after >= energy_before,
            "{device}: energy went from {energy_before} down to {first_after} across down/up"
        );
        assert!(
            *energy_before > 0.0,
            "{device}: no energy counted before the stop"
        );
    }
    // The simulated WE-515s keep their registers in the simulator's volume, as a real meter
    // keeps its own: what modbus-ingest reads after `up` continues from before `down`.
    for meter in ["house", "heat-pump"] {
        assert!(
            wait_until(Duration::from_secs(120), || stack
                .meter_energy(meter)
                .range(stopped..)
                .next()
                .is_some()),
            "{meter}: no energy register read after up\n{}",
            stack.logs()
        );
        let e = stack.meter_energy(meter);
        let (_, before) = e.range(..stopped).next_back().unwrap();
        let (_, after) = e.range(stopped..).next().unwrap();
        assert!(
            after >= before,
            "{meter}: its register went from {before} down to {after} Wh across down/up"
        );
        assert!(
            after - before < 1000.0,
            "{meter}: its register jumped from {before} to {after} Wh across down/up"
        );
    }
}
