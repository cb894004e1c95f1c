//! The HTTP output's request: readings as JSON POSTed to a user's URL, and the answer sorted
//! into what the writer does next.
//!
//! The body is a [`proto::ReadingBatch`] (`proto/schemas/reading_batch.json`):
//! `{"format":"wattbus.readings.v1","site":…,"readings":[…]}`, each reading the bus's own
//! [`proto::Measurement`] with its `origin`. With `one_per_request` it is one reading alone.
//! The spool holds one reading per line, so a batch is only its lines joined.
//!
//! Status codes:
//! - 2xx: stored. Redirects are not followed (a POST redirected becomes a GET without its
//!   body, and a login page answering 200 would pass for a write).
//! - 401, 403, 407: the token or credentials are wrong. 404, 405, 410, a 3xx: the URL is
//!   wrong. 415: the endpoint does not take this body (gzip, JSON). A person has to fix a
//!   setting; the readings wait in the spool.
//! - 413: too large: split and resend.
//! - 408, 429, 5xx, timeouts, refused connections: busy or away; back off, retry.
//! - Any other 4xx (400, 409, 422, …): the endpoint refuses these readings. The request is
//!   split until the refused reading is alone; it is dead-lettered with the server's answer
//!   and the rest are delivered.

use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue};
use std::time::Duration;

use proto::{Measurement, Payload as _, Segment};

use crate::config::{HttpAuth, HttpTarget};
use crate::http::{
    RetryAfter, WriteOutcome, describe_transport, error_body, gzip, scrub, secrets_of,
    server_message, strip_query,
};
use crate::sink::Endpoint;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PostClientError {
    #[error("influx_writer.http.url {url:?} is not a valid URL: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot set up the HTTP output's client: {0}")]
    Build(String),
}

/// The HTTP output's endpoint, with its headers and limits fixed at start-up.
#[derive(Debug, Clone)]
pub struct PostClient {
    http: reqwest::Client,
    url: reqwest::Url,
    auth: Option<(HeaderName, HeaderValue)>,
    gzip: bool,
    one_per_request: bool,
    max_readings: usize,
    max_bytes: usize,
    /// `{"format":…,"site":…,"readings":[`: what precedes the readings in every batch.
    head: String,
    /// The last answer's `Retry-After`.
    retry_after: RetryAfter,
    /// What is blanked in the endpoint's messages.
    secrets: Vec<String>,
}

