//! From the cloud: direct methods and cloud-to-device messages become commands on the bus,
//! and their results go back; the device twin's reported properties carry the site's status.
//!
//! - Direct method `switch` (`$iothub/methods/POST/switch/?$rid=…`) with
//!   `{"device":"lamp-plug","action":"on"|"off"|"toggle"}`: a [`Command`] to that device on
//!   `wattbus/v1/<site>/cmd/<device>`, expiring after `command_timeout_ms`; the answer (on
//!   `$iothub/methods/res/<status>/?$rid=…`) is the plug's confirmed state from its
//!   [`CommandResult`]: 200 `{"device","ok":true,"relay_on":…}`, 502 when the plug could not
//!   do it, 504 when no answer came in time, 400 for a payload that is not a switch, 404 for
//!   another method, 403 with `commands = false`.
//! - A cloud-to-device message with the same JSON body does the same; its result is sent
//!   back as a device-to-cloud message with the application property `kind=command-result`.
//! - Twin: reported properties `{"wattbus":{…}}` every `twin_interval_s` (services online,
//!   version, last reading time, outbox depth).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{Action, Command, CommandResult, Filter, Payload as _, Segment, Status, Topic};
use rumqttc::QoS;
use runtime::bus::{Bus, Overflow};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::events::Events;
use crate::hub::{Incoming, Outgoing};
use crate::outbox::Outbox;
use crate::sas::url_encode;

/// The direct method wattbus offers.
pub const SWITCH: &str = "switch";

#[derive(Debug, Clone)]
pub struct Settings {
    pub site: Segment,
    pub device: String,
    pub enabled: bool,
    pub timeout: Duration,
    pub twin_interval: Duration,
    pub outbox: Arc<Mutex<Outbox>>,
    /// Read time of the newest reading taken from the bus (Unix ms; 0 before the first).
    pub last_reading_ms: Arc<std::sync::atomic::AtomicI64>,
}

/// What the twin reports of one service, from its retained status.
#[derive(Debug, Clone, Default)]
struct ServiceReport {
    online: bool,
    version: String,
    journal_records: Option<u64>,
    journal_oldest_s: Option<u64>,
    errors: Option<u64>,
}

/// What the cloud asks: `{"device":"…","action":"on"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Switch {
    device: Segment,
    action: Action,
}

/// Where a command's answer goes.
#[derive(Debug)]
enum Reply {
    Method { rid: String },
    Message { mid: String },
}

#[derive(Debug)]
struct Pending {
    device: Segment,
    reply: Reply,
    deadline: Instant,
}

/// A method call or a C2D message, parsed from its topic.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Method { name: String, rid: String },
    Message { mid: String },
    TwinResponse { status: u16, rid: String },
}

/// What a topic from the hub is. Pure.
pub fn classify(device: &str, topic: &str) -> Option<Request> {
    if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
        let (name, query) = rest.split_once("/?")?;
        return Some(Request::Method {
            name: name.to_string(),
            rid: param(query, "$rid")?.to_string(),
        });
    }
    if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
        let (status, query) = rest.split_once("/?")?;
        return Some(Request::TwinResponse {
            status: status.parse().ok()?,
            rid: param(query, "$rid").unwrap_or_default().to_string(),
        });
    }
    let prefix = format!("devices/{device}/messages/devicebound/");
    let bag = topic.strip_prefix(&prefix)?;
    Some(Request::Message {
        mid: param(bag, "%24.mid")
            .or_else(|| param(bag, "$.mid"))
            .unwrap_or("")
            .to_string(),
    })
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A command id from the cloud's request id: the characters a topic level allows.
fn command_id(kind: &str, rid: &str, n: u64) -> Segment {
    let clean: String = rid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .take(40)
        .collect();
    Segment::new(format!("azure-{kind}-{n}-{clean}")).unwrap_or_else(|_| {
        Segment::new(format!("azure-{kind}-{n}")).unwrap_or_else(|_| unreachable!("valid"))
    })
}

