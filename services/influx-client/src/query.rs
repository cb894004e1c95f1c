//! InfluxQL over `/query`.
//!
//! The read path every InfluxDB speaks: 1.x natively, 2.x through a DBRP mapping (with a token),
//! 3.x through its v1-compatible API. Answers are JSON; with `chunked=true` they come as one JSON
//! document per line, each holding at most `chunk_size` rows of one series, so an export of a
//! month never holds more than one chunk in memory ([`Connection::stream`]).
//!
//! Timestamps are asked for as integer nanoseconds (`epoch=ns`): exact, and what line protocol
//! writes back. Numbers come as JSON numbers: a float field holding 5.0 comes back as `5`, so
//! the field's type must come from `SHOW FIELD KEYS`, never from the JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// How a request proves who it is.
#[derive(Clone)]
pub enum Auth {
    /// InfluxDB 1.x users (HTTP basic authentication, which 1.x takes on `/query`).
    Basic { user: String, password: String },
    /// InfluxDB 2.x/3.x: `Authorization: Token …`.
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { user, .. } => write!(f, "Basic({user:?}, ***)"),
            Auth::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// One series of an answer: a measurement and, with `GROUP BY`, its tag set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Series {
    /// The measurement; SHOW RETENTION POLICIES and SHOW DATABASES answer without one.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub columns: Vec<String>,
    #[serde(default)]
    pub values: Vec<Vec<serde_json::Value>>,
}

/// A retention policy as `SHOW RETENTION POLICIES` gives it (backup sets record it so a restore
/// can make it again; `wattbus influx setup` compares it with what it wants).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub name: String,
    /// InfluxQL's duration (`720h0m0s`, `0s` for ever).
    pub duration: String,
    pub shard_duration: String,
    pub default: bool,
}

/// The policies in an answer to `SHOW RETENTION POLICIES`, by column name (their order
/// differs between InfluxDB versions). A series without the four columns gives none.
pub fn retention_policies(series: &[Series]) -> Vec<RetentionPolicy> {
    let mut out = Vec::new();
    for s in series {
        let col = |name: &str| s.columns.iter().position(|c| c == name);
        let (Some(n), Some(d), Some(sd), Some(def)) = (
            col("name"),
            col("duration"),
            col("shardGroupDuration"),
            col("default"),
        ) else {
            continue;
        };
        for row in &s.values {
            let text = |i: usize| {
                row.get(i)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            out.push(RetentionPolicy {
                name: text(n),
                duration: text(d),
                shard_duration: text(sd),
                default: row
                    .get(def)
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
            });
        }
    }
    out
}

/// Why a query gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("InfluxDB at {url} could not be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "InfluxDB at {url} refused the credentials ({status}): check the user and password (1.x) or the token (2.x), and that they may read the database"
    )]
    Auth { url: String, status: u16 },
    #[error("InfluxDB refused {query:?}: {message}")]
    Refused { query: String, message: String },
    #[error("InfluxDB's answer to {query:?} could not be read: {reason}")]
    Malformed { query: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

impl QueryError {
    /// Whether trying again later can help (the server is away or busy), as opposed to a
    /// setting or a query a person has to fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueryError::Unreachable { .. })
    }
}

/// A chunked answer's line longer than this is refused rather than buffered: with
/// `chunk_size` rows of a few hundred bytes a line is a few MB.
const MAX_LINE: usize = 64 << 20;

/// An InfluxDB server and database to ask.
#[derive(Debug, Clone)]
pub struct Connection {
    http: reqwest::Client,
    base: reqwest::Url,
    database: String,
    auth: Option<Auth>,
    timeout: Duration,
}

