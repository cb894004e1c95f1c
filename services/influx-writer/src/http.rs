//! The InfluxDB write request: one POST of line protocol, its answer sorted into what the
//! writer has to do next.
//!
//! Status codes (InfluxDB 1.x, 2.x and 3.x agree on these; VictoriaMetrics answers 204 and
//! skips bad lines itself):
//! - 204 (200 from some proxies): written. Redirects are not followed: a POST redirected
//!   becomes a GET without its body, and a login page answering 200 would pass for a write.
//! - 400, 422: malformed or refused points (bad syntax, a field type conflict, a point outside
//!   the retention policy — 2.x says 422 for that). 1.x and 2.x write the good points of the
//!   batch and report the first bad one; the writer finds the bad line(s) by splitting, which
//!   is safe because writes are idempotent.
//! - 413: the body is too large: split and resend.
//! - 401/403/404, a 3xx, any other 4xx: a setting is wrong (token, credentials, bucket,
//!   database, URL). Nothing will change until a person fixes it; the data is kept.
//! - 408/429/5xx, timeouts, refused connections: the server is busy or away; back off, retry.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use flate2::Compression;
use flate2::write::GzEncoder;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use runtime::Secret;

use crate::config::{InfluxTarget, WriteApi};
use crate::line_protocol::{Precision, encode_point, measurement_point};
use crate::sink::Endpoint;

/// What the server made of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    /// 400 or 422 with the server's message.
    Rejected(String),
    /// 413.
    TooLarge,
    /// 401, 403, 404, 3xx or another 4xx: a person has to fix a setting. `what` says which.
    Refused {
        status: u16,
        what: String,
    },
    /// 408, 429, or no answer at all (refused, timed out): try again later.
    Unavailable(String),
    /// A 5xx answer from the HTTP output's endpoint: try again later, and if it keeps
    /// failing, find whether one reading makes it fail (the InfluxDB client says
    /// `Unavailable` for these).
    ServerError(String),
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WriteClientError {
    #[error("influx.url {url:?} is not a valid URL: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    Build(String),
}

/// A write endpoint with its URL, headers and settings fixed at start-up.
#[derive(Debug, Clone)]
pub struct WriteClient {
    http: reqwest::Client,
    url: reqwest::Url,
    auth: Option<HeaderValue>,
    gzip: bool,
    /// Names the target in error messages: `bucket "b" (org "o")` or `database "db"`.
    target: String,
    api: WriteApi,
    precision: Precision,
    /// The last answer's `Retry-After`.
    retry_after: RetryAfter,
    /// What is blanked in the server's messages.
    secrets: Vec<String>,
}