impl PostClient {
    pub fn new(t: &HttpTarget, site: &Segment) -> Result<Self, PostClientError> {
        // As for the InfluxDB client: ring is the crypto provider, installed once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let c = &t.cfg;
        let url = reqwest::Url::parse(c.url.trim()).map_err(|e| PostClientError::Url {
            url: c.url.clone(),
            reason: e.to_string(),
        })?;
        let sensitive = |v: &str| {
            let mut v = HeaderValue::from_str(v).map_err(|_| {
                PostClientError::Build(
                    "the token or password holds characters a header cannot carry".into(),
                )
            })?;
            v.set_sensitive(true);
            Ok::<_, PostClientError>(v)
        };
        let secrets = match &t.auth {
            None => Vec::new(),
            Some(HttpAuth::Bearer(token) | HttpAuth::Header { token, .. }) => {
                secrets_of(token.expose())
            }
            Some(HttpAuth::Basic(value)) => secrets_of(value.expose()),
        };
        let auth = match &t.auth {
            None => None,
            Some(HttpAuth::Bearer(token)) => Some((
                AUTHORIZATION,
                sensitive(&format!("Bearer {}", token.expose()))?,
            )),
            Some(HttpAuth::Basic(value)) => Some((AUTHORIZATION, sensitive(value.expose())?)),
            Some(HttpAuth::Header { name, token }) => Some((
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| PostClientError::Build(format!("token_header {name:?}: {e}")))?,
                sensitive(token.expose())?,
            )),
        };
        let timeout = Duration::from_millis(c.timeout_ms);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("wattbus-influx-writer/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &t.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| PostClientError::Build(format!("ca_file: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| PostClientError::Build(telemetry_chain(&e)))?;
        let head = format!(
            "{{\"format\":\"{}\",\"site\":\"{}\",\"readings\":[",
            proto::READING_BATCH_FORMAT,
            site.as_str()
        );
        Ok(Self {
            http,
            url,
            auth,
            gzip: c.gzip,
            one_per_request: c.one_per_request,
            max_readings: c.max_readings,
            max_bytes: c.max_bytes,
            head,
            retry_after: RetryAfter::default(),
            secrets,
        })
    }

    /// The request body for `count` newline-terminated readings.
    fn body(&self, lines: &str, count: usize) -> String {
        if self.one_per_request && count == 1 {
            return lines.trim_end_matches('\n').to_string();
        }
        let mut body = String::with_capacity(self.head.len() + lines.len() + 2);
        body.push_str(&self.head);
        for (i, line) in lines.lines().filter(|l| !l.is_empty()).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(line);
        }
        body.push_str("]}");
        body
    }

    /// POST one body and sort the answer.
    async fn post(&self, body: String) -> WriteOutcome {
        let mut req = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some((name, value)) = &self.auth {
            req = req.header(name.clone(), value.clone());
        }
        req = if self.gzip {
            match gzip(body.as_bytes()) {
                Ok(z) => req.header(CONTENT_ENCODING, "gzip").body(z),
                Err(_) => req.body(body),
            }
        } else {
            req.body(body)
        };
        self.retry_after.clear();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let why = describe_transport(&e);
                if is_certificate_problem(&why) {
                    // Retrying cannot help: a setting (or the endpoint's certificate) must
                    // change.
                    return WriteOutcome::Refused {
                        status: 0,
                        what: format!(
                            "The HTTP endpoint's TLS certificate is not trusted ({why}); set \
                             influx_writer.http.ca_file to the CA that signed it (a self-signed \
                             certificate used as it is must say CA:FALSE: openssl req -x509 \
                             -addext basicConstraints=critical,CA:FALSE …)"
                        ),
                    };
                }
                return WriteOutcome::Unavailable(why);
            }
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return WriteOutcome::Written;
        }
        self.retry_after.note(&resp);
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(|l| strip_query(l).to_string());
        let text = error_body(resp).await;
        let message = server_message(&scrub(text, &self.secrets));
        let url = strip_query(self.url.as_str()).to_string();
        let refused = |what: String| WriteOutcome::Refused { status, what };
        match status {
            300..=399 => refused(format!(
                "The HTTP endpoint {url} answers with a redirect ({status}) to {}; set \
                 influx_writer.http.url to the address that takes readings",
                location.as_deref().unwrap_or("(no Location)")
            )),
            401 | 403 | 407 => refused(format!(
                "The HTTP endpoint {url} refused the writer's credentials ({status}: {message}); \
                 check influx_writer.http.token / token_file{}",
                if self.auth.is_none() {
                    " (none is set)"
                } else {
                    ", or username and password / password_file"
                }
            )),
            404 | 405 | 410 => refused(format!(
                "The HTTP endpoint {url} takes no POST of readings ({status}: {message}); check \
                 influx_writer.http.url"
            )),
            415 => refused(format!(
                "The HTTP endpoint {url} does not take this body ({status}: {message}); {}",
                if self.gzip {
                    "it may not decode gzip: set influx_writer.http.gzip = false"
                } else {
                    "it must take application/json"
                }
            )),
            413 => WriteOutcome::TooLarge,
            // "Already have it": the reading is stored (a retry after a timeout, the closing
            // probe of a round, a replay). The endpoint dedups, as it is asked to.
            409 => WriteOutcome::Written,
            408 | 429 => WriteOutcome::Unavailable(format!("HTTP {status}: {message}")),
            500..=599 => WriteOutcome::ServerError(format!("HTTP {status}: {message}")),
            400..=499 => WriteOutcome::Rejected(format!("HTTP {status}: {message}")),
            _ => refused(format!(
                "The HTTP endpoint {url} answered {status} ({message}); check influx_writer.http.url \
                 and the server's logs"
            )),
        }
    }
}

impl Endpoint for PostClient {
    const NAMES: crate::events::OutputNames = crate::events::HTTP;
    const CAUTIOUS: bool = true;

    /// Services' statuses are the health dashboard's, in InfluxDB; the endpoint gets readings.
    fn takes(&self, m: &Measurement) -> bool {
        m.measurement.as_str() != crate::status::MEASUREMENT
    }

    fn encode(&self, m: &Measurement, out: &mut String) -> Result<(), String> {
        // Validated as any reading on the bus is; JSON escapes every newline.
        let json = m.encode().map_err(|e| e.to_string())?;
        let text = std::str::from_utf8(&json).map_err(|e| e.to_string())?;
        out.push_str(text);
        Ok(())
    }

    fn limits(&self) -> (usize, usize) {
        if self.one_per_request {
            (1, usize::MAX)
        } else {
            (self.max_readings, self.max_bytes)
        }
    }

    async fn write(&self, lines: &str, count: usize) -> WriteOutcome {
        self.post(self.body(lines, count)).await
    }

