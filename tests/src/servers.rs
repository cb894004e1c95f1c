//! Real database servers for tests: InfluxDB 1.6.7 and VictoriaMetrics 1.79, the Debian
//! packages `tests/run.sh` installs, each started on free loopback ports in a test's own
//! directory and killed with it.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, wait_until};

fn require(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{bin}` is not installed. The test command (./tests/run.sh) installs it with \
         `apt-get install -y {package}`; run that, or install it by hand."
    )
}

/// One HTTP/1.1 request to 127.0.0.1 (`Connection: close`); returns status and body.
/// Handles `Content-Length` and chunked answers.
pub fn http(method: &str, port: u16, target: &str, body: &[u8]) -> (u16, String) {
    http_with(method, port, target, &[], body)
}

/// The value of the first line of `/metrics` on `port` that starts with `line_start` (a
/// metric's name and labels as written there). `None` while nothing listens (not up yet, or
/// killed) or the metric is not there.
pub fn metric(port: u16, line_start: &str) -> Option<f64> {
    TcpStream::connect(("127.0.0.1", port)).ok()?;
    let (status, text) = http("GET", port, "/metrics", b"");
    if status != 200 {
        return None;
    }
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// [`http`] with request headers.
pub fn http_with(
    method: &str,
    port: u16,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("write request");
    s.write_all(body).expect("write body");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut chunked = false;
    let mut length: Option<usize> = None;
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).expect("chunk size");
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .expect("chunk size");
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        r.read_exact(&mut out).expect("body");
    } else {
        r.read_to_end(&mut out).expect("body");
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encode a query parameter value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// InfluxDB 1.6.7 (`influxd`), HTTP on a free port.
#[derive(Debug)]
pub struct Influxd {
    pub port: u16,
    /// The RPC port (`influxd backup` / `restore`).
    pub rpc: u16,
    dir: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
}

impl Influxd {
    pub fn start(dir: &Path) -> Influxd {
        require("influxd", "influxdb");
        let dir = dir.join("influxdb");
        std::fs::create_dir_all(&dir).expect("influx dir");
        let port = free_port();
        let rpc = free_port();
        let config = dir.join("influxdb.conf");
        std::fs::write(
            &config,
            format!(
                "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n\
                 [meta]\n  dir = \"{d}/meta\"\n\
                 [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
                 [http]\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n\
                 [logging]\n  level = \"warn\"\n",
                d = dir.display(),
            ),
        )
        .expect("influx config");
        let mut s = Influxd {
            port,
            rpc,
            dir,
            config,
            proc: None,
        };
        s.resume();
        s
    }

    /// Start (again) on the same port and data.
    pub fn resume(&mut self) {
        let log = self.dir.join("influxd.log");
        let p = Proc::spawn(
            "influxd",
            Command::new(require("influxd", "influxdb"))
                .arg("-config")
                .arg(&self.config),
            &log,
        );
        self.proc = Some(p);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(60), || {
                crate::port_open(port) && http("GET", port, "/ping", b"").0 == 204
            }),
            "influxd did not answer /ping; see {}",
            log.display()
        );
    }

    /// Stop it (SIGTERM: a clean shutdown, as `systemctl stop` would).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take()
            && p.terminate(Duration::from_secs(20)).is_none()
        {
            p.kill9();
        }
    }

    /// An InfluxQL statement; returns the JSON answer.
    pub fn query(&self, db: &str, q: &str) -> serde_json::Value {
        let (status, body) = http(
            "POST",
            self.port,
            &format!("/query?db={}&epoch=ms&q={}", urlencode(db), urlencode(q)),
            b"",
        );
        assert_eq!(status, 200, "query {q:?} failed: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    pub fn create_database(&self, db: &str) {
        self.query(db, &format!("CREATE DATABASE \"{db}\""));
    }

    /// Every row of `SELECT * FROM <measurement>` as (column name → value) maps.
    pub fn rows(
        &self,
        db: &str,
        measurement: &str,
    ) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let v = self.query(db, &format!("SELECT * FROM \"{measurement}\""));
        let mut out = Vec::new();
        let Some(series) = v["results"][0]["series"].as_array() else {
            return out;
        };
        for s in series {
            let cols: Vec<String> = s["columns"]
                .as_array()
                .expect("columns")
                .iter()
                .map(|c| c.as_str().unwrap_or_default().to_string())
                .collect();
            for row in s["values"].as_array().expect("values") {
                let mut m = serde_json::Map::new();
                for (c, v) in cols.iter().zip(row.as_array().expect("row")) {
                    m.insert(c.clone(), v.clone());
                }
                out.push(m);
            }
        }
        out
    }
}

/// VictoriaMetrics 1.79, HTTP on a free port.
#[derive(Debug)]
pub struct Victoria {
    pub port: u16,
    _proc: Proc,
}

impl Victoria {
    pub fn start(dir: &Path) -> Victoria {
        let bin = require("victoria-metrics", "victoria-metrics");
        let dir = dir.join("victoria");
        std::fs::create_dir_all(&dir).expect("vm dir");
        let port = free_port();
        let log = dir.join("victoria.log");
        let p = Proc::spawn(
            "victoria-metrics",
            Command::new(bin)
                .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                .arg(format!("-storageDataPath={}", dir.join("data").display()))
                .arg("-retentionPeriod=100y")
                .arg("-loggerLevel=WARN"),
            &log,
        );
        assert!(
            wait_until(Duration::from_secs(60), || {
                crate::port_open(port) && http("GET", port, "/health", b"").0 == 200
            }),
            "victoria-metrics did not answer /health; see {}",
            log.display()
        );
        Victoria { port, _proc: p }
    }

    /// `/api/v1/export` for a series selector: one JSON object per series.
    pub fn export(&self, selector: &str) -> Vec<serde_json::Value> {
        // Make just-written samples searchable.
        let _ = http("GET", self.port, "/internal/force_flush", b"");
        let (status, body) = http(
            "GET",
            self.port,
            &format!("/api/v1/export?match[]={}", urlencode(selector)),
            b"",
        );
        assert_eq!(status, 200, "export failed: {body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// `wattbus influx setup` on `db`: the shipped retention policies and continuous queries.
pub fn influx_setup(influx: &Influxd, db: &str) {
    let url = format!("http://127.0.0.1:{}", influx.port);
    crate::run_ok(Command::new(crate::wattbus_bin()).args([
        "influx",
        "setup",
        "--url",
        &url,
        "--database",
        db,
        "--wait-s",
        "30",
    ]));
}

/// `wattbus demo` writing into `db`: every simulated device through the real services and
/// influx-writer. Stop it with [`Proc::terminate`].
pub fn demo_into(influx: &Influxd, db: &str, log: &Path) -> Proc {
    let url = format!("http://127.0.0.1:{}", influx.port);
    Proc::spawn(
        "demo",
        Command::new(crate::wattbus_bin())
            .args(["demo", "--influx-url", &url, "--influx-database", db])
            .env_remove("WATTBUS_CONFIG")
            .env_remove("RUST_LOG"),
        log,
    )
}

/// Runs each continuous query of `db` once by hand over the last hour (InfluxDB runs them
/// every minute, only over the last minutes): the aggregates of what is stored so far.
/// Returns the queries' names.
pub fn run_continuous_queries(influx: &Influxd, db: &str) -> Vec<String> {
    let cqs = influx.query(db, "SHOW CONTINUOUS QUERIES");
    let mut names = Vec::new();
    for s in cqs["results"][0]["series"].as_array().into_iter().flatten() {
        if s["name"] != db {
            continue;
        }
        for row in s["values"].as_array().into_iter().flatten() {
            let (Some(name), Some(text)) = (row[0].as_str(), row[1].as_str()) else {
                panic!("SHOW CONTINUOUS QUERIES: {row}");
            };
            let select = text
                .split(" BEGIN ")
                .nth(1)
                .unwrap_or_else(|| panic!("not a continuous query: {text}"))
                .trim_end_matches(" END");
            let (head, group) = select
                .split_once(" GROUP BY ")
                .unwrap_or_else(|| panic!("no GROUP BY: {text}"));
            influx.query(
                db,
                &format!("{head} WHERE time > now() - 1h GROUP BY {group}"),
            );
            names.push(name.to_string());
        }
    }
    names
}