impl WriteClient {
    pub fn new(t: &InfluxTarget) -> Result<Self, WriteClientError> {
        // reqwest is built without a default crypto provider (that would be aws-lc-rs, a C
        // build); ring is ours. A second install (a test that builds two clients) is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let c = &t.cfg;
        let base = c.url.trim().trim_end_matches('/');
        let path = match c.api {
            WriteApi::V2 => "/api/v2/write",
            WriteApi::V1 => "/write",
        };
        let mut url =
            reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| WriteClientError::Url {
                url: c.url.clone(),
                reason: e.to_string(),
            })?;
        let target = {
            let mut q = url.query_pairs_mut();
            match c.api {
                WriteApi::V2 => {
                    let org = c.org.clone().unwrap_or_default();
                    let bucket = c.bucket.clone().unwrap_or_default();
                    q.append_pair("org", &org)
                        .append_pair("bucket", &bucket)
                        .append_pair("precision", c.precision.v2_param());
                    format!("bucket {bucket:?} (org {org:?})")
                }
                WriteApi::V1 => {
                    let db = c.database.clone().unwrap_or_default();
                    q.append_pair("db", &db);
                    if let Some(rp) = &c.retention_policy {
                        q.append_pair("rp", rp);
                    }
                    q.append_pair("precision", c.precision.v1_param());
                    match &c.retention_policy {
                        Some(rp) => format!("database {db:?} (retention policy {rp:?})"),
                        None => format!("database {db:?}"),
                    }
                }
            }
        };
        let auth = t
            .auth
            .as_ref()
            .map(|s: &Secret| {
                let mut v = HeaderValue::from_str(s.expose()).map_err(|_| {
                    WriteClientError::Build(
                        "the token or password holds characters a header cannot carry".into(),
                    )
                })?;
                v.set_sensitive(true);
                Ok::<_, WriteClientError>(v)
            })
            .transpose()?;
        let timeout = Duration::from_millis(c.timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("wattbus-influx-writer/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WriteClientError::Build(e.to_string()))?;
        Ok(Self {
            http,
            url,
            auth,
            gzip: c.gzip,
            target,
            api: c.api,
            precision: c.precision,
            retry_after: RetryAfter::default(),
            secrets: t
                .auth
                .as_ref()
                .map(|s| secrets_of(s.expose()))
                .unwrap_or_default(),
        })
    }

    /// Where writes go, without credentials (they are never in the URL), for logs.
    pub fn endpoint(&self) -> String {
        format!("{} ({})", self.url.as_str(), self.target)
    }

    /// POST one body of line protocol.
    pub async fn write(&self, body: &[u8]) -> WriteOutcome {
        let mut req = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "text/plain; charset=utf-8");
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        req = if self.gzip {
            match gzip(body) {
                Ok(z) => req.header(CONTENT_ENCODING, "gzip").body(z),
                Err(_) => req.body(body.to_vec()),
            }
        } else {
            req.body(body.to_vec())
        };
        self.retry_after.clear();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return WriteOutcome::Unavailable(describe_transport(&e)),
        };
        let status = resp.status().as_u16();
        if status == 204 || status == 200 {
            return WriteOutcome::Written;
        }
        self.retry_after.note(&resp);
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(|l| strip_query(l).to_string());
        // InfluxDB answers in JSON or text; a web page is something else at this URL.
        let html = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/html"));
        let text = error_body(resp).await;
        let message = server_message(&scrub(text, &self.secrets));
        match status {
            // A proxy's error page (`http://` to nginx's HTTPS port says 400 to everything):
            // a setting, not points to dead-letter.
            400 | 422 if html => WriteOutcome::Refused {
                status,
                what: format!(
                    "Something other than InfluxDB answers at {} with a web page ({status}: \
                     {message}); check influx.url (https? a proxy in front?)",
                    strip_query(self.url.as_str())
                ),
            },
            400 | 422 => WriteOutcome::Rejected(message),
            300..=399 => WriteOutcome::Refused {
                status,
                what: format!(
                    "InfluxDB's URL answers with a redirect ({status}) to {}; set influx.url to \
                     the address that accepts writes (e.g. https:// instead of http://)",
                    location.as_deref().unwrap_or("(no Location)")
                ),
            },
            413 => WriteOutcome::TooLarge,
            401 | 403 => WriteOutcome::Refused {
                status,
                what: format!(
                    "InfluxDB refused the {} for {} ({status}: {message}); check {}",
                    match self.api {
                        WriteApi::V2 => "token",
                        WriteApi::V1 => "credentials",
                    },
                    self.target,
                    match self.api {
                        WriteApi::V2 =>
                            "influx.token / token_file and that it may write this bucket",
                        WriteApi::V1 => "influx.username and password / password_file",
                    }
                ),
            },
            404 => WriteOutcome::Refused {
                status,
                what: format!(
                    "InfluxDB has no {} or no write API at this URL ({status}: {message}); \
                     check influx.url and that the {} exists{}",
                    self.target,
                    match self.api {
                        WriteApi::V2 => "bucket",
                        WriteApi::V1 => "database",
                    },
                    match self.api {
                        WriteApi::V2 =>
                            " (InfluxDB 1.6/1.7 have no /api/v2/write: use api = \"v1\")",
                        WriteApi::V1 => "",
                    }
                ),
            },
            408 | 429 | 500..=599 => WriteOutcome::Unavailable(format!("HTTP {status}: {message}")),
            _ => WriteOutcome::Refused {
                status,
                what: format!(
                    "InfluxDB answered {status} for {} ({message}); check influx.url and the \
                     server's logs",
                    self.target
                ),
            },
        }
    }
}

