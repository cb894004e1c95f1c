//! The HTTP API: Grafana's button and scripts switch plugs and read them.
//!
//! - `POST /api/v1/plugs/{id}/relay` `{"action": "on"|"off"|"toggle", "id": "…"?}` → the
//!   state read back from the plug (200), or why not: 401 (token), 404 (no such plug), 502
//!   (the plug reads otherwise after being switched), 503 (commands already waiting), 504 (the
//!   plug did not confirm in time; the command is dropped and never carried out later).
//! - `GET /api/v1/plugs`, `GET /api/v1/plugs/{id}`: the latest reading and availability.
//! - `GET /api/v1/openapi.json`: this description (no token: it holds no secret).
//!
//! Every request but the description carries `Authorization: Bearer <token>`. A switch goes
//! to the plug's own task, the same queue as the bus's `cmd/<plug>` commands, so one plug is
//! never switched by two requests at once, and its result is published on
//! `cmd-result/<plug>` like theirs. Every switch is logged with who asked: the peer's address
//! and, through Grafana's data source proxy, the Grafana user (`X-Grafana-User`, sent when
//! `[dataproxy] send_user_header` is on).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use proto::{Action, Command, CommandResult, Segment};
use runtime::Secret;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::SwitchOutcome;
use crate::config::{ApiPlan, PlugKind};
use crate::events::Events;

/// The OpenAPI description, served as written.
pub const OPENAPI: &str = include_str!("openapi.json");

/// A command for one plug's task, and where to tell the HTTP request how it went.
#[derive(Debug)]
pub struct Job {
    pub command: Command,
    /// When it must be done by ([`crate::deadline`]).
    pub deadline: tokio::time::Instant,
    pub reply: Option<oneshot::Sender<(CommandResult, SwitchOutcome)>>,
}

/// The latest of one plug, for `GET`.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub online: Option<bool>,
    pub relay_on: Option<bool>,
    pub power_w: Option<f64>,
    pub energy_wh: Option<f64>,
    pub temperature_c: Option<f64>,
    pub voltage_v: Option<f64>,
    pub current_a: Option<f64>,
    /// When the plug last answered (ms since the epoch).
    pub read_ts_ms: Option<i64>,
}

/// Every plug's latest, shared by the plugs' tasks (writers) and the API (reader).
#[derive(Debug, Default)]
pub struct Views(Mutex<BTreeMap<Segment, View>>);

impl Views {
    pub fn update(&self, plug: &Segment, f: impl FnOnce(&mut View)) {
        let mut views = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(views.entry(plug.clone()).or_default());
    }

    /// The plug's latest (all unknown before its first poll).
    pub fn get(&self, plug: &Segment) -> View {
        let views = self.0.lock().unwrap_or_else(|p| p.into_inner());
        views.get(plug).cloned().unwrap_or_default()
    }
}

/// What the API serves from.
pub struct ApiState {
    pub token: Secret,
    /// How long a switch may take.
    pub timeout: Duration,
    /// What the plug's task may take beyond it (see `switch`).
    grace: Duration,
    /// The plugs, in the config's order.
    pub plugs: Vec<(Segment, PlugKind)>,
    pub queues: HashMap<Segment, mpsc::Sender<Job>>,
    pub views: Arc<Views>,
    next_id: AtomicU64,
    events: Arc<Events>,
}

impl ApiState {
    /// `plug_timeout`: one request to a plug.
    pub fn new(
        api: &ApiPlan,
        plug_timeout: Duration,
        plugs: Vec<(Segment, PlugKind)>,
        queues: HashMap<Segment, mpsc::Sender<Job>>,
        views: Arc<Views>,
        events: Arc<Events>,
    ) -> Self {
        Self {
            token: api.token.clone(),
            timeout: api.timeout,
            grace: plug_timeout * 2 + Duration::from_secs(1),
            plugs,
            queues,
            views,
            next_id: AtomicU64::new(0),
            events,
        }
    }
}