pub async fn run(
    bus: Bus,
    settings: Settings,
    mut incoming: mpsc::Receiver<Incoming>,
    outgoing: mpsc::Sender<Outgoing>,
    events: Arc<Events>,
    shutdown: runtime::Shutdown,
) {
    let mut results = bus.subscribe(
        Filter::<CommandResult>::command_results(Some(&settings.site), None).as_str(),
        QoS::AtLeastOnce,
        Overflow::Drop,
    );
    let mut statuses = bus.watch_statuses(&settings.site);
    let mut services: BTreeMap<String, ServiceReport> = BTreeMap::new();
    let mut pending: HashMap<Segment, Pending> = HashMap::new();
    let mut n: u64 = 0;
    let mut twin_at = Instant::now() + Duration::from_secs(10);
    let mut twin_rid: u64 = 0;
    loop {
        let next_deadline = pending.values().map(|p| p.deadline).min();
        tokio::select! {
            () = shutdown.wait() => return,
            Some(msg) = incoming.recv() => {
                n += 1;
                let Some(req) = classify(&settings.device, &msg.topic) else {
                    events.bad_cloud_message(&msg.topic, "a topic a device does not expect");
                    continue;
                };
                let reply = match req {
                    Request::TwinResponse { status, rid } => {
                        if !(200..300).contains(&status) {
                            events.bad_cloud_message("twin", &format!("the hub answered {status} to twin request {rid}"));
                        }
                        continue;
                    }
                    Request::Method { name, rid } => {
                        if name != SWITCH {
                            respond(&outgoing, &settings.device, &Reply::Method { rid }, 404, &serde_json::json!({"message": format!("no method {name:?}: azure-bridge offers `switch`")})).await;
                            continue;
                        }
                        Reply::Method { rid }
                    }
                    Request::Message { mid } => Reply::Message { mid },
                };
                if !settings.enabled {
                    respond(&outgoing, &settings.device, &reply, 403, &serde_json::json!({"message": "commands are turned off on this site (azure_bridge.commands = false)"})).await;
                    continue;
                }
                let switch: Switch = match serde_json::from_slice(&msg.payload) {
                    Ok(s) => s,
                    Err(e) => {
                        let why = format!("not a switch ({{\"device\":\"…\",\"action\":\"on|off|toggle\"}}): {e}");
                        events.bad_cloud_message("command", &why);
                        respond(&outgoing, &settings.device, &reply, 400, &serde_json::json!({"message": why})).await;
                        continue;
                    }
                };
                let (kind, rid) = match &reply {
                    Reply::Method { rid } => ("method", rid.clone()),
                    Reply::Message { mid } => ("c2d", mid.clone()),
                };
                let id = command_id(kind, &rid, n);
                let now = proto::now_ms();
                let command = Command {
                    id: id.clone(),
                    device: switch.device.clone(),
                    action: switch.action,
                    issued_ts_ms: now,
                    expires_ts_ms: now.saturating_add(i64::try_from(settings.timeout.as_millis()).unwrap_or(i64::MAX)),
                };
                events.command(kind, switch.device.as_str(), action_str(switch.action), id.as_str());
                let topic = Topic::<Command>::command(&settings.site, &switch.device);
                if let Err(e) = bus.send(&topic, &command, false).await {
                    respond(&outgoing, &settings.device, &reply, 503, &serde_json::json!({"device": switch.device, "message": format!("the local bus is not reachable: {e}")})).await;
                    continue;
                }
                pending.insert(id, Pending { device: switch.device, reply, deadline: Instant::now() + settings.timeout });
            }
            Some(m) = results.recv() => {
                let Ok(r) = CommandResult::decode(&m.payload) else { continue };
                // Only the device the command went to answers it.
                let Some(p) = pending.get(&r.id) else { continue };
                if p.device != r.device {
                    continue;
                }
                let Some(p) = pending.remove(&r.id) else { continue };
                let status = if r.ok { 200 } else { 502 };
                let mut body = serde_json::json!({"device": r.device, "ok": r.ok});
                if let Some(on) = r.relay_on {
                    body["relay_on"] = serde_json::json!(on);
                }
                if let Some(msg) = &r.message {
                    body["message"] = serde_json::json!(msg);
                }
                respond(&outgoing, &settings.device, &p.reply, status, &body).await;
            }
            Some(m) = statuses.recv() => {
                if let Ok(s) = Status::decode(&m.payload) {
                    let instance = m.topic.rsplit('/').next().unwrap_or_default().to_string();
                    services.insert(instance, ServiceReport {
                        online: s.state == proto::ServiceState::Online,
                        version: s.version.clone(),
                        journal_records: s.health.as_ref().map(|h| h.journal_records),
                        journal_oldest_s: s.health.as_ref().map(|h| h.journal_oldest_s),
                        errors: s.health.as_ref().map(|h| h.errors),
                    });
                }
            }
            () = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {
                let now = Instant::now();
                let late: Vec<Segment> = pending.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| k.clone()).collect();
                for id in late {
                    if let Some(p) = pending.remove(&id) {
                        respond(&outgoing, &settings.device, &p.reply, 504, &serde_json::json!({"device": p.device, "ok": false, "message": format!("no answer from {} within {} ms: the command was dropped (it is never carried out later)", p.device, settings.timeout.as_millis())})).await;
                    }
                }
            }
            () = tokio::time::sleep_until(twin_at) => {
                twin_at = Instant::now() + settings.twin_interval;
                twin_rid += 1;
                let outbox = settings.outbox.clone();
                let (records, bytes) = tokio::task::spawn_blocking(move || {
                    let o = outbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    (o.records(), o.bytes())
                }).await.unwrap_or((0, 0));
                let last = settings.last_reading_ms.load(std::sync::atomic::Ordering::Relaxed);
                let reported = serde_json::json!({"wattbus": {
                    "version": env!("CARGO_PKG_VERSION"),
                    "site": settings.site,
                    "reported_ms": proto::now_ms(),
                    "last_reading_ms": (last > 0).then_some(last),
                    "services": services.iter().map(|(k, r)| (k.clone(), serde_json::json!({
                        "online": r.online,
                        "version": r.version,
                        "journal_records": r.journal_records,
                        "journal_oldest_s": r.journal_oldest_s,
                        "errors": r.errors,
                    }))).collect::<serde_json::Map<_, _>>(),
                    "outbox": {"messages": records, "bytes": bytes},
                }});
                let _ = outgoing.try_send(Outgoing {
                    topic: format!("$iothub/twin/PATCH/properties/reported/?$rid={twin_rid}"),
                    payload: reported.to_string().into_bytes(),
                });
            }
        }
    }
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::On => "on",
        Action::Off => "off",
        Action::Toggle => "toggle",
    }
}