    fn credentials_in_clear(&self) -> bool {
        let local = self.url.host_str().is_none_or(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        self.auth.is_some() && self.url.scheme() == "http" && !local
    }

    fn endpoint(&self) -> String {
        format!(
            "{}{}",
            strip_query(self.url.as_str()),
            if self.one_per_request {
                " (one reading per request)"
            } else {
                ""
            }
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after.get()
    }
}

/// Whether a transport failure is the endpoint's certificate being refused (rustls'
/// `InvalidCertificate` errors and the platform verifier's), not the network.
fn is_certificate_problem(why: &str) -> bool {
    let w = why.to_ascii_lowercase();
    w.contains("certificate") || w.contains("unknownissuer")
}

fn telemetry_chain(e: &reqwest::Error) -> String {
    runtime::telemetry::chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, HttpConfig};

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn reading(i: i64) -> Measurement {
        Measurement {
            origin: None,
            site: seg("home"),
            device: seg("m-1"),
            channel: seg("l1"),
            measurement: seg("power"),
            ts_ms: 1_796_000_000_000 + i,
            quality: proto::Quality::Good,
            fields: [("power_w".to_string(), 230.5)].into_iter().collect(),
            tags: Default::default(),
        }
    }

    fn client(c: HttpConfig) -> PostClient {
        let plan = Config {
            http: Some(c),
            ..Config::default()
        }
        .resolve("influx_writer")
        .unwrap();
        PostClient::new(plan.http_target().unwrap(), &seg("home")).unwrap()
    }

    #[test]
    fn a_batch_body_is_a_valid_reading_batch_and_holds_every_reading_in_order() {
        let c = client(HttpConfig {
            url: "http://127.0.0.1:1/in".into(),
            ..HttpConfig::default()
        });
        let mut lines = String::new();
        for i in 0..3 {
            c.encode(&reading(i), &mut lines).unwrap();
            lines.push('\n');
        }
        let body = c.body(&lines, 3);
        let batch = proto::ReadingBatch::decode(body.as_bytes()).unwrap();
        assert_eq!(batch.format, proto::READING_BATCH_FORMAT);
        assert_eq!(batch.site.as_str(), "home");
        assert_eq!(batch.readings, (0..3).map(reading).collect::<Vec<_>>());
    }

    #[test]
    fn credentials_over_plain_http_to_another_machine_are_flagged() {
        let with = |url: &str, token: bool| {
            client(HttpConfig {
                url: url.into(),
                token: token.then(|| runtime::Secret::new("t0ken")),
                ..HttpConfig::default()
            })
            .credentials_in_clear()
        };
        assert!(with("http://192.168.1.20:1880/in", true));
        assert!(with("http://backend.lan/in", true));
        assert!(!with("http://192.168.1.20:1880/in", false));
        assert!(!with("https://backend.lan/in", true));
        assert!(!with("http://127.0.0.1:1880/in", true));
        assert!(!with("http://localhost:1880/in", true));
        assert!(!with("http://[::1]:1880/in", true));
    }

    #[test]
    fn one_per_request_sends_the_reading_itself() {
        let c = client(HttpConfig {
            url: "http://127.0.0.1:1/in".into(),
            one_per_request: true,
            ..HttpConfig::default()
        });
        assert_eq!(c.limits().0, 1);
        let mut line = String::new();
        c.encode(&reading(7), &mut line).unwrap();
        line.push('\n');
        let m = Measurement::decode(c.body(&line, 1).as_bytes()).unwrap();
        assert_eq!(m, reading(7));
    }

    #[test]
    fn statuses_are_left_to_influxdb_and_invalid_readings_are_refused() {
        let c = client(HttpConfig {
            url: "http://127.0.0.1:1/in".into(),
            ..HttpConfig::default()
        });
        let mut status = reading(0);
        status.measurement = seg(crate::status::MEASUREMENT);
        assert!(!c.takes(&status));
        assert!(c.takes(&reading(0)));
        let mut bad = reading(0);
        bad.fields.insert("power_w".into(), f64::NAN);
        let mut out = String::new();
        let e = c.encode(&bad, &mut out).unwrap_err();
        assert!(e.contains("finite"), "{e}");
        assert!(out.is_empty());
    }

    /// The checked-in schema is the one proto generates, and a body the writer builds
    /// validates against what it promises: the field names and the format constant.
    #[test]
    fn the_schema_names_what_the_body_holds() {
        let schema: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../proto/schemas/reading_batch.json"
        )))
        .unwrap();
        let props = &schema["properties"];
        for k in ["format", "site", "readings"] {
            assert!(props.get(k).is_some(), "{k} missing from {schema}");
        }
    }
}