/// Connections served at once; one beyond waits to be accepted.
const MAX_CONNECTIONS: usize = 32;
/// Connections from one address at once; one beyond is closed at once. A client that holds
/// its connections open (never reading its answers) then blocks only itself, not Grafana.
const MAX_PER_PEER: usize = 8;
/// A connection is closed after this, even one kept alive and busy: a client that stops
/// reading cannot hold its slot for ever.
const CONNECTION_MAX: Duration = Duration::from_secs(120);
/// The largest request body read (`{"action": "toggle", "id": …}` is under 100 bytes).
const MAX_BODY: usize = 4096;
/// A client that sends its request slower than this is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind `listen` now (a port in use is a start-up error) and serve until `shutdown`; then
/// requests in progress are answered (a switch under way is told how it went) and the task
/// ends once they are, or after `drain`.
pub async fn serve(
    listen: SocketAddr,
    state: Arc<ApiState>,
    shutdown: runtime::Shutdown,
    drain: Duration,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    state.events.api_listening(local);
    let task = tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let peers: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        loop {
            let permit = tokio::select! {
                () = shutdown.wait() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.wait() => break,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        state.events.api_accept_failed(&e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(seat) = Seat::take(&peers, peer.ip()) else {
                state.events.api_peer_limit(peer.ip(), MAX_PER_PEER);
                continue;
            };
            let state = state.clone();
            let events = state.events.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _held = (permit, seat);
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let ended = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    () = shutdown.wait() => None,
                    () = tokio::time::sleep(CONNECTION_MAX) => None,
                };
                let ended = match ended {
                    Some(r) => r,
                    None => {
                        // The request in progress is answered, then the connection closes.
                        conn.as_mut().graceful_shutdown();
                        match tokio::time::timeout(drain, conn.as_mut()).await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                };
                if let Err(e) = ended {
                    events.api_connection_ended(peer.ip(), &e);
                }
            });
        }
        // Until every connection is answered (they hold the slots), within `drain`.
        let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(drain, slots.acquire_many(all)).await;
    });
    Ok((local, task))
}

/// One connection's place among its address's.
struct Seat {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Seat {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Seat> {
        let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Seat {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn json(status: StatusCode, body: &serde_json::Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn not_allowed(allow: &'static str) -> Answer {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, format!("only {allow} here"));
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The route a path names.
enum Route<'a> {
    OpenApi,
    Plugs,
    Plug(&'a str),
    Relay(&'a str),
    Unknown,
}

fn route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return Route::Unknown;
    };
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["openapi.json"] => Route::OpenApi,
        ["plugs"] => Route::Plugs,
        ["plugs", id] if !id.is_empty() => Route::Plug(id),
        ["plugs", id, "relay"] if !id.is_empty() => Route::Relay(id),
        _ => Route::Unknown,
    }
}

fn authorized(state: &ApiState, req: &Request<Incoming>) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, token)) = value.split_first_chunk::<7>() else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && state.token.matches(token)
}

/// What a request says of who sent it, for the log: only printable ASCII, bounded.
fn claimed_user(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-grafana-user")
        .map(|v| {
            v.as_bytes()
                .iter()
                .take(64)
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(state: &ApiState, peer: SocketAddr, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    let route = route(&path);
    if let Route::OpenApi = route {
        if req.method() != Method::GET {
            return not_allowed("GET");
        }
        let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return r;
    }
    if let Route::Unknown = route {
        return error(
            StatusCode::NOT_FOUND,
            "no such path: see /api/v1/openapi.json",
        );
    }
    // The token before anything else, so a caller without it learns nothing (not even
    // which plugs exist).
    if !authorized(state, &req) {
        state.events.api_unauthorized(peer.ip(), &path);
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (Authorization: Bearer <token>)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wattbus plug-bridge\""),
        );
        return r;
    }
    match route {
        Route::Plugs => {
            if req.method() != Method::GET {
                return not_allowed("GET");
            }
            let plugs: Vec<_> = state
                .plugs
                .iter()
                .map(|(id, kind)| view_json(id, *kind, &state.views.get(id)))
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "plugs": plugs }))
        }
        Route::Plug(id) => {
            if req.method() != Method::GET {
                return not_allowed("GET");
            }
            match find(state, id) {
                Some((id, kind)) => {
                    json(StatusCode::OK, &view_json(id, *kind, &state.views.get(id)))
                }
                None => unknown_plug(),
            }
        }
        Route::Relay(id) => {
            if req.method() != Method::POST {
                return not_allowed("POST");
            }
            let Some((plug, _)) = find(state, id) else {
                return unknown_plug();
            };
            let plug = plug.clone();
            let user = claimed_user(&req);
            // A declared length over the limit is refused before anything is read.
            if hyper::body::Body::size_hint(req.body()).lower() > MAX_BODY as u64 {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is over {MAX_BODY} bytes"),
                );
            }
            let body = match tokio::time::timeout(
                READ_TIMEOUT,
                Limited::new(req.into_body(), MAX_BODY).collect(),
            )
            .await
            {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the body is over {MAX_BODY} bytes"),
                    );
                }
                Ok(Err(_)) | Err(_) => {
                    return error(StatusCode::BAD_REQUEST, "the body could not be read");
                }
            };
            switch(state, peer, &user, plug, &body).await
        }
        Route::OpenApi | Route::Unknown => error(StatusCode::NOT_FOUND, "no such path"),
    }
}

fn find<'s>(state: &'s ApiState, id: &str) -> Option<&'s (Segment, PlugKind)> {
    state.plugs.iter().find(|(p, _)| p.as_str() == id)
}

fn unknown_plug() -> Answer {
    error(
        StatusCode::NOT_FOUND,
        "no such plug: GET /api/v1/plugs lists them",
    )
}

