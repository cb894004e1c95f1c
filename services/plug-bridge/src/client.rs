//! The HTTP requests to each kind of plug (see `device` for what they answer).

use std::time::Duration;

use crate::config::{Plug, PlugKind};
use crate::device::{self, PlugReading};
use crate::digest::{self as digest_auth, Challenge};

/// Most of an answer read: a plug's JSON is a few hundred bytes; anything larger is not a plug.
const MAX_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PlugClientError {
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

/// Why a request to a plug gave no reading.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP {status}: {hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{url}: {problem}")]
    Answer { url: String, problem: String },
}

#[derive(Clone)]
pub struct PlugClient {
    http: reqwest::Client,
    timeout: Duration,
    /// The Tasmota plugs' answers, when there are any.
    tasmota: Option<std::sync::Arc<crate::tasmota::Hub>>,
    /// Each password-protected Shelly's last digest challenge and how often its nonce was
    /// used, so a request needs no extra round trip until the plug changes its nonce.
    digest: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (Challenge, u32)>>>,
}

/// Shelly's user when a password is set.
const SHELLY_USER: &str = "admin";

impl PlugClient {
    pub fn new(timeout: Duration) -> Result<Self, PlugClientError> {
        // reqwest is built with rustls and no provider chosen; plugs speak plain http, but the
        // client needs one to exist.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A plug is one device on the LAN: no proxy from the environment in between.
            .no_proxy()
            .build()
            .map_err(|e| PlugClientError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            timeout,
            tasmota: None,
            digest: std::sync::Arc::default(),
        })
    }

    /// Reach the Tasmota plugs through `hub`.
    pub fn with_tasmota(mut self, hub: std::sync::Arc<crate::tasmota::Hub>) -> Self {
        self.tasmota = Some(hub);
        self
    }

    fn hub<'a>(
        &'a self,
        plug: &'a Plug,
    ) -> Result<(&'a crate::tasmota::Hub, &'a proto::Segment), PlugError> {
        match (&self.tasmota, &plug.topic) {
            (Some(hub), Some(topic)) => Ok((hub, topic)),
            _ => Err(PlugError::Answer {
                url: plug.url.clone(),
                problem: "a Tasmota plug without its MQTT topic".into(),
            }),
        }
    }

    /// Read `plug` once.
    pub async fn read(&self, plug: &Plug) -> Result<PlugReading, PlugError> {
        match plug.kind {
            PlugKind::Mystrom => {
                let body = self.get(plug, "/report").await?;
                device::mystrom_report(&body).map_err(|problem| PlugError::Answer {
                    url: plug.url.clone(),
                    problem,
                })
            }
            PlugKind::Shelly => {
                let path = format!("/rpc/Switch.GetStatus?id={}", plug.switch_id);
                let body = self.get(plug, &path).await?;
                device::shelly_status(&body).map_err(|problem| PlugError::Answer {
                    url: plug.url.clone(),
                    problem,
                })
            }
            PlugKind::Tasmota => {
                let (hub, topic) = self.hub(plug)?;
                hub.read(topic, self.timeout)
                    .await
                    .map_err(|problem| PlugError::Answer {
                        url: plug.url.clone(),
                        problem,
                    })
            }
        }
    }

    /// Set `plug`'s relay to `on` (an explicit state: a retried call cannot undo itself, as
    /// a toggle would).
    pub async fn switch(&self, plug: &Plug, on: bool) -> Result<(), PlugError> {
        let path = match plug.kind {
            PlugKind::Mystrom => format!("/relay?state={}", u8::from(on)),
            PlugKind::Shelly => format!("/rpc/Switch.Set?id={}&on={on}", plug.switch_id),
            PlugKind::Tasmota => {
                let (hub, topic) = self.hub(plug)?;
                return hub
                    .switch(topic, on, self.timeout)
                    .await
                    .map_err(|problem| PlugError::Answer {
                        url: plug.url.clone(),
                        problem,
                    });
            }
        };
        self.get(plug, &path).await.map(|_| ())
    }

    fn digest_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (Challenge, u32)>> {
        self.digest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One GET, with the plug's credentials: myStrom's token, or the answer to a Shelly's
    /// last digest challenge.
    async fn send(
        &self,
        plug: &Plug,
        url: &str,
        path: &str,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut req = self.http.get(url);
        if let Some(t) = &plug.token {
            req = req.header("Token", t.expose());
        }
        if let Some(password) = &plug.password {
            let answer = {
                let mut cache = self.digest_cache();
                cache.get_mut(&plug.url).map(|(c, nc)| {
                    *nc = nc.wrapping_add(1);
                    digest_auth::authorization(
                        c,
                        SHELLY_USER,
                        password.expose(),
                        "GET",
                        path,
                        *nc,
                        &cnonce(),
                    )
                })
            };
            if let Some(a) = answer {
                req = req.header(reqwest::header::AUTHORIZATION, a);
            }
        }
        req.send().await
    }

    async fn get(&self, plug: &Plug, path: &str) -> Result<Vec<u8>, PlugError> {
        let url = format!("{}{path}", plug.url);
        let http = |source| PlugError::Http {
            url: url.clone(),
            source,
        };
        let mut resp = self.send(plug, &url, path).await.map_err(http)?;
        // A Shelly with a password: answer its challenge (once; a second 401 is a wrong
        // password).
        if resp.status().as_u16() == 401 && plug.kind == PlugKind::Shelly && plug.password.is_some()
        {
            // The first challenge that can be answered, of all it offers (RFC 7616 lets a
            // server offer MD5 and SHA-256 side by side).
            let mut challenge = None;
            for v in resp.headers().get_all(reqwest::header::WWW_AUTHENTICATE) {
                let parsed = digest_auth::parse_challenge(v.to_str().unwrap_or(""));
                let answerable = parsed.is_ok();
                if challenge.is_none() || answerable {
                    challenge = Some(parsed);
                }
                if answerable {
                    break;
                }
            }
            match challenge {
                Some(Ok(c)) => {
                    self.digest_cache().insert(plug.url.clone(), (c, 0));
                    resp = self.send(plug, &url, path).await.map_err(http)?;
                }
                Some(Err(problem)) => {
                    return Err(PlugError::Answer {
                        url: url.clone(),
                        problem,
                    });
                }
                None => {}
            }
        }
        let status = resp.status().as_u16();
        if status != 200 {
            let hint = match (status, plug.kind) {
                (401 | 403, PlugKind::Mystrom) => {
                    "refused: the plug has an API token set; give it as token_file"
                }
                (401 | 403, PlugKind::Shelly) if plug.password.is_some() => {
                    "refused: the password (password_file) is not the plug's"
                }
                (401 | 403, PlugKind::Shelly) => {
                    "the plug asks for its password: give it as password_file"
                }
                (404, _) => "not found: is this the right kind of plug (kind)?",
                _ => "not a reading",
            };
            return Err(PlugError::Status {
                url: url.clone(),
                status,
                hint,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(PlugError::Answer {
                    url: url.clone(),
                    problem: format!("answered more than {MAX_BODY} bytes: not a plug"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A fresh client nonce: 16 random bytes, hex.
fn cnonce() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No randomness from the system: the time still differs per request.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
