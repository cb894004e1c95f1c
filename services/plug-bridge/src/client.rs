//! The HTTP requests to each kind of plug (see `device` for what they answer).

use std::time::Duration;

use crate::config::{Kind, Plug};
use crate::device::{self, Reading};

/// Most of an answer read: a plug's JSON is a few hundred bytes; anything larger is not a plug.
const MAX_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
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
pub struct Client {
    http: reqwest::Client,
    timeout: Duration,
    /// The Tasmota plugs' answers, when there are any.
    tasmota: Option<std::sync::Arc<crate::tasmota::Hub>>,
}

impl Client {
    pub fn new(timeout: Duration) -> Result<Self, ClientError> {
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
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            timeout,
            tasmota: None,
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
    pub async fn read(&self, plug: &Plug) -> Result<Reading, PlugError> {
        match plug.kind {
            Kind::Mystrom => {
                let body = self.get(plug, "/report").await?;
                device::mystrom_report(&body).map_err(|problem| PlugError::Answer {
                    url: plug.url.clone(),
                    problem,
                })
            }
            Kind::Shelly => {
                let path = format!("/rpc/Switch.GetStatus?id={}", plug.switch_id);
                let body = self.get(plug, &path).await?;
                device::shelly_status(&body).map_err(|problem| PlugError::Answer {
                    url: plug.url.clone(),
                    problem,
                })
            }
            Kind::Tasmota => {
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
            Kind::Mystrom => format!("/relay?state={}", u8::from(on)),
            Kind::Shelly => format!("/rpc/Switch.Set?id={}&on={on}", plug.switch_id),
            Kind::Tasmota => {
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

    async fn get(&self, plug: &Plug, path: &str) -> Result<Vec<u8>, PlugError> {
        let url = format!("{}{path}", plug.url);
        let http = |source| PlugError::Http {
            url: url.clone(),
            source,
        };
        let mut req = self.http.get(&url);
        if let Some(t) = &plug.token {
            req = req.header("Token", t.expose());
        }
        let mut resp = req.send().await.map_err(http)?;
        let status = resp.status().as_u16();
        if status != 200 {
            let hint = match (status, plug.kind) {
                (401 | 403, Kind::Mystrom) => {
                    "refused: the plug has an API token set; give it as token_file"
                }
                (401 | 403, Kind::Shelly) => {
                    "the plug asks for its password: Shelly authentication is not supported yet; turn it off for the LAN"
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