impl Connection {
    /// `timeout` bounds a plain query end to end, and a streamed one between two reads.
    pub fn new(
        url: &str,
        database: &str,
        auth: Option<Auth>,
        timeout: Duration,
    ) -> Result<Self, QueryError> {
        let base = reqwest::Url::parse(url.trim().trim_end_matches('/'))
            .map_err(|e| QueryError::Setup(format!("{url:?} is not a valid URL: {e}")))?;
        if !base.username().is_empty() || base.password().is_some() {
            // It would be printed in errors.
            return Err(QueryError::Setup(format!(
                "the InfluxDB URL {} holds credentials: give them as a user and password file instead",
                base.host_str().unwrap_or("")
            )));
        }
        // reqwest is built without a default crypto provider (aws-lc-rs, a C build); ring is
        // the project's. A second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            // A redirected request would lose its method or meaning; a login page is no answer.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| QueryError::Setup(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            database: database.to_string(),
            auth,
            timeout,
        })
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The server, for messages (no credentials: they are refused in the URL).
    pub fn url(&self) -> &reqwest::Url {
        &self.base
    }

    fn endpoint(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        let joined = format!("{}{path}", u.path().trim_end_matches('/'));
        u.set_path(&joined);
        u
    }

    fn request(&self, q: &str, chunk_size: Option<usize>) -> reqwest::RequestBuilder {
        let mut url = self.endpoint("/query");
        {
            let mut pairs = url.query_pairs_mut();
            pairs
                .append_pair("db", &self.database)
                .append_pair("epoch", "ns")
                .append_pair("q", q);
            if let Some(n) = chunk_size {
                pairs
                    .append_pair("chunked", "true")
                    .append_pair("chunk_size", &n.to_string());
            }
        }
        // POST: SELECT … INTO and the SHOW/CREATE statements need it on 1.x, and it is
        // accepted for every read.
        let req = self.http.post(url);
        match &self.auth {
            None => req,
            Some(Auth::Basic { user, password }) => req.basic_auth(user, Some(password)),
            Some(Auth::Token(t)) => req.header("Authorization", format!("Token {t}")),
        }
    }

    /// `/ping` until it answers: the server's version (`X-Influxdb-Version`), if it says.
    pub async fn ping(&self) -> Result<Option<String>, QueryError> {
        let resp = self
            .http
            .get(self.endpoint("/ping"))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !resp.status().is_success() {
            return Err(QueryError::Unreachable {
                url: self.base.to_string(),
                reason: format!("/ping answered {}", resp.status()),
            });
        }
        Ok(resp
            .headers()
            .get("x-influxdb-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }

    fn unreachable(&self, e: &reqwest::Error) -> QueryError {
        // reqwest's Display hides the cause ("error sending request"); the chain says why.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason = format!("{reason}: {s}");
            source = s.source();
        }
        QueryError::Unreachable {
            url: self.base.to_string(),
            reason,
        }
    }

    /// One statement, answered whole: its series (none when nothing matched).
    pub async fn query(&self, q: &str) -> Result<Vec<Series>, QueryError> {
        let resp = self
            .request(q, None)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = self.status(resp.status())?;
        let body = resp.text().await.map_err(|e| self.unreachable(&e))?;
        let mut out = Vec::new();
        parse_document(q, status, &body, false, &mut out)?;
        Ok(out)
    }

    /// One statement, answered in chunks of at most `chunk_size` rows: read them one series
    /// (of one chunk) at a time with [`SeriesStream::next`].
    pub async fn stream(&self, q: &str, chunk_size: usize) -> Result<SeriesStream, QueryError> {
        let resp = self
            .request(q, Some(chunk_size.max(1)))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = self.status(resp.status())?;
        Ok(SeriesStream {
            conn: self.clone(),
            query: q.to_string(),
            resp: Some(resp),
            status,
            pending: Vec::new(),
            ready: std::collections::VecDeque::new(),
            rows: 0,
        })
    }

    fn status(&self, status: reqwest::StatusCode) -> Result<u16, QueryError> {
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(QueryError::Auth {
                url: self.base.to_string(),
                status: status.as_u16(),
            });
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(QueryError::Unreachable {
                url: self.base.to_string(),
                reason: format!("it answered {status}"),
            });
        }
        Ok(status.as_u16())
    }
}

/// A chunked answer, read a series at a time.
#[derive(Debug)]
pub struct SeriesStream {
    conn: Connection,
    query: String,
    resp: Option<reqwest::Response>,
    status: u16,
    pending: Vec<u8>,
    ready: std::collections::VecDeque<Series>,
    rows: u64,
}

impl SeriesStream {
    /// The next series (part of one chunk), `None` at the end of the answer.
    pub async fn next(&mut self) -> Result<Option<Series>, QueryError> {
        loop {
            if let Some(s) = self.ready.pop_front() {
                self.rows += s.values.len() as u64;
                return Ok(Some(s));
            }
            let Some(resp) = self.resp.as_mut() else {
                return Ok(None);
            };
            let chunk = resp.chunk().await.map_err(|e| self.conn.unreachable(&e))?;
            match chunk {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None => {
                    self.resp = None;
                    // The last document may lack its newline.
                    self.pending.push(b'\n');
                }
            }
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = std::str::from_utf8(&line).map_err(|e| QueryError::Malformed {
                    query: self.query.clone(),
                    reason: e.to_string(),
                })?;
                parse_document(&self.query, self.status, text, true, &mut self.ready)?;
            }
            if self.pending.len() > MAX_LINE {
                return Err(QueryError::Malformed {
                    query: self.query.clone(),
                    reason: format!("one chunk is over {MAX_LINE} bytes"),
                });
            }
        }
    }

    /// Rows handed out so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    results: Vec<Statement>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Statement {
    #[serde(default)]
    series: Vec<RawSeries>,
    error: Option<String>,
    /// Set on every chunk but the last of a chunked answer, and on an answer InfluxDB cut
    /// short (`max-row-limit`).
    #[serde(default)]
    partial: bool,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(flatten)]
    series: Series,
    #[serde(default)]
    partial: bool,
}

