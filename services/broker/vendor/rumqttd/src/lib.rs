use std::fmt;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};
use tracing_subscriber::{
    filter::EnvFilter,
    fmt::{
        format::{Format, Pretty},
        Layer,
    },
    layer::Layered,
    reload::Handle,
    Registry,
};

pub use link::alerts;
pub use link::local;
pub use link::meters;
pub use router::{Alert, Forward, IncomingMeter, Meter, Notification, OutgoingMeter, Router};
use segments::Storage;
pub use server::{Broker, LinkType, Server};

pub use self::router::shared_subs::Strategy;

mod link;
pub mod protocol;
mod router;
mod segments;
mod server;

pub type ConnectionId = usize;
pub type RouterId = usize;
pub type NodeId = usize;
pub type Topic = String;
pub type Filter = String;
pub type TopicId = usize;
pub type Offset = (u64, u64);
pub type Cursor = (u64, u64);

pub type ClientId = String;
pub type AuthUser = String;
pub type AuthPass = String;
pub type AuthHandler = Arc<
    dyn Fn(ClientId, AuthUser, AuthPass) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct Config {
    pub id: usize,
    pub router: RouterConfig,
    pub v4: Option<HashMap<String, ServerSettings>>,
    pub v5: Option<HashMap<String, ServerSettings>>,
    pub ws: Option<HashMap<String, ServerSettings>>,
    pub cluster: Option<ClusterSettings>,
    pub console: Option<ConsoleSettings>,
    pub bridge: Option<BridgeConfig>,
    pub prometheus: Option<PrometheusSetting>,
    pub metrics: Option<HashMap<MetricType, MetricSettings>>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct PrometheusSetting {
    #[deprecated(note = "Use listen instead")]
    port: Option<u16>,
    listen: Option<SocketAddr>,
    // How frequently to update metrics
    interval: u64,
}

// TODO: Change names without _ until config-rs issue is resolved
// https://github.com/mehcode/config-rs/issues/369
#[derive(Debug, Serialize, Deserialize, Clone)]
#[serde(untagged)]
pub enum TlsConfig {
    Rustls {
        capath: Option<String>,
        certpath: String,
        keypath: String,
    },
    NativeTls {
        pkcs12path: String,
        pkcs12pass: String,
    },
}

impl TlsConfig {
    // Returns true only if all of the file paths inside `TlsConfig` actually exists on file system.
    // NOTE: This doesn't verify if certificate files are in required format or not.
    pub fn validate_paths(&self) -> bool {
        match self {
            TlsConfig::Rustls {
                capath,
                certpath,
                keypath,
            } => {
                let ca = capath.is_none() || capath.as_ref().is_some_and(|v| Path::new(v).exists());

                ca && [certpath, keypath].iter().all(|v| Path::new(v).exists())
            }
            TlsConfig::NativeTls { pkcs12path, .. } => Path::new(pkcs12path).exists(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ServerSettings {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub next_connection_delay_ms: u64,
    pub connections: ConnectionSettings,
}

impl ServerSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.connections.set_auth_handler(auth_fn)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct BridgeConfig {
    pub name: String,
    pub addr: String,
    pub qos: u8,
    pub sub_path: Filter,
    pub reconnection_delay: u64,
    pub ping_delay: u64,
    pub connections: ConnectionSettings,
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct ConnectionSettings {
    pub connection_timeout_ms: u16,
    pub max_payload_size: usize,
    pub max_inflight_count: usize,
    pub auth: Option<HashMap<String, String>>,
    #[serde(skip)]
    pub external_auth: Option<AuthHandler>,
    #[serde(default)]
    pub dynamic_filters: bool,
}

impl ConnectionSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.external_auth = Some(Arc::new(move |client_id, username, password| {
            let auth = auth_fn(client_id, username, password).into_future();
            Box::pin(auth)
        }));
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_inflight_count", &self.max_inflight_count)
            .field("auth", &self.auth)
            .field("external_auth", &self.external_auth.is_some())
            .field("dynamic_filters", &self.dynamic_filters)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Id with which this node connects to other nodes of the mesh
    pub node_id: NodeId,
    /// Address on which this broker is listening for mesh connections
    pub listen: String,
    /// Address of clusters that this node has to initiate connection
    pub seniors: Vec<(ConnectionId, String)>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RouterConfig {
    pub max_connections: usize,
    pub max_outgoing_packet_count: u64,
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub custom_segment: Option<HashMap<String, SegmentConfig>>,
    pub initialized_filters: Option<Vec<Filter>>,
    // defaults to Round Robin
    #[serde(default)]
    pub shared_subscriptions_strategy: Strategy,
    /// wattbus: asked before every publish, will and subscription of a remote client; `None`
    /// lets every client do anything (rumqttd's behaviour). See [`Policy`].
    #[serde(skip)]
    pub policy: Option<Arc<dyn Policy>>,
    /// wattbus: most filters one connection may be subscribed to; `None`: no limit. A
    /// SUBSCRIBE that would pass it is refused whole (SUBACK 0x80).
    #[serde(default)]
    pub max_filters_per_connection: Option<usize>,
    /// wattbus: most filter logs at once (the memory of each is bounded by `max_segment_size`
    /// × `max_segment_count`); `None`: no limit. A log is freed once no connection (and no
    /// saved session) subscribes its filter any more, so this counts live filters only. A
    /// SUBSCRIBE that would create more is refused whole (SUBACK 0x80).
    #[serde(default)]
    pub max_filters: Option<usize>,
    /// wattbus: keep nothing of a client that left. A CONNECT with clean session 0 gets a new
    /// session (CONNACK session present 0), as if its session had expired at once. rumqttd
    /// keeps a session for every client id that ever connected, for good (its subscriptions,
    /// their logs, even a clean session's connection events): a client cycling through client
    /// ids grew the router without bound, and saved subscriptions held logs no one could free.
    #[serde(default)]
    pub forget_sessions: bool,
    /// wattbus: most bytes of retained messages (topics and entries included); `None`: no
    /// limit. A retained message that would pass it is delivered but not kept, and its topic
    /// keeps no retained message (see [`Policy::retained_limit`]).
    #[serde(default)]
    pub max_retained_bytes: Option<usize>,
    /// wattbus: most bytes all filter logs hold together; `None`: no limit. Past it, the
    /// oldest segment of the largest log is dropped (its slow readers skip ahead).
    #[serde(default)]
    pub max_log_bytes: Option<usize>,
    /// wattbus: most bytes of messages queued for one connection; `None`: no limit (only
    /// rumqttd's 200 messages). A read from a log stops there (after one message at least),
    /// and the connection waits until it has written them. Without it, a client that stops
    /// reading holds up to 200 messages of any size, even once the logs dropped them.
    #[serde(default)]
    pub max_outgoing_bytes: Option<usize>,
}

/// wattbus: the limit a refused SUBSCRIBE would have passed (see [`Policy::filter_limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterLimit {
    /// [`RouterConfig::max_filters_per_connection`]
    PerConnection(usize),
    /// [`RouterConfig::max_filters`]
    Total(usize),
}

/// wattbus: why a connection still waiting for its login was closed to make room for a newer
/// one (see [`Policy::waiting_limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingLimit {
    /// Its source (IPv4 address or IPv6 /64) had this many waiting.
    PerSource(usize),
    /// This many were waiting in all.
    Total(usize),
}

/// wattbus: what the router asks before it lets a remote client publish or subscribe (topic
/// ACLs; rumqtt #495, #1005). Links made in-process with [`Broker::link`] are not asked.
///
/// Called on the router thread: answer at once, without I/O.
pub trait Policy: fmt::Debug + Send + Sync {
    /// May the client `client_id`, logged in as `username` (empty without a login), publish
    /// `payload` on `topic`? Asked for every PUBLISH, after its topic alias is resolved, and
    /// for the will of a CONNECT. A refused PUBLISH disconnects the client (MQTT-3.3.5-2) and
    /// is not acknowledged; a refused will refuses the connection (no CONNACK, like a full
    /// broker).
    fn may_publish(&self, client_id: &str, username: &str, topic: &str, payload: &[u8]) -> bool;

    /// May it subscribe `filter`, as sent (`$share/<group>/...` included)? A SUBSCRIBE with one
    /// refused filter is refused whole: SUBACK failure (0x80) for each of its filters, and
    /// nothing subscribed.
    fn may_subscribe(&self, client_id: &str, username: &str, filter: &str) -> bool;

    /// Told (not asked) when a SUBSCRIBE of `client_id` is refused for `limit`; `filter` is
    /// the first of its filters that is new. For every client, local links too.
    fn filter_limit(&self, _client_id: &str, _filter: &str, _limit: FilterLimit) {}

    /// Told when a retained message of `client_id` on `topic` is not kept, because of
    /// [`RouterConfig::max_retained_bytes`].
    fn retained_limit(&self, _client_id: &str, _topic: &str) {}

    /// Most connections `username` may hold at once; `None`: only `max_connections` limits
    /// it. A connection beyond it is refused like one beyond `max_connections` (no CONNACK).
    fn max_connections_of(&self, _username: &str) -> Option<usize> {
        None
    }

    /// Told when a connection of `client_id` is refused because `username` holds `limit`.
    fn connection_limit(&self, _client_id: &str, _username: &str, _limit: usize) {}

    /// Told when a connection from `addr` that had not logged in yet is closed to make room
    /// for a newer one, because of `limit`. Called on a listener's thread.
    fn waiting_limit(&self, _addr: SocketAddr, _limit: WaitingLimit) {}
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SegmentConfig {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
}

type ReloadHandle = Handle<EnvFilter, Layered<Layer<Registry, Pretty, Format<Pretty>>, Registry>>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConsoleSettings {
    pub listen: String,
    #[serde(skip)]
    filter_handle: Option<ReloadHandle>,
}

impl ConsoleSettings {
    pub fn set_filter_reload_handle(&mut self, handle: ReloadHandle) {
        self.filter_handle.replace(handle);
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub enum Transport {
    #[serde(rename = "tcp")]
    #[default]
    Tcp,
    #[serde(rename = "tls")]
    Tls {
        ca: PathBuf,
        client_auth: Option<ClientAuth>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientAuth {
    certs: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, Clone, Hash, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Meters,
    Alerts,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct MetricSettings {
    push_interval: u64,
}