impl Endpoint for WriteClient {
    const NAMES: crate::events::OutputNames = crate::events::INFLUX;

    fn encode(&self, m: &proto::Measurement, out: &mut String) -> Result<(), String> {
        measurement_point(m, self.precision)
            .and_then(|p| encode_point(out, &p))
            .map_err(|e| e.to_string())?;
        if out.ends_with('\n') {
            out.pop();
        }
        Ok(())
    }

    /// The writer's batches are InfluxDB's requests: `batch_points` bounds them.
    fn limits(&self) -> (usize, usize) {
        (usize::MAX, usize::MAX)
    }

    async fn write(&self, lines: &str, _count: usize) -> WriteOutcome {
        WriteClient::write(self, lines.as_bytes()).await
    }

    fn endpoint(&self) -> String {
        WriteClient::endpoint(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after.get()
    }

    fn spool_format(&self) -> Option<(&'static str, String)> {
        Some((
            "influx_writer.influx.precision",
            self.precision.v2_param().to_string(),
        ))
    }
}

/// The most a `Retry-After` is read as (a date from a wrong clock can be years away); the
/// sink waits at most its `retry_max_ms` anyway.
pub(crate) const RETRY_AFTER_MAX: Duration = Duration::from_secs(15 * 60);

/// The `Retry-After` of a client's last answer (a 429 or 503 may say how long to wait), shared
/// by the client's clones.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetryAfter(Arc<AtomicU64>);

impl RetryAfter {
    pub(crate) fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Take the answer's `Retry-After`, if it has one that parses.
    pub(crate) fn note(&self, resp: &reqwest::Response) {
        let asked = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        if let Some(d) = asked {
            // At least 1 ms, so that "0" is still "asked" (and never "none").
            self.0
                .store((d.as_millis() as u64).max(1), Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110 §10.2.3), at most
/// [`RETRY_AFTER_MAX`]; a date in the past is no wait.
pub(crate) fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(d.min(RETRY_AFTER_MAX))
}

/// Most bytes of an error answer's body read: enough for any server's message (JSON or text).
const ERROR_BODY_BYTES: usize = 16 * 1024;

/// An error answer's body, at most [`ERROR_BODY_BYTES`] of it: only its message is wanted, and
/// a server (or something pretending to be one) that sends a body without end must not fill
/// the memory of a Pi. The rest is not read; the connection is dropped with the answer.
pub(crate) async fn error_body(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < ERROR_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = ERROR_BODY_BYTES - buf.len();
                buf.extend_from_slice(&c[..c.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

pub(crate) fn strip_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

pub(crate) fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    // Level 1: most of the ratio at a fraction of the CPU, which matters on a Pi.
    let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 8), Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

/// The message from an error body: `{"error": …}` (1.x), `{"message": …}` (2.x/3.x), or the
/// text itself, cut to a readable length.
/// The credentials in an `Authorization` value (or a token header's): the whole value, and
/// what follows its scheme ("Bearer", "Token", "Basic").
pub(crate) fn secrets_of(value: &str) -> Vec<String> {
    let mut out = vec![value.to_string()];
    if let Some((_, cred)) = value.split_once(' ') {
        out.push(cred.trim().to_string());
    }
    out.retain(|s| s.len() >= 4);
    out
}

/// `message` with every one of `secrets` blanked: an endpoint whose error answer echoes the
/// request's headers must not put the writer's token in its log, its dead letters and the bus.
pub(crate) fn scrub(message: String, secrets: &[String]) -> String {
    secrets.iter().fold(message, |m, s| {
        if m.contains(s.as_str()) {
            m.replace(s.as_str(), "(secret)")
        } else {
            m
        }
    })
}

pub fn server_message(text: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            ["error", "message"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|m| m.as_str()).map(str::to_string))
        });
    let mut m = from_json.unwrap_or_else(|| text.trim().to_string());
    if m.is_empty() {
        m = "(no message)".into();
    }
    if m.len() > 1024 {
        let mut cut = 1024;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push('…');
    }
    m
}

pub(crate) fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // The source chain says why (refused, DNS, TLS), without the URL's query repeated.
    let mut cause = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    if cause.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echoed_token_is_blanked() {
        let secrets = secrets_of("Bearer s3cret-token");
        assert_eq!(
            scrub("bad auth header: Bearer s3cret-token".into(), &secrets),
            "bad auth header: (secret)"
        );
        assert_eq!(
            scrub("token s3cret-token refused".into(), &secrets),
            "token (secret) refused"
        );
        assert_eq!(scrub("nothing here".into(), &secrets), "nothing here");
    }

