//! `/healthz` and `/metrics` over a minimal HTTP/1.1 server.
//!
//! Three GET routes, one request per connection: a full HTTP stack would cost more build time
//! and binary size than the whole runtime. Readiness is the conjunction of named checks that
//! components flip (e.g. "bus connected"); liveness is "the process answers".
//!
//! - `GET /healthz` — 200 when ready, else 503; JSON body lists each check.
//! - `GET /healthz/live` — always 200 while the process runs.
//! - `GET /healthz/ready` — same status as `/healthz`.
//! - `GET /metrics` — Prometheus text.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::shutdown::Shutdown;

/// Readiness checks of one process.
#[derive(Clone, Debug, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, Arc<AtomicBool>>>>,
}

/// One readiness check; set it when the component is ready.
#[derive(Clone, Debug)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

impl Health {
    pub fn check(&self, name: &str) -> ReadyFlag {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        ReadyFlag(checks.entry(name.to_string()).or_default().clone())
    }

    pub fn is_ready(&self) -> bool {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.values().all(|c| c.load(Ordering::Relaxed))
    }

    fn report(&self) -> String {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let map: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed).into()))
            .collect();
        let ready = map.values().all(|v| v.as_bool() == Some(true));
        serde_json::json!({ "live": true, "ready": ready, "checks": map }).to_string()
    }
}

/// Most health requests served at once. Prometheus and a container engine need one each; a
/// flood beyond is closed unanswered rather than take the file descriptors the service needs
/// for its journal (a flood had journal fsyncs fail with EMFILE).
const MAX_REQUESTS: usize = 64;

/// Bind `addr` and serve until shutdown. Binding happens before this returns, so a port in use
/// is a start-up error rather than a log line nobody reads.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    // Requests answered at once; a connection beyond is closed unanswered. A flood of
    // connections that send nothing (each held up to 5 s) then holds at most this many file
    // descriptors, which the service needs for its journal and its devices.
    let live = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS));
    let task = tokio::spawn(async move {
        let accept_failed = crate::telemetry::LogLimit::new(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(permit) = live.clone().try_acquire_owned() else {
                            drop(stream);
                            continue;
                        };
                        let health = health.clone();
                        // Each request is answered or times out within 5 s; nothing to join.
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, &health).await {
                                tracing::debug!(error = %crate::telemetry::chain(&e), "Health request failed.");
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors, typically: at most one line a minute.
                        if let Some(skipped) = accept_failed.allow() {
                            tracing::warn!(error = %crate::telemetry::chain(&e), skipped, "Health endpoint cannot accept connections.");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    Ok((local, task))
}

/// Where to reach a server listening on `addr`: a wildcard address (`0.0.0.0`, `::`) is
/// reached on loopback.
pub fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// What a `/healthz` endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// 200: every check is ready. The body lists them.
    Ready(String),
    /// Any other status, with the body (503 lists the checks not ready).
    NotReady(u16, String),
}

/// Ask the endpoint at `addr` for `/healthz`, within `timeout` for the connection and again
/// for the whole answer (a server that trickles bytes does not hold it longer). Blocking and
/// std-only: `wattbus health` runs it as a container's HEALTHCHECK, where no curl is installed.
pub fn probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<Probe> {
    probe_path(addr, "/healthz", timeout)
}

/// [`probe`] for another path of the endpoint (`/metrics`); the answer is cut at 1 MiB.
pub fn probe_path(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<Probe> {
    let target = probe_target(addr);
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
    let deadline = std::time::Instant::now() + timeout;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let too_late = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no whole answer from {target} within {} ms",
                timeout.as_millis()
            ),
        )
    };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(too_late());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            // A read timeout is EAGAIN on Linux, ETIMEDOUT elsewhere.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(too_late());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if answer.len() > 1 << 20 {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer from {target}"),
            )
        })?;
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_string();
    Ok(if status == 200 {
        Probe::Ready(body)
    } else {
        Probe::NotReady(status, body)
    })
}

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let read = async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            len += n;
            if n == 0 || buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request not received in 5 s")
        })??;
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/healthz" | "/healthz/ready") => {
            let status = if health.is_ready() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", health.report())
        }
        ("GET", "/healthz/live") => ("200 OK", "application/json", "{\"live\":true}".to_string()),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            crate::telemetry::render(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_probed_on_loopback() {
        let p = |s: &str| probe_target(s.parse().unwrap()).to_string();
        assert_eq!(p("0.0.0.0:1883"), "127.0.0.1:1883");
        assert_eq!(p("[::]:1883"), "[::1]:1883");
        assert_eq!(p("192.0.2.1:1883"), "192.0.2.1:1883");
    }

    /// The blocking probe `wattbus health` uses, against the real endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_probe_tells_ready_from_not_ready_and_from_nobody_there() {
        let health = Health::default();
        let bus = health.check("bus:probe-test");
        let (_trigger, shutdown) = crate::shutdown::channel();
        let (addr, _task) = serve("127.0.0.1:0".parse().unwrap(), health.clone(), shutdown)
            .await
            .unwrap();
        let ask = move || tokio::task::spawn_blocking(move || probe(addr, Duration::from_secs(5)));
        match ask().await.unwrap().unwrap() {
            Probe::NotReady(503, body) => assert!(body.contains("bus:probe-test"), "{body}"),
            other => panic!("not ready, yet {other:?}"),
        }
        bus.set(true);
        assert!(matches!(ask().await.unwrap().unwrap(), Probe::Ready(_)));
        // Nobody listens on a port just released.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = tokio::task::spawn_blocking(move || probe(free, Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);

        // A server that trickles its answer a byte at a time is given up on at the deadline.
        let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = slow.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = slow.accept() {
                for b in b"HTTP/1.1 200 OK\r\n".iter().cycle() {
                    if s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        let started = std::time::Instant::now();
        let e = tokio::task::spawn_blocking(move || probe(at, Duration::from_millis(500)))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "held {:?}",
            started.elapsed()
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readiness_follows_the_checks_and_metrics_render() {
        let health = Health::default();
        let bus = health.check("bus");
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), health, Shutdown::never())
            .await
            .unwrap();
        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("\"bus\":false"), "{r}");
        bus.set(true);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/healthz/live").await.starts_with("HTTP/1.1 200"));
        crate::telemetry::Counter::new("test_health_total", "x", &[]).inc();
        assert!(get(addr, "/metrics").await.contains("test_health_total 1"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
