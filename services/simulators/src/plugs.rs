//! Simulated smart plugs over HTTP, answering as the vendors document their local APIs, so
//! plug-bridge runs (and is tested) without a plug on the LAN.
//!
//! - myStrom WiFi Switch: `GET /report`, `/relay?state=0|1`, `/toggle`, `/api/v1/info`; the
//!   `Token:` header when a token is set (401 without it). `energy_since_boot` (Ws) and a
//!   `boot_id` that changes on every reboot; `Ws` resets at every `/report`, as on the device.
//! - Shelly Gen2: `GET /rpc/Switch.GetStatus?id=0`, `/rpc/Switch.Set?id=0&on=true|false`
//!   (`{"was_on": …}`); `aenergy.total` in Wh kept across reboots, unless told to lose it.
//!   With a password (`token` here), every request needs SHA-256 digest authentication as
//!   the Shelly API documents it (user `admin`, `qop="auth"`): 401 with the challenge
//!   otherwise.
//!
//! A small HTTP/1.1 server (one request per connection, GET only), as a plug's own is. The
//! plug's load: `load_w` while the relay is on, 0 while off; energy grows with the real time
//! between requests.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Mystrom,
    Shelly,
}

#[derive(Debug)]
struct State {
    relay_on: bool,
    load_w: f64,
    /// Energy the plug counted since it booted (Ws), and its lifetime total (Wh, Shelly).
    since_boot_ws: f64,
    total_wh: f64,
    /// `Ws`: energy since the previous `/report`, reset by each.
    since_report_ws: f64,
    /// Everything it ever used (Wh): what a perfect counter would say.
    lifetime_wh: f64,
    boot: u32,
    booted: Instant,
    last: Instant,
    /// Not answering (accepts, then closes without a word).
    down: bool,
    /// Shelly's digest nonce (changed by `new_nonce`).
    nonce: u64,
    /// How long it takes before it acts on a request and answers.
    delay: std::time::Duration,
    /// Shelly: lose `aenergy.total` on a reboot (Gen1 plugs do on a power loss).
    loses_total: bool,
    requests: u64,
    /// Requests that set or toggled the relay.
    switches: u64,
}

impl State {
    fn advance(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        let w = if self.relay_on { self.load_w } else { 0.0 };
        self.since_boot_ws += w * secs;
        self.since_report_ws += w * secs;
        self.total_wh += w * secs / 3600.0;
        self.lifetime_wh += w * secs / 3600.0;
    }

    fn power(&self) -> f64 {
        if self.relay_on { self.load_w } else { 0.0 }
    }
}

/// A simulated plug, serving until dropped.
#[derive(Debug, Clone)]
pub struct SimPlug {
    kind: Vendor,
    token: Option<String>,
    state: Arc<Mutex<State>>,
}

impl SimPlug {
    pub fn new(kind: Vendor, load_w: f64, token: Option<String>) -> Self {
        let now = Instant::now();
        Self {
            kind,
            token,
            state: Arc::new(Mutex::new(State {
                relay_on: true,
                load_w,
                since_boot_ws: 0.0,
                total_wh: 0.0,
                since_report_ws: 0.0,
                lifetime_wh: 0.0,
                boot: 1,
                booted: now,
                last: now,
                down: false,
                nonce: 1_700_000_000,
                delay: std::time::Duration::ZERO,
                loses_total: false,
                requests: 0,
                switches: 0,
            })),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.advance();
        f(&mut s)
    }

    /// A power cut and back: a new boot id, the since-boot counter at 0.
    pub fn reboot(&self) {
        self.with(|s| {
            s.boot += 1;
            s.since_boot_ws = 0.0;
            s.since_report_ws = 0.0;
            s.booted = Instant::now();
            if s.loses_total {
                s.total_wh = 0.0;
            }
        });
    }

    pub fn set_loses_total(&self, loses: bool) {
        self.with(|s| s.loses_total = loses);
    }

    /// A new digest nonce (a Shelly changes it over time): the old one is refused.
    pub fn new_nonce(&self) {
        self.with(|s| s.nonce += 1);
    }

    /// Take `delay` before acting on each request and answering (a plug on weak WiFi).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.with(|s| s.delay = delay);
    }