async fn respond(
    outgoing: &mpsc::Sender<Outgoing>,
    device: &str,
    reply: &Reply,
    status: u16,
    body: &serde_json::Value,
) {
    let (topic, payload) = match reply {
        Reply::Method { rid } => (
            format!("$iothub/methods/res/{status}/?$rid={rid}"),
            body.to_string(),
        ),
        Reply::Message { mid } => {
            let mut b = body.clone();
            b["status"] = serde_json::json!(status);
            b["correlation_id"] = serde_json::json!(mid);
            // A result is not a reading: its own kind, outside the outbox (a late result is
            // of no use; the plug's readings show its state).
            (
                format!(
                    "devices/{device}/messages/events/$.cid={}&$.ct=application%2Fjson&$.ce=utf-8&kind=command-result",
                    url_encode(mid)
                ),
                b.to_string(),
            )
        }
    };
    let _ = outgoing
        .send(Outgoing {
            topic,
            payload: payload.into_bytes(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_from_the_hub_are_told_apart() {
        assert_eq!(
            classify("pi", "$iothub/methods/POST/switch/?$rid=1a"),
            Some(Request::Method {
                name: "switch".into(),
                rid: "1a".into()
            })
        );
        assert_eq!(
            classify(
                "pi",
                "devices/pi/messages/devicebound/%24.mid=m-1&%24.to=%2Fdevices%2Fpi%2Fmessages%2FdeviceBound"
            ),
            Some(Request::Message { mid: "m-1".into() })
        );
        assert_eq!(
            classify("pi", "$iothub/twin/res/204/?$rid=3&$version=7"),
            Some(Request::TwinResponse {
                status: 204,
                rid: "3".into()
            })
        );
        assert_eq!(
            classify("pi", "devices/other/messages/devicebound/x=1"),
            None
        );
    }

    #[test]
    fn a_command_id_is_a_valid_topic_level_whatever_the_hub_sends() {
        assert_eq!(
            command_id("method", "1a/+#", 7).as_str(),
            "azure-method-7-1a"
        );
        assert!(command_id("c2d", &"x".repeat(500), 1).as_str().len() <= 64);
    }
}