/// One JSON document of an answer (the whole body, or one line of a chunked one): its series
/// to `each`, or the error InfluxDB put in it.
fn parse_document(
    q: &str,
    status: u16,
    text: &str,
    chunked: bool,
    out: &mut impl Extend<Series>,
) -> Result<(), QueryError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(());
    }
    let doc: Document = serde_json::from_str(text).map_err(|e| QueryError::Malformed {
        query: q.to_string(),
        reason: format!("{e} (status {status}: {})", excerpt(text)),
    })?;
    if let Some(message) = doc
        .error
        .or_else(|| doc.results.iter().find_map(|r| r.error.clone()))
    {
        return Err(QueryError::Refused {
            query: q.to_string(),
            message,
        });
    }
    if !(200..300).contains(&status) {
        return Err(QueryError::Refused {
            query: q.to_string(),
            message: format!("status {status}: {}", excerpt(text)),
        });
    }
    // A whole answer marked partial was cut short by the server: taking it would back up
    // (or show) part of the data as if it were all of it.
    if !chunked
        && doc
            .results
            .iter()
            .any(|r| r.partial || r.series.iter().any(|s| s.partial))
    {
        return Err(QueryError::Refused {
            query: q.to_string(),
            message: "InfluxDB cut the answer short (partial: its [http] max-row-limit?)".into(),
        });
    }
    out.extend(
        doc.results
            .into_iter()
            .flat_map(|r| r.series.into_iter().map(|s| s.series)),
    );
    Ok(())
}

fn excerpt(text: &str) -> &str {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `"name"` with `"` and `\` escaped: an identifier safe to put in a statement.
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The column `name` of each row, as text (SHOW statements' answers).
pub fn column<'a>(series: &'a Series, name: &str) -> impl Iterator<Item = &'a str> + 'a {
    let i = series.columns.iter().position(|c| c == name);
    series
        .values
        .iter()
        .filter_map(move |row| i.and_then(|i| row.get(i)).and_then(|v| v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(text: &str) -> Result<Vec<Series>, String> {
        let mut out = Vec::new();
        parse_document("q", 200, text, false, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn collect_chunk(text: &str) -> Result<Vec<Series>, String> {
        let mut out = Vec::new();
        parse_document("q", 200, text, true, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn a_whole_answer_cut_short_is_refused_but_a_chunk_is_not() {
        let cut = r#"{"results":[{"statement_id":0,"series":[{"name":"measurements","columns":["name"],"values":[["a"],["b"]],"partial":true}]}]}"#;
        let e = collect(cut).expect_err("cut short");
        assert!(e.contains("max-row-limit"), "{e}");
        assert_eq!(collect_chunk(cut).expect("a chunk").len(), 1);
    }

    #[test]
    fn series_with_tags_and_rows() {
        let s = collect_chunk(
            r#"{"results":[{"statement_id":0,"series":[{"name":"power","tags":{"device":"a b"},"columns":["time","power_w"],"values":[[1,5],[2,5.5]]}],"partial":true}]}"#,
        )
        .expect("parsed");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].tags["device"], "a b");
        assert_eq!(s[0].values.len(), 2);
    }

    #[test]
    fn an_error_anywhere_in_the_answer_is_refused_with_its_message() {
        let e = collect(r#"{"results":[{"statement_id":0,"error":"database not found: x"}]}"#)
            .expect_err("refused");
        assert!(e.contains("database not found: x"), "{e}");
        let e = collect(r#"{"error":"error parsing query: found EOF"}"#).expect_err("refused");
        assert!(e.contains("found EOF"), "{e}");
        let e = collect("<html>proxy</html>").expect_err("refused");
        assert!(e.contains("could not be read"), "{e}");
    }

    #[test]
    fn empty_results_are_no_series() {
        assert!(
            collect(r#"{"results":[{"statement_id":0}]}"#)
                .expect("parsed")
                .is_empty()
        );
    }

    #[test]
    fn identifiers_are_quoted_and_escaped() {
        assert_eq!(ident(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(ident("power"), r#""power""#);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let a = Auth::Basic {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert!(!format!("{:?}", Auth::Token("tok".into())).contains("tok"));
    }
}