    #[test]
    fn server_messages_from_each_version() {
        assert_eq!(
            server_message(r#"{"error":"unable to parse 'x': missing fields"}"#),
            "unable to parse 'x': missing fields"
        );
        assert_eq!(
            server_message(r#"{"code":"invalid","message":"partial write: field type conflict"}"#),
            "partial write: field type conflict"
        );
        assert_eq!(server_message("  plain text\n"), "plain text");
        assert_eq!(server_message(""), "(no message)");
        assert!(server_message(&"é".repeat(2000)).len() <= 1024 + '…'.len_utf8());
    }

    use std::io::{BufRead as _, BufReader, Read as _};
    use std::sync::mpsc;

    use crate::config::InfluxConfig;

    #[derive(Debug)]
    struct Seen {
        request_line: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// A one-request HTTP server answering `response`; reports what it received.
    fn stub(response: &'static str) -> (u16, mpsc::Receiver<Seen>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut request_line = String::new();
            r.read_line(&mut request_line).unwrap();
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                headers.push((k.to_string(), v.trim().to_string()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            std::io::Write::write_all(&mut s, response.as_bytes()).unwrap();
            tx.send(Seen {
                request_line,
                headers,
                body,
            })
            .unwrap();
        });
        (port, rx)
    }

    fn v2_target(port: u16) -> InfluxTarget {
        InfluxTarget {
            cfg: InfluxConfig {
                url: format!("http://127.0.0.1:{port}/prefix/"),
                org: Some("my org".into()),
                bucket: Some("wattbus".into()),
                ..InfluxConfig::default()
            },
            auth: Some(Secret::new("Token t0ken")),
            retry: runtime::backoff::Backoff::constant(
                std::time::Duration::from_millis(500),
                std::time::Duration::from_secs(60),
            ),
        }
    }

    const NO_CONTENT: &str = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn v2_sends_token_gzip_and_the_target_in_the_query() {
        let (port, seen) = stub(NO_CONTENT);
        let c = WriteClient::new(&v2_target(port)).unwrap();
        let body = b"power,device=a w=1 1764000000000\n";
        assert_eq!(c.write(body).await, WriteOutcome::Written);
        let s = seen.recv().unwrap();
        assert_eq!(
            s.request_line.trim_end(),
            "POST /prefix/api/v2/write?org=my+org&bucket=wattbus&precision=ms HTTP/1.1"
        );
        assert_eq!(s.header("authorization"), Some("Token t0ken"));
        assert_eq!(s.header("content-encoding"), Some("gzip"));
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&s.body[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, body);
        assert!(!c.endpoint().contains("t0ken"));
    }

    #[tokio::test]
    async fn v1_sends_basic_auth_database_and_retention_policy() {
        let (port, seen) = stub(NO_CONTENT);
        let t = InfluxTarget {
            cfg: InfluxConfig {
                url: format!("http://127.0.0.1:{port}"),
                api: WriteApi::V1,
                database: Some("wattbus".into()),
                retention_policy: Some("a year".into()),
                gzip: false,
                ..InfluxConfig::default()
            },
            auth: Some(Secret::new("Basic dTpw")),
            retry: runtime::backoff::Backoff::constant(
                std::time::Duration::from_millis(500),
                std::time::Duration::from_secs(60),
            ),
        };
        let c = WriteClient::new(&t).unwrap();
        assert_eq!(c.write(b"m v=1 1\n").await, WriteOutcome::Written);
        let s = seen.recv().unwrap();
        assert_eq!(
            s.request_line.trim_end(),
            "POST /write?db=wattbus&rp=a+year&precision=ms HTTP/1.1"
        );
        assert_eq!(s.header("authorization"), Some("Basic dTpw"));
        assert_eq!(s.header("content-encoding"), None);
        assert_eq!(s.body, b"m v=1 1\n");
    }

    #[tokio::test]
    async fn answers_are_sorted_into_what_to_do() {
        type Check = fn(&WriteOutcome) -> bool;
        let cases: [(&'static str, Check); 8] = [
            (
                "HTTP/1.1 301 Moved\r\nLocation: https://influx.example/api/v2/write?org=x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                |o| matches!(o, WriteOutcome::Refused { status: 301, what } if what.contains("https://influx.example/api/v2/write;") || what.contains("https://influx.example/api/v2/write ")),
            ),
            (
                "HTTP/1.1 422 Unprocessable\r\nContent-Length: 44\r\nConnection: close\r\n\r\n{\"message\":\"points beyond retention policy\"}",
                |o| *o == WriteOutcome::Rejected("points beyond retention policy".into()),
            ),
            (
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 60\r\nConnection: close\r\n\r\n<html>The plain HTTP request was sent to HTTPS port</html>\n",
                |o| matches!(o, WriteOutcome::Refused { status: 400, what } if what.contains("influx.url") && what.contains("HTTPS port")),
            ),
            (
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                |o| matches!(o, WriteOutcome::Refused { status: 401, what } if what.contains("token")),
            ),
            (
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                |o| matches!(o, WriteOutcome::Refused { status: 404, what } if what.contains("bucket \"wattbus\"") && what.contains("api = \"v1\"")),
            ),
            (
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                |o| matches!(o, WriteOutcome::Refused { status: 405, .. }),
            ),
            (
                "HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                |o| *o == WriteOutcome::TooLarge,
            ),
            (
                "HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                |o| matches!(o, WriteOutcome::Unavailable(m) if m.starts_with("HTTP 503")),
            ),
        ];
        for (response, ok) in cases {
            let (port, _seen) = stub(response);
            let c = WriteClient::new(&v2_target(port)).unwrap();
            let o = c.write(b"m v=1 1\n").await;
            assert!(ok(&o), "{response:?} → {o:?}");
        }
        // Nobody listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = WriteClient::new(&v2_target(port)).unwrap();
        assert!(
            matches!(c.write(b"m v=1 1\n").await, WriteOutcome::Unavailable(m) if m.starts_with("cannot connect"))
        );
    }

    #[tokio::test]
    async fn a_busy_server_s_retry_after_is_kept_until_the_next_answer() {
        let (port, _seen) = stub(
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let c = WriteClient::new(&v2_target(port)).unwrap();
        assert!(matches!(
            c.write(b"m v=1 1\n").await,
            WriteOutcome::Unavailable(m) if m.starts_with("HTTP 429")
        ));
        assert_eq!(Endpoint::retry_after(&c), Some(Duration::from_secs(7)));
        // The next request (nobody answers it now) forgets it.
        assert!(matches!(
            c.write(b"m v=1 1\n").await,
            WriteOutcome::Unavailable(_)
        ));
        assert_eq!(Endpoint::retry_after(&c), None);
    }

    #[test]
    fn retry_after_is_seconds_or_a_date_and_never_hours() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        let p = |v| parse_retry_after(v, now);
        assert_eq!(p("120"), Some(Duration::from_secs(120)));
        assert_eq!(p(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            p("Wed, 21 Oct 2026 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(p("Wed, 21 Oct 2026 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(p("86400"), Some(RETRY_AFTER_MAX));
        assert_eq!(p("soon"), None);
        assert_eq!(p("-5"), None);
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let body = b"power,device=a w=1 1\n".repeat(100);
        let z = gzip(&body).unwrap();
        assert!(z.len() < body.len() / 5);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&z[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }
}