fn view_json(id: &Segment, kind: PlugKind, v: &View) -> serde_json::Value {
    serde_json::json!({
        "id": id.as_str(),
        "kind": kind.as_str(),
        "online": v.online,
        "relay_on": v.relay_on,
        "power_w": v.power_w,
        "energy_wh": v.energy_wh,
        "temperature_c": v.temperature_c,
        "read_ts_ms": v.read_ts_ms,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayRequest {
    action: Action,
    /// The caller's id for this switch: a repeat (a retry after a lost answer) is answered
    /// again, not carried out again.
    #[serde(default, deserialize_with = "present")]
    id: Option<Segment>,
}

/// An `id` given must be one: `null` is refused, not taken for "none".
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Segment>, D::Error> {
    Segment::deserialize(d).map(Some)
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::On => "on",
        Action::Off => "off",
        Action::Toggle => "toggle",
    }
}

async fn switch(
    state: &ApiState,
    peer: SocketAddr,
    user: &str,
    plug: Segment,
    body: &[u8],
) -> Answer {
    let asked: RelayRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body must be {{\"action\": \"on\" | \"off\" | \"toggle\"}}: {e}"),
            );
        }
    };
    let now = proto::now_ms();
    let id = match asked.id {
        Some(id) => id,
        None => {
            let n = state.next_id.fetch_add(1, Ordering::Relaxed);
            match Segment::new(format!("http-{now}-{n}")) {
                Ok(id) => id,
                Err(_) => unreachable!("digits and dashes make a segment"),
            }
        }
    };
    let timeout_ms = i64::try_from(state.timeout.as_millis()).unwrap_or(i64::MAX);
    let command = Command {
        id: id.clone(),
        device: plug.clone(),
        action: asked.action,
        issued_ts_ms: now,
        expires_ts_ms: now.saturating_add(timeout_ms),
    };
    let action = action_str(asked.action);
    state
        .events
        .switch_asked(&plug, action, &id, peer.ip(), user);
    let Some(queue) = state.queues.get(&plug) else {
        return unknown_plug();
    };
    let (tx, rx) = oneshot::channel();
    let job = Job {
        deadline: tokio::time::Instant::now() + state.timeout,
        command,
        reply: Some(tx),
    };
    if queue.try_send(job).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the plug already has commands waiting: try again",
        );
    }
    // The plug's task answers by the deadline, plus a poll of the plug in progress when the
    // command came and the read-back after a switch that was not confirmed (each bounded by
    // the plug's timeout). Given up here, the command is dropped unstarted (its reply closed).
    let (result, outcome) = match tokio::time::timeout(state.timeout + state.grace, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, "plug-bridge is stopping"),
        Err(_) => {
            let r = CommandResult {
                id,
                device: plug,
                ok: false,
                relay_on: None,
                message: Some("plug-bridge could not get to it in time: not done".into()),
                ts_ms: proto::now_ms(),
            };
            (r, SwitchOutcome::NotStarted)
        }
    };
    let status = match outcome {
        SwitchOutcome::Done => StatusCode::OK,
        // The plug answered, but not in the state asked for.
        SwitchOutcome::Mismatch => StatusCode::BAD_GATEWAY,
        SwitchOutcome::NotStarted | SwitchOutcome::Unconfirmed => StatusCode::GATEWAY_TIMEOUT,
        SwitchOutcome::Conflict => StatusCode::CONFLICT,
        SwitchOutcome::Stopping => StatusCode::SERVICE_UNAVAILABLE,
    };
    let message = match outcome {
        SwitchOutcome::NotStarted => Some(format!(
            "the plug did not confirm within {} ms; nothing was sent to it and nothing will be: {}",
            state.timeout.as_millis(),
            result.message.as_deref().unwrap_or("")
        )),
        SwitchOutcome::Unconfirmed => Some(format!(
            "the plug did not confirm within {} ms; plug-bridge will not send it again: {}",
            state.timeout.as_millis(),
            result.message.as_deref().unwrap_or("")
        )),
        _ => result.message,
    };
    json(
        status,
        &serde_json::json!({
            "plug": result.device.as_str(),
            "id": result.id.as_str(),
            "action": action,
            "ok": result.ok,
            "relay_on": result.relay_on,
            "error": message,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route("/api/v1/plugs"), Route::Plugs));
        assert!(matches!(route("/api/v1/plugs/lamp"), Route::Plug("lamp")));
        assert!(matches!(
            route("/api/v1/plugs/lamp/relay"),
            Route::Relay("lamp")
        ));
        assert!(matches!(route("/api/v1/openapi.json"), Route::OpenApi));
        for p in [
            "/",
            "/api/v1/plugs/",
            "/api/v1/plugs//relay",
            "/api/v1/plugs/a/b/c",
            "/api/v2/plugs",
        ] {
            assert!(matches!(route(p), Route::Unknown), "{p}");
        }
    }

    #[test]
    fn the_description_is_json_and_names_every_route() {
        let d: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = d["paths"].as_object().unwrap();
        for p in [
            "/api/v1/plugs",
            "/api/v1/plugs/{id}",
            "/api/v1/plugs/{id}/relay",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}
