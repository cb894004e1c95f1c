//! A user's backend for influx-writer's HTTP output: a small Python server
//! (tests/http/receiver.py) that can be told to fail, refuses a wrong token, and refuses
//! readings it does not take with a 400; and a writer configured for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::servers::http;
use crate::{BrokerSetup, Proc, free_port, port_open, wait_until, wattbus_bin};

/// The token the receiver takes.
pub const TOKEN: &str = "s3cret-token-of-the-backend";

/// The receiver: a Python process on `port` appending what it accepts to `out`.
pub struct Receiver {
    pub port: u16,
    /// Plain HTTP for `/_mode` and `/_stats` (the same as `port` without TLS).
    control: u16,
    out: PathBuf,
    proc: Proc,
    tls: Option<(PathBuf, PathBuf)>,
    log: PathBuf,
}

impl Receiver {
    pub fn start(dir: &Path, tls: Option<(PathBuf, PathBuf)>) -> Receiver {
        let port = free_port();
        let out = dir.join("received.jsonl");
        let log = dir.join("receiver.log");
        let control = if tls.is_some() { free_port() } else { port };
        let proc = Self::spawn(port, control, &out, tls.as_ref(), &log);
        Receiver {
            port,
            control,
            out,
            proc,
            tls,
            log,
        }
    }

    fn spawn(
        port: u16,
        control: u16,
        out: &Path,
        tls: Option<&(PathBuf, PathBuf)>,
        log: &Path,
    ) -> Proc {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("http/receiver.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--port", &port.to_string(), "--token", TOKEN, "--out"])
            .arg(out);
        if let Some((cert, key)) = tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            cmd.args(["--control-port", &control.to_string()]);
        }
        let mut p = Proc::spawn("receiver", &mut cmd, log);
        assert!(
            wait_until(Duration::from_secs(30), || (port_open(port)
                && port_open(control))
                || !p.is_running()),
            "the receiver did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        p
    }

    /// Gone: connections are refused until [`Receiver::restart`].
    pub fn stop(&mut self) {
        self.proc.kill9();
    }

    pub fn restart(&mut self) {
        self.proc = Self::spawn(
            self.port,
            self.control,
            &self.out,
            self.tls.as_ref(),
            &self.log,
        );
    }

    /// How the receiver answers from now on: "ok", "503", "400all", "400flood", "500odd",
    /// "alt502", "okthen400:N", "takeall" (tests/http/receiver.py).
    pub fn mode(&self, mode: &str) {
        let (status, body) = http("POST", self.control, "/_mode", mode.as_bytes());
        assert_eq!(status, 200, "{body}");
    }

    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = http("GET", self.control, "/_stats", b"");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Every reading it stored, in order of arrival.
    pub fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many times each reading arrived, keyed by its identity and time.
    pub fn identities(&self) -> BTreeMap<(String, String, String, String, i64), usize> {
        let mut seen = BTreeMap::new();
        for r in self.received() {
            let key = (
                r["site"].as_str().unwrap().to_string(),
                r["device"].as_str().unwrap().to_string(),
                r["channel"].as_str().unwrap().to_string(),
                r["measurement"].as_str().unwrap().to_string(),
                r["ts_ms"].as_i64().unwrap(),
            );
            *seen.entry(key).or_insert(0) += 1;
        }
        seen
    }
}

/// The writer's config: the broker's service config plus `[influx_writer]` with only the
/// HTTP output, its token in a file.
pub fn writer_config(
    broker: &BrokerSetup,
    dir: &Path,
    url: &str,
    token: &str,
    extra: &str,
) -> (PathBuf, u16) {
    let path = broker.service_config(
        dir,
        [
            "level = \"info,rumqttd=warn\"",
            "reconnect_max_ms = 1000",
            "",
        ],
    );
    let token_file = dir.join("http-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let health = free_port();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[influx_writer]\nhealth_listen = \"127.0.0.1:{health}\"\nflush_interval_ms = 100\n\
         [influx_writer.http]\nurl = \"{url}\"\ntoken_file = \"{}\"\nmax_age_ms = 200\n\
         retry_min_ms = 100\nretry_max_ms = 1000\n{extra}\n",
        token_file.display(),
    ));
    std::fs::write(&path, text).unwrap();
    (path, health)
}

pub fn writer(config: &Path, log: &Path) -> Proc {
    Proc::spawn(
        "influx-writer",
        Command::new(wattbus_bin())
            .args(["run", "influx-writer", "--config"])
            .arg(config),
        log,
    )
}
