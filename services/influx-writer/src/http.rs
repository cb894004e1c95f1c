//! The InfluxDB write request: one POST of line protocol, its answer sorted into what the
//! writer has to do next.
//!
//! Status codes (InfluxDB 1.x, 2.x and 3.x agree on these; VictoriaMetrics answers 204 and
//! skips bad lines itself):
//! - 204 (or any 2xx): written.
//! - 400: malformed or refused points (bad syntax, a field type conflict, a point outside the
//!   retention policy). 1.x and 2.x write the good points of the batch and report the first
//!   bad one; the writer finds the bad line(s) by splitting, which is safe because writes are
//!   idempotent.
//! - 413: the body is too large: split and resend.
//! - 401/403/404: a setting is wrong (token, credentials, bucket, database). Nothing will
//!   change until a person fixes it; the data is kept.
//! - 429/5xx, timeouts, refused connections: the server is busy or away; back off and retry.

use std::io::Write as _;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use runtime::Secret;

use crate::config::{Api, Target};

/// What the server made of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// 400 with the server's message.
    Rejected(String),
    /// 413.
    TooLarge,
    /// 401, 403 or 404: a person has to fix a setting. `what` says which one.
    Refused {
        status: u16,
        what: String,
    },
    /// 429, 5xx or no answer at all: try again later.
    Unavailable(String),
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("influx.url {url:?} is not a valid URL: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    Build(String),
}

/// A write endpoint with its URL, headers and settings fixed at start-up.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    url: reqwest::Url,
    auth: Option<HeaderValue>,
    gzip: bool,
    /// Names the target in error messages: `bucket "b" (org "o")` or `database "db"`.
    target: String,
    api: Api,
}

impl Client {
    pub fn new(t: &Target) -> Result<Self, ClientError> {
        // reqwest is built without a default crypto provider (that would be aws-lc-rs, a C
        // build); ring is ours. A second install (a test that builds two clients) is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let c = &t.cfg;
        let base = c.url.trim().trim_end_matches('/');
        let path = match c.api {
            Api::V2 => "/api/v2/write",
            Api::V1 => "/write",
        };
        let mut url =
            reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| ClientError::Url {
                url: c.url.clone(),
                reason: e.to_string(),
            })?;
        let target = {
            let mut q = url.query_pairs_mut();
            match c.api {
                Api::V2 => {
                    let org = c.org.clone().unwrap_or_default();
                    let bucket = c.bucket.clone().unwrap_or_default();
                    q.append_pair("org", &org)
                        .append_pair("bucket", &bucket)
                        .append_pair("precision", c.precision.v2_param());
                    format!("bucket {bucket:?} (org {org:?})")
                }
                Api::V1 => {
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
                    ClientError::Build(
                        "the token or password holds characters a header cannot carry".into(),
                    )
                })?;
                v.set_sensitive(true);
                Ok::<_, ClientError>(v)
            })
            .transpose()?;
        let timeout = Duration::from_millis(c.timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("wattbus-influx-writer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self {
            http,
            url,
            auth,
            gzip: c.gzip,
            target,
            api: c.api,
        })
    }

    /// Where writes go, without credentials (they are never in the URL), for logs.
    pub fn endpoint(&self) -> String {
        format!("{} ({})", self.url.as_str(), self.target)
    }

    /// POST one body of line protocol.
    pub async fn write(&self, body: &[u8]) -> Outcome {
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
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Unavailable(describe_transport(&e)),
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Outcome::Written;
        }
        let text = resp.text().await.unwrap_or_default();
        let message = server_message(&text);
        match status {
            400 => Outcome::Rejected(message),
            413 => Outcome::TooLarge,
            401 | 403 => Outcome::Refused {
                status,
                what: format!(
                    "InfluxDB refused the {} for {} ({status}: {message}); check {}",
                    match self.api {
                        Api::V2 => "token",
                        Api::V1 => "credentials",
                    },
                    self.target,
                    match self.api {
                        Api::V2 => "influx.token / token_file and that it may write this bucket",
                        Api::V1 => "influx.username and password / password_file",
                    }
                ),
            },
            404 => Outcome::Refused {
                status,
                what: format!(
                    "InfluxDB has no {} or no write API at this URL ({status}: {message}); \
                     check influx.url and that the {} exists{}",
                    self.target,
                    match self.api {
                        Api::V2 => "bucket",
                        Api::V1 => "database",
                    },
                    match self.api {
                        Api::V2 => " (InfluxDB 1.6/1.7 have no /api/v2/write: use api = \"v1\")",
                        Api::V1 => "",
                    }
                ),
            },
            _ => Outcome::Unavailable(format!("HTTP {status}: {message}")),
        }
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    // Level 1: most of the ratio at a fraction of the CPU, which matters on a Pi.
    let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 8), Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

/// The message from an error body: `{"error": …}` (1.x), `{"message": …}` (2.x/3.x), or the
/// text itself, cut to a readable length.
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

fn describe_transport(e: &reqwest::Error) -> String {
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