    /// Stop answering (`true`) or answer again.
    pub fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
    }

    pub fn set_load(&self, load_w: f64) {
        self.with(|s| s.load_w = load_w);
    }

    /// Switched by hand, at the plug's own button.
    pub fn set_relay(&self, on: bool) {
        self.with(|s| s.relay_on = on);
    }

    pub fn relay_on(&self) -> bool {
        self.with(|s| s.relay_on)
    }

    /// The plug's own counter in Wh: since boot (myStrom) or its total (Shelly).
    pub fn counter_wh(&self) -> f64 {
        self.with(|s| match self.kind {
            Vendor::Mystrom => s.since_boot_ws / 3600.0,
            Vendor::Shelly => s.total_wh,
        })
    }

    /// All the energy it used since it was made (Wh), across reboots.
    pub fn lifetime_wh(&self) -> f64 {
        self.with(|s| s.lifetime_wh)
    }

    /// Requests that set or toggled the relay so far.
    pub fn switches(&self) -> u64 {
        self.with(|s| s.switches)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.with(|s| s.requests)
    }

    /// Serve on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let plug = self.clone();
            tokio::spawn(async move { plug.answer(conn).await });
        }
    }

    async fn answer(&self, mut conn: TcpStream) {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        // The request head, up to a blank line (a plug takes small requests only).
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 8192 {
                return;
            }
        }
        if self.with(|s| s.down) {
            return;
        }
        let delay = self.with(|s| s.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let (status, body) = self.route(&head);
        let challenge = if status.starts_with("401") && self.kind == Vendor::Shelly {
            format!(
                "WWW-Authenticate: Digest qop=\"auth\", realm=\"{SHELLY_REALM}\", nonce=\"{}\", algorithm=SHA-256\r\n",
                self.with(|s| s.nonce)
            )
        } else {
            String::new()
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{challenge}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(reply.as_bytes()).await;
        let _ = conn.shutdown().await;
    }

    fn route(&self, head: &str) -> (&'static str, String) {
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
        if method != "GET" {
            return ("405 Method Not Allowed", "{}".into());
        }
        let headers: Vec<(&str, &str)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_string())
        };
        let token = header("token");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        self.with(|s| {
            s.requests += 1;
            if ["/relay", "/toggle", "/rpc/Switch.Set"].contains(&path) {
                s.switches += 1;
            }
        });
        match self.kind {
            Vendor::Mystrom => {
                if self.token.is_some() && token != self.token {
                    return ("401 Unauthorized", "{}".into());
                }
                self.mystrom(path, &param)
            }
            Vendor::Shelly => {
                if let Some(password) = &self.token {
                    let nonce = self.with(|s| s.nonce);
                    let given = header("authorization").unwrap_or_default();
                    if !digest_ok(&given, password, &nonce.to_string(), method, target) {
                        return ("401 Unauthorized", "{}".into());
                    }
                }
                self.shelly(path, &param)
            }
        }
    }

    fn mystrom(
        &self,
        path: &str,
        param: &dyn Fn(&str) -> Option<String>,
    ) -> (&'static str, String) {
        match path {
            "/report" => self.with(|s| {
                let ws = s.since_report_ws;
                s.since_report_ws = 0.0;
                (
                    "200 OK",
                    format!(
                        r#"{{"power": {:.2}, "Ws": {ws:.2}, "relay": {}, "temperature": 24.5, "boot_id": "B00{:05X}", "energy_since_boot": {:.3}, "time_since_boot": {}}}"#,
                        s.power(),
                        s.relay_on,
                        s.boot,
                        s.since_boot_ws,
                        s.booted.elapsed().as_secs()
                    ),
                )
            }),
            "/relay" => match param("state").as_deref() {
                Some("1") => self.with(|s| {
                    s.relay_on = true;
                    ("200 OK", "{}".into())
                }),
                Some("0") => self.with(|s| {
                    s.relay_on = false;
                    ("200 OK", "{}".into())
                }),
                _ => ("400 Bad Request", "{}".into()),
            },
            "/toggle" => self.with(|s| {
                s.relay_on = !s.relay_on;
                ("200 OK", format!(r#"{{"relay": {}}}"#, s.relay_on))
            }),
            "/api/v1/info" => (
                "200 OK",
                r#"{"version": "3.82.60", "mac": "64002D000000", "type": 107, "name": "wattbus sim"}"#
                    .into(),
            ),
            _ => ("404 Not Found", "{}".into()),
        }
    }

    fn shelly(&self, path: &str, param: &dyn Fn(&str) -> Option<String>) -> (&'static str, String) {
        if param("id").as_deref().unwrap_or("0") != "0" {
            return (
                "404 Not Found",
                r#"{"code":-105,"message":"Argument 'id', value 1 not found!"}"#.into(),
            );
        }
        match path {
            "/rpc/Switch.GetStatus" => self.with(|s| {
                (
                    "200 OK",
                    format!(
                        r#"{{"id":0,"source":"HTTP","output":{},"apower":{:.1},"voltage":230.1,"current":{:.3},"aenergy":{{"total":{:.3},"by_minute":[0,0,0],"minute_ts":0}},"temperature":{{"tC":41.2,"tF":106.2}}}}"#,
                        s.relay_on,
                        s.power(),
                        s.power() / 230.1,
                        s.total_wh
                    ),
                )
            }),
            "/rpc/Switch.Set" => match param("on").as_deref() {
                Some(v @ ("true" | "false")) => self.with(|s| {
                    let was_on = s.relay_on;
                    s.relay_on = v == "true";
                    ("200 OK", format!(r#"{{"was_on":{was_on}}}"#))
                }),
                _ => ("400 Bad Request", "{}".into()),
            },
            _ => ("404 Not Found", "{}".into()),
        }
    }
}

/// The realm a simulated Shelly names in its digest challenge.
const SHELLY_REALM: &str = "shellyplusplugs-wattbussim";

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `header` is a digest answer (RFC 7616, SHA-256, qop auth) for user `admin`,
/// `password`, the current `nonce`, and this request.
fn digest_ok(header: &str, password: &str, nonce: &str, method: &str, target: &str) -> bool {
    let Some(rest) = header.strip_prefix("Digest ") else {
        return false;
    };
    let field = |name: &str| -> Option<String> {
        rest.split(',').find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let (Some(user), Some(realm), Some(n), Some(uri), Some(response), Some(nc), Some(cnonce)) = (
        field("username"),
        field("realm"),
        field("nonce"),
        field("uri"),
        field("response"),
        field("nc"),
        field("cnonce"),
    ) else {
        return false;
    };
    if user != "admin" || realm != SHELLY_REALM || n != nonce || uri != target {
        return false;
    }
    if field("qop").as_deref() != Some("auth") || field("algorithm").as_deref() != Some("SHA-256") {
        return false;
    }
    let ha1 = sha256_hex(&format!("admin:{SHELLY_REALM}:{password}"));
    let ha2 = sha256_hex(&format!("{method}:{uri}"));
    response == sha256_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reboot_starts_the_since_boot_counter_again_and_a_shelly_keeps_its_total() {
        let m = SimPlug::new(Vendor::Mystrom, 3_600_000.0, None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(m.counter_wh() > 0.0);
        m.reboot();
        assert!(m.counter_wh() < 1.0 * 3600.0 * 0.01 + 50.0);
        let s = SimPlug::new(Vendor::Shelly, 3_600_000.0, None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before = s.counter_wh();
        s.reboot();
        assert!(s.counter_wh() >= before);
        s.set_loses_total(true);
        s.reboot();
        assert!(s.counter_wh() < before);
    }

    #[test]
    fn answers_as_the_vendors_document() {
        let m = SimPlug::new(Vendor::Mystrom, 100.0, Some("sekret".into()));
        assert_eq!(
            m.route("GET /report HTTP/1.1\r\n\r\n").0,
            "401 Unauthorized"
        );
        let (status, body) = m.route("GET /report HTTP/1.1\r\nToken: sekret\r\n\r\n");
        assert_eq!(status, "200 OK");
        assert!(body.contains("\"boot_id\": \"B0000001\""), "{body}");
        assert_eq!(
            m.route("GET /relay?state=0 HTTP/1.1\r\nToken: sekret\r\n\r\n")
                .0,
            "200 OK"
        );
        assert!(!m.relay_on());
        let s = SimPlug::new(Vendor::Shelly, 100.0, None);
        let (_, body) = s.route("GET /rpc/Switch.Set?id=0&on=false HTTP/1.1\r\n\r\n");
        assert_eq!(body, r#"{"was_on":true}"#);
        let (_, body) = s.route("GET /rpc/Switch.GetStatus?id=0 HTTP/1.1\r\n\r\n");
        assert!(body.contains("\"output\":false"), "{body}");
    }
}
