//! Who may publish and subscribe where: the broker's topic ACL, as pure functions.
//!
//! Every service logs in as its own broker user, and each user has a [`Role`]
//! (docs/ARCHITECTURE.md, "Threat model"). The role says which topics the user may publish on and
//! which filters it may subscribe to; `U` in a pattern is the user's own name, so that a sink's
//! acknowledgements (`.../ack/<producer>/<stream>/<sink group>`) can only come from the user
//! whose name is that sink group, and a dead letter only from the service it names.
//!
//! | role | may publish | may subscribe |
//! |---|---|---|
//! | producer | `meas/+/+`, `raw/+`, `status/own`, `dead/U` | `ack/#`, `sink/+`, `status/+` |
//! | sink | `ack/+/+/U`, `sink/U`, `status/own`, `dead/U` | `meas/+/+`, `raw/+`, `status/+`, `dead/+` |
//! | processor | producer ∪ sink | producer ∪ sink |
//! | actuator | producer's, `cmd-result/+`, `homeassistant/+/wattbus/#` | producer's, `cmd/+`, `homeassistant/status` |
//! | commander | `cmd/+`, `status/own`, `dead/U` | `cmd-result/+`, `status/+` |
//! | homeassistant | `cmd/+`, `homeassistant/status` | `wattbus/#`, `homeassistant/#` |
//! | tasmota | `stat/U/#`, `tele/U/#`, `cmnd/U/+`, `tasmota/discovery/+/+` | `cmnd/U/#` |
//! | reader | nothing | `wattbus/#` |
//! | admin | anything | anything |
//!
//! (each `wattbus` pattern after `wattbus/v1/+/`; the others as written: Home Assistant's
//! MQTT discovery, where wattbus's entities live under node id `wattbus`; Tasmota's own
//! topics, where a Tasmota plug's user is named like its topic and speaks only for itself,
//! and only plug-bridge (an actuator) hears them all and commands them: `stat/+/+`,
//! `tele/+/+`, `cmnd/+/+`). A producer, processor or actuator given `devices` may
//! publish readings (`meas`, `raw`) and command results (`cmd-result`) only for those devices.
//! Only an actuator (plug-bridge) hears commands, and only a commander (a cloud bridge, a
//! script) or admin may send one: a command switches real equipment, so no reading producer
//! and no reader can. `status/own`: the policy (`auth.rs`) lets a
//! user publish only the status of its own client ids (`client_id_owner`).
//!
//! Decisions, level by level (MQTT's own matching: only a whole `+` or `#` level is a wildcard):
//! - A **publish topic** is allowed if a pattern matches it. A topic with a wildcard character,
//!   an empty level, a level longer than 64 bytes or a leading `$` is refused to everyone but
//!   admin: MQTT forbids the first, and no wattbus topic has the others (the length limit is
//!   `proto::Segment`'s; it also bounds what the broker keeps per topic and filter).
//! - A **subscription filter** (after a `$share/<group>/` prefix is stripped; the group must be
//!   the user's own name, or it would take a share of another sink's readings) is allowed only
//!   if every topic it can match is allowed by one pattern: `#` in the pattern covers whatever
//!   is left of the filter, `+` covers one level that is not `#`, and a `+` or `#` in the
//!   filter is covered only by a `+` or `#` (respectively a `#`) in the pattern. So a producer
//!   may subscribe `wattbus/v1/site-a/ack/#` but not `wattbus/#`, and a malformed filter
//!   (`a/#/b`, `a+/b`) is refused.
//! - A **client id** belongs to the user it names: equal to a username, or starting with
//!   `<username>-`, the longest such username wins (so `influx-writer-2` is influx-writer's even
//!   if a user `influx` exists). Logging in with another user's client id is refused, for every
//!   role: rumqttd would otherwise disconnect the owner's connection (a takeover).

use std::collections::HashSet;

/// What a broker user is for; decides its topics (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publishes readings (serial-ingest, modbus-ingest, the simulator).
    Producer,
    /// Stores readings and acknowledges them as the sink group named like the user.
    Sink,
    /// Both: consumes one stream and produces another (rms-processor).
    Processor,
    /// A producer that also carries out commands for its devices and answers them
    /// (plug-bridge).
    Actuator,
    /// Sends commands and reads their results (a script), nothing else.
    Commander,
    /// A sink that also sends commands from the cloud and reads their results (azure-bridge):
    /// a sink's and a commander's rights together, acknowledging as the group named like
    /// the user.
    #[serde(rename = "cloud-bridge")]
    CloudBridge,
    /// Home Assistant: reads everything under `wattbus/` and the discovery topics, switches
    /// plugs (`cmd/+`), says it is online (`homeassistant/status`).
    #[serde(rename = "homeassistant")]
    HomeAssistant,
    /// A Tasmota plug, whose user is named like its MQTT topic: it reports on `stat/<U>/…`
    /// and `tele/<U>/…` and hears `cmnd/<U>/…`, nothing else.
    Tasmota,
    /// Reads everything under `wattbus/`, publishes nothing (dashboards, `mosquitto_sub`).
    Reader,
    /// Anything (tools, tests). Not for services.
    Admin,
}

impl Role {
    pub const ALL: [Role; 10] = [
        Role::Producer,
        Role::Sink,
        Role::Processor,
        Role::Actuator,
        Role::Commander,
        Role::CloudBridge,
        Role::HomeAssistant,
        Role::Tasmota,
        Role::Reader,
        Role::Admin,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Sink => "sink",
            Role::Processor => "processor",
            Role::Actuator => "actuator",
            Role::Commander => "commander",
            Role::CloudBridge => "cloud-bridge",
            Role::HomeAssistant => "homeassistant",
            Role::Tasmota => "tasmota",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    /// Whether `devices` may restrict this role's readings.
    pub const fn publishes_readings(self) -> bool {
        matches!(self, Role::Producer | Role::Processor | Role::Actuator)
    }

    const fn produces(self) -> bool {
        matches!(self, Role::Producer | Role::Processor | Role::Actuator)
    }

    const fn sinks(self) -> bool {
        matches!(self, Role::Sink | Role::Processor | Role::CloudBridge)
    }
}

/// `U` in a pattern: the user's own name.
const USER: &str = "U";

const PRODUCER_PUBLISH: &[&str] = &[
    "wattbus/v1/+/meas/+/+",
    "wattbus/v1/+/raw/+",
    "wattbus/v1/+/status/+",
    "wattbus/v1/+/dead/U",
];
const PRODUCER_SUBSCRIBE: &[&str] = &[
    "wattbus/v1/+/ack/#",
    "wattbus/v1/+/sink/+",
    "wattbus/v1/+/status/+",
];
const SINK_PUBLISH: &[&str] = &[
    "wattbus/v1/+/ack/+/+/U",
    "wattbus/v1/+/sink/U",
    "wattbus/v1/+/status/+",
    "wattbus/v1/+/dead/U",
];
const SINK_SUBSCRIBE: &[&str] = &[
    "wattbus/v1/+/meas/+/+",
    "wattbus/v1/+/raw/+",
    "wattbus/v1/+/status/+",
    "wattbus/v1/+/dead/+",
];
const ACTUATOR_PUBLISH: &[&str] = &[
    "wattbus/v1/+/cmd-result/+",
    "homeassistant/+/wattbus/#",
    "cmnd/+/+",
];
const ACTUATOR_SUBSCRIBE: &[&str] = &[
    "wattbus/v1/+/cmd/+",
    "homeassistant/status",
    "stat/+/+",
    "tele/+/+",
];
// What Tasmota's firmware does on every connect, which a refused publish would turn into a
// disconnect: it asks its own state (an empty `cmnd/<topic>/POWER`) and announces itself
// (retained `tasmota/discovery/<mac>/config`, `/sensors`).
const TASMOTA_PUBLISH: &[&str] = &["stat/U/#", "tele/U/#", "cmnd/U/+", "tasmota/discovery/+/+"];
const TASMOTA_SUBSCRIBE: &[&str] = &["cmnd/U/#"];
const HOME_ASSISTANT_PUBLISH: &[&str] = &["wattbus/v1/+/cmd/+", "homeassistant/status"];
const HOME_ASSISTANT_SUBSCRIBE: &[&str] = &["wattbus/#", "homeassistant/#"];
const COMMANDER_PUBLISH: &[&str] = &[
    "wattbus/v1/+/cmd/+",
    "wattbus/v1/+/status/+",
    "wattbus/v1/+/dead/U",
];
const COMMANDER_SUBSCRIBE: &[&str] = &["wattbus/v1/+/cmd-result/+", "wattbus/v1/+/status/+"];
const READER_SUBSCRIBE: &[&str] = &["wattbus/#"];

/// The kinds `devices` restricts (readings, and the results of commands to a device), and
/// the level (after `wattbus/v1/<site>/<kind>`) that names the device.
const READING_KINDS: &[&str] = &["meas", "raw", "cmd-result"];

/// One user's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub username: String,
    pub role: Role,
    /// `Some`: the only devices whose readings this user may publish.
    pub devices: Option<HashSet<String>>,
}

impl Grant {
    pub fn may_publish(&self, topic: &str) -> bool {
        if self.role == Role::Admin {
            return true;
        }
        if !is_plain_topic(topic) {
            return false;
        }
        let mut patterns: Vec<&[&str]> = Vec::with_capacity(2);
        if self.role.produces() {
            patterns.push(PRODUCER_PUBLISH);
        }
        if self.role.sinks() {
            patterns.push(SINK_PUBLISH);
        }
        if self.role == Role::Actuator {
            patterns.push(ACTUATOR_PUBLISH);
        }
        if matches!(self.role, Role::Commander | Role::CloudBridge) {
            patterns.push(COMMANDER_PUBLISH);
        }
        if self.role == Role::HomeAssistant {
            patterns.push(HOME_ASSISTANT_PUBLISH);
        }
        if self.role == Role::Tasmota {
            patterns.push(TASMOTA_PUBLISH);
        }
        let allowed = patterns
            .into_iter()
            .flatten()
            .any(|pattern| pattern_matches(pattern, &self.username, topic));
        allowed && self.device_allowed(topic)
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        if self.role == Role::Admin {
            return true;
        }
        let original = filter;
        let Some(filter) = strip_share(filter) else {
            return false;
        };
        // A shared group is the user's own: a reader (or another sink) that joined a sink's
        // group would take a share of its readings, which that sink then never stores or
        // acknowledges, and the producers' journals would hold and resend them for ever.
        if share_group(original).is_some_and(|group| group != self.username) {
            return false;
        }
        if !is_valid_filter(filter) {
            return false;
        }
        let patterns: &[&[&str]] = match self.role {
            Role::Producer => &[PRODUCER_SUBSCRIBE],
            Role::Sink => &[SINK_SUBSCRIBE],
            Role::Processor => &[PRODUCER_SUBSCRIBE, SINK_SUBSCRIBE],
            Role::Actuator => &[PRODUCER_SUBSCRIBE, ACTUATOR_SUBSCRIBE],
            Role::Commander => &[COMMANDER_SUBSCRIBE],
            Role::CloudBridge => &[SINK_SUBSCRIBE, COMMANDER_SUBSCRIBE],
            Role::HomeAssistant => &[HOME_ASSISTANT_SUBSCRIBE],
            Role::Tasmota => &[TASMOTA_SUBSCRIBE],
            Role::Reader => &[READER_SUBSCRIBE],
            Role::Admin => &[],
        };
        patterns
            .iter()
            .copied()
            .flatten()
            .any(|pattern| covers(pattern, &self.username, filter))
    }

    /// Readings (`meas`, `raw`) name their device in the level after the kind.
    fn device_allowed(&self, topic: &str) -> bool {
        let Some(devices) = &self.devices else {
            return true;
        };
        let mut levels = topic.split('/').skip(3);
        match (levels.next(), levels.next()) {
            (Some(kind), Some(device)) if READING_KINDS.contains(&kind) => devices.contains(device),
            _ => true,
        }
    }
}

/// The filter without its `$share/<group>/` prefix; `None` for a `$share` filter that lacks a
/// group or a filter.
pub fn strip_share(filter: &str) -> Option<&str> {
    match filter.strip_prefix("$share/") {
        None => Some(filter),
        Some(rest) => match rest.split_once('/') {
            Some((group, filter)) if !group.is_empty() && !filter.is_empty() => Some(filter),
            _ => None,
        },
    }
}

/// The group of a `$share/<group>/...` filter.
fn share_group(filter: &str) -> Option<&str> {
    filter.strip_prefix("$share/")?.split('/').next()
}

/// The user that owns `client_id` among `usernames`, if any: the longest username the client id
/// equals or starts with followed by `-`.
pub fn client_id_owner<'a>(
    client_id: &str,
    usernames: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    usernames
        .into_iter()
        .filter(|user| {
            client_id == *user
                || client_id
                    .strip_prefix(*user)
                    .is_some_and(|rest| rest.starts_with('-'))
        })
        .max_by_key(|user| user.len())
}

/// The instance a status topic (`wattbus/v1/<site>/status/<instance>`) names.
pub fn status_instance(topic: &str) -> Option<&str> {
    match topic.split('/').collect::<Vec<_>>()[..] {
        ["wattbus", "v1", _, "status", instance] => Some(instance),
        _ => None,
    }
}

/// The longest level a non-admin topic or filter may have: `proto::Segment`'s limit, so no
/// wattbus topic is refused, and a hostile client cannot make the broker keep 64 KiB names.
const MAX_LEVEL_LEN: usize = 64;

/// A topic a client may name in a PUBLISH (or a will): non-empty levels of at most
/// [`MAX_LEVEL_LEN`] bytes, no wildcard characters, no leading `$`.
fn is_plain_topic(topic: &str) -> bool {
    !topic.starts_with('$')
        && topic.split('/').all(|level| {
            !level.is_empty() && level.len() <= MAX_LEVEL_LEN && !level.contains(['+', '#'])
        })
}

/// MQTT's rules: non-empty, `+` and `#` only as whole levels, `#` only last; and levels of at
/// most [`MAX_LEVEL_LEN`] bytes.
fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.starts_with('$') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => other.len() <= MAX_LEVEL_LEN && !other.contains(['+', '#']),
    })
}

fn level<'a>(pattern_level: &'a str, username: &'a str) -> &'a str {
    if pattern_level == USER {
        username
    } else {
        pattern_level
    }
}

/// Whether `pattern` (with `U` = `username`) matches the plain topic `topic`.
fn pattern_matches(pattern: &str, username: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for p in pattern.split('/') {
        let p = level(p, username);
        if p == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(_) if p == "+" => {}
            Some(t) if t == p => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic `filter` (valid, unshared) can match is matched by `pattern`.
fn covers(pattern: &str, username: &str, filter: &str) -> bool {
    let mut filter_levels = filter.split('/');
    for p in pattern.split('/') {
        let p = level(p, username);
        if p == "#" {
            return true;
        }
        match filter_levels.next() {
            // `#` matches any number of levels, zero included: only a `#` covers it.
            Some("#") => return false,
            Some("+") if p == "+" => {}
            Some("+") => return false,
            Some(f) if p == "+" || f == p => {}
            // Other levels, or a filter that ends while the pattern goes on (`a/#` covering
            // `a` returned above, at the `#`).
            Some(_) | None => return false,
        }
    }
    filter_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Segment, Topic};

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn grant(role: Role, username: &str) -> Grant {
        Grant {
            username: username.into(),
            role,
            devices: None,
        }
    }

    /// Every topic a wattbus service publishes, built by proto (so the ACL and the topic
    /// builders cannot drift apart), with the role that must be allowed to publish it when the
    /// user is `me`. `other` is another user.
    fn service_topics() -> Vec<(&'static str, String)> {
        let (site, me, other) = (seg("site-a"), seg("me"), seg("other"));
        let (dev, ch, stream) = (seg("we515-1"), seg("power_w"), seg("meas"));
        vec![
            (
                "reading",
                Topic::measurement(&site, &dev, &ch).as_str().into(),
            ),
            ("raw", Topic::raw(&site, &dev).as_str().into()),
            ("status", Topic::status(&site, &me).as_str().into()),
            (
                "status of another",
                Topic::status(&site, &other).as_str().into(),
            ),
            (
                "own dead letter",
                Topic::dead_letter(&site, &me).as_str().into(),
            ),
            (
                "other's dead letter",
                Topic::dead_letter(&site, &other).as_str().into(),
            ),
            (
                "own ack",
                Topic::ack(&site, &dev, &stream, &me).as_str().into(),
            ),
            (
                "forged ack",
                Topic::ack(&site, &dev, &stream, &other).as_str().into(),
            ),
            ("own registration", "wattbus/v1/site-a/sink/me".into()),
            ("forged registration", "wattbus/v1/site-a/sink/other".into()),
            ("command", "wattbus/v1/site-a/cmd/we515-1".into()),
            (
                "command result",
                "wattbus/v1/site-a/cmd-result/we515-1".into(),
            ),
            ("outside wattbus", "homeassistant/sensor/x".into()),
        ]
    }

    fn allowed_publishes(role: Role) -> Vec<&'static str> {
        let g = grant(role, "me");
        service_topics()
            .into_iter()
            .filter(|(_, topic)| g.may_publish(topic))
            .map(|(what, _)| what)
            .collect()
    }

    #[test]
    fn each_role_publishes_exactly_its_topics() {
        let producer = vec![
            "reading",
            "raw",
            "status",
            "status of another",
            "own dead letter",
        ];
        let sink = vec![
            "status",
            "status of another",
            "own dead letter",
            "own ack",
            "own registration",
        ];
        assert_eq!(allowed_publishes(Role::Producer), producer);
        assert_eq!(allowed_publishes(Role::Sink), sink);
        assert_eq!(
            allowed_publishes(Role::Processor),
            vec![
                "reading",
                "raw",
                "status",
                "status of another",
                "own dead letter",
                "own ack",
                "own registration",
            ]
        );
        assert_eq!(
            allowed_publishes(Role::Actuator),
            vec![
                "reading",
                "raw",
                "status",
                "status of another",
                "own dead letter",
                "command result",
            ]
        );
        assert_eq!(
            allowed_publishes(Role::Commander),
            vec!["status", "status of another", "own dead letter", "command"]
        );
        assert!(allowed_publishes(Role::Reader).is_empty());
        assert_eq!(allowed_publishes(Role::Admin).len(), service_topics().len());
    }

    #[test]
    fn only_an_actuator_hears_commands_and_only_for_its_devices_answers_them() {
        let mut a = grant(Role::Actuator, "plug-bridge");
        a.devices = Some(["kettle".to_string()].into());
        assert!(a.may_subscribe("wattbus/v1/home/cmd/+"));
        assert!(a.may_subscribe("wattbus/v1/+/cmd/kettle"));
        assert!(a.may_publish("wattbus/v1/home/cmd-result/kettle"));
        assert!(
            !a.may_publish("wattbus/v1/home/cmd-result/fridge"),
            "a forged result"
        );
        assert!(
            !a.may_publish("wattbus/v1/home/cmd/kettle"),
            "an actuator commands nothing"
        );
        assert!(a.may_publish("wattbus/v1/home/meas/kettle/relay"));
        assert!(!a.may_subscribe("wattbus/v1/home/cmd-result/+"));
        for role in [Role::Producer, Role::Sink, Role::Processor, Role::Reader] {
            let g = grant(role, "me");
            assert!(
                !g.may_publish("wattbus/v1/home/cmd/kettle"),
                "{role:?} sends a command"
            );
            assert!(
                !g.may_publish("wattbus/v1/home/cmd-result/kettle"),
                "{role:?} forges a result"
            );
        }
        for role in [Role::Producer, Role::Sink, Role::Processor, Role::Commander] {
            assert!(
                !grant(role, "me").may_subscribe("wattbus/v1/home/cmd/+"),
                "{role:?} hears commands"
            );
        }
        let c = grant(Role::Commander, "azure-bridge");
        assert!(c.may_subscribe("wattbus/v1/home/cmd-result/+"));
        assert!(!c.may_subscribe("wattbus/v1/home/meas/+/+"));
        assert!(!c.may_publish("wattbus/v1/home/meas/kettle/relay"));
    }

    #[test]
    fn a_tasmota_plug_speaks_only_for_itself_and_only_plug_bridge_commands_it() {
        let t = grant(Role::Tasmota, "tasmota_5A3F2B");
        assert!(t.may_publish("stat/tasmota_5A3F2B/POWER"));
        assert!(t.may_publish("tele/tasmota_5A3F2B/LWT"));
        assert!(t.may_subscribe("cmnd/tasmota_5A3F2B/+"));
        // Its firmware's own connect: subscribe cmnd/<topic>/#, ask its POWER, announce itself.
        assert!(t.may_subscribe("cmnd/tasmota_5A3F2B/#"));
        assert!(t.may_publish("cmnd/tasmota_5A3F2B/POWER"));
        assert!(t.may_publish("tasmota/discovery/5C0A1B2C3D4E/config"));
        for topic in [
            "stat/tasmota_other/POWER",
            "tele/tasmota_other/SENSOR",
            "cmnd/tasmota_other/POWER",
            "wattbus/v1/home/meas/fridge/relay",
        ] {
            assert!(!t.may_publish(topic), "{topic}");
        }
        assert!(!t.may_subscribe("cmnd/+/+"));
        assert!(!t.may_subscribe("stat/+/+"));
        let a = grant(Role::Actuator, "plug-bridge");
        assert!(a.may_publish("cmnd/tasmota_5A3F2B/POWER"));
        assert!(a.may_subscribe("stat/+/+") && a.may_subscribe("tele/+/+"));
        assert!(
            !a.may_publish("stat/tasmota_5A3F2B/POWER"),
            "plug-bridge forges a plug"
        );
        for role in [
            Role::Producer,
            Role::Sink,
            Role::Processor,
            Role::Commander,
            Role::Reader,
            Role::HomeAssistant,
        ] {
            assert!(
                !grant(role, "me").may_publish("cmnd/tasmota_5A3F2B/POWER"),
                "{role:?} switches a Tasmota"
            );
        }
    }

    #[test]
    fn home_assistant_discovery_stays_in_wattbus_own_namespace() {
        let a = grant(Role::Actuator, "plug-bridge");
        assert!(a.may_publish("homeassistant/switch/wattbus/home_kettle/config"));
        assert!(a.may_publish("homeassistant/sensor/wattbus/home_kettle_power/config"));
        assert!(a.may_subscribe("homeassistant/status"));
        // Another integration's entities, or Home Assistant's own status: not its to write.
        assert!(!a.may_publish("homeassistant/switch/zigbee2mqtt/lamp/config"));
        assert!(!a.may_publish("homeassistant/status"));
        assert!(!a.may_subscribe("homeassistant/#"));
        for role in [
            Role::Producer,
            Role::Sink,
            Role::Processor,
            Role::Commander,
            Role::Reader,
        ] {
            assert!(
                !grant(role, "me").may_publish("homeassistant/switch/wattbus/home_kettle/config"),
                "{role:?} announces entities"
            );
        }
        let ha = grant(Role::HomeAssistant, "homeassistant");
        assert!(ha.may_subscribe("homeassistant/#"));
        assert!(ha.may_subscribe("wattbus/#"));
        assert!(ha.may_publish("homeassistant/status"));
        assert!(ha.may_publish("wattbus/v1/home/cmd/kettle"));
        // It reads readings and switches plugs; it neither forges readings, results nor
        // acknowledgements, nor rewrites discovery.
        for topic in [
            "wattbus/v1/home/meas/kettle/relay",
            "wattbus/v1/home/cmd-result/kettle",
            "wattbus/v1/home/ack/p/meas/influx-writer",
            "homeassistant/switch/wattbus/home_kettle/config",
        ] {
            assert!(!ha.may_publish(topic), "{topic}");
        }
    }

    #[test]
    fn acknowledgements_only_come_from_the_user_named_like_the_sink_group() {
        let topic = "wattbus/v1/site-a/ack/serial-ingest/meas/influx-writer";
        assert!(grant(Role::Sink, "influx-writer").may_publish(topic));
        assert!(grant(Role::Processor, "influx-writer").may_publish(topic));
        for (role, user) in [
            (Role::Sink, "csv-writer"),
            (Role::Sink, "influx-writer-2"),
            (Role::Sink, "influx"),
            (Role::Producer, "influx-writer"),
            (Role::Reader, "influx-writer"),
            (Role::Processor, "rms-processor"),
        ] {
            assert!(!grant(role, user).may_publish(topic), "{role:?} {user}");
        }
    }

    #[test]
    fn readers_and_sinks_cannot_forge_readings() {
        for role in [Role::Reader, Role::Sink] {
            let g = grant(role, "me");
            assert!(!g.may_publish("wattbus/v1/site-a/meas/we515-1/power_w"));
            assert!(!g.may_publish("wattbus/v1/site-a/raw/ct-1"));
        }
    }

    #[test]
    fn devices_restrict_the_readings_of_a_producer_and_nothing_else() {
        let mut g = grant(Role::Producer, "modbus-ingest");
        g.devices = Some(["we515-1".to_string(), "we515-2".to_string()].into());
        assert!(g.may_publish("wattbus/v1/site-a/meas/we515-1/power_w"));
        assert!(g.may_publish("wattbus/v1/site-b/meas/we515-2/energy_wh"));
        assert!(g.may_publish("wattbus/v1/site-a/raw/we515-2"));
        assert!(!g.may_publish("wattbus/v1/site-a/meas/we515-3/power_w"));
        assert!(!g.may_publish("wattbus/v1/site-a/raw/ct-1"));
        // Status and dead letters name the service, not a device.
        assert!(g.may_publish("wattbus/v1/site-a/status/modbus-ingest"));
        assert!(g.may_publish("wattbus/v1/site-a/dead/modbus-ingest"));
        // An empty list: no readings at all.
        g.devices = Some(HashSet::new());
        assert!(!g.may_publish("wattbus/v1/site-a/meas/we515-1/power_w"));
        assert!(g.may_publish("wattbus/v1/site-a/status/modbus-ingest"));
        // A processor is restricted the same way, its sink side is not.
        let mut p = grant(Role::Processor, "rms-processor");
        p.devices = Some(["ct-1".to_string()].into());
        assert!(p.may_publish("wattbus/v1/site-a/meas/ct-1/current_a"));
        assert!(!p.may_publish("wattbus/v1/site-a/meas/ct-2/current_a"));
        assert!(p.may_publish("wattbus/v1/site-a/ack/serial-ingest/raw/rms-processor"));
    }

    #[test]
    fn malformed_publish_topics_are_refused_to_all_but_admin() {
        let long_site_reading = format!("wattbus/v1/{}/meas/we515-1/power_w", "s".repeat(65));
        for topic in [
            "wattbus/v1/+/meas/we515-1/power_w",
            "wattbus/v1/site-a/meas/we515-1/#",
            "wattbus/v1/site-a/meas/we+/power_w",
            "wattbus/v1//meas/we515-1/power_w",
            "wattbus/v1/site-a/meas/we515-1/power_w/",
            "wattbus/v1/site-a/meas/we515-1",
            "wattbus/v1/site-a/meas/we515-1/power_w/extra",
            long_site_reading.as_str(),
            "$SYS/wattbus/v1/site-a/status/x",
            "",
        ] {
            for role in [Role::Producer, Role::Processor] {
                assert!(!grant(role, "me").may_publish(topic), "{role:?} {topic:?}");
            }
        }
        assert!(grant(Role::Admin, "me").may_publish("anything/+/at/all"));
    }

    fn allowed_filters(role: Role, filters: &[&'static str]) -> Vec<&'static str> {
        let g = grant(role, "me");
        filters
            .iter()
            .copied()
            .filter(|f| g.may_subscribe(f))
            .collect()
    }

    const FILTERS: &[&str] = &[
        "wattbus/v1/+/meas/+/+",
        "wattbus/v1/site-a/meas/we515-1/power_w",
        "wattbus/v1/site-a/meas/+/+",
        "wattbus/v1/+/meas/#",
        "wattbus/v1/+/raw/+",
        "wattbus/v1/site-a/raw/ct-1",
        "wattbus/v1/+/status/+",
        "wattbus/v1/+/dead/+",
        "wattbus/v1/+/ack/#",
        "wattbus/v1/site-a/ack/me/meas/+",
        "wattbus/v1/+/sink/+",
        "wattbus/v1/+/cmd/+",
        "wattbus/#",
        "#",
        "+/v1/+/meas/+/+",
    ];

    #[test]
    fn each_role_subscribes_exactly_the_filters_its_patterns_cover() {
        assert_eq!(
            allowed_filters(Role::Producer, FILTERS),
            vec![
                "wattbus/v1/+/status/+",
                "wattbus/v1/+/ack/#",
                "wattbus/v1/site-a/ack/me/meas/+",
                "wattbus/v1/+/sink/+",
            ]
        );
        assert_eq!(
            allowed_filters(Role::Sink, FILTERS),
            vec![
                "wattbus/v1/+/meas/+/+",
                "wattbus/v1/site-a/meas/we515-1/power_w",
                "wattbus/v1/site-a/meas/+/+",
                "wattbus/v1/+/raw/+",
                "wattbus/v1/site-a/raw/ct-1",
                "wattbus/v1/+/status/+",
                "wattbus/v1/+/dead/+",
            ]
        );
        let mut processor = allowed_filters(Role::Processor, FILTERS);
        let mut union = allowed_filters(Role::Producer, FILTERS);
        union.extend(allowed_filters(Role::Sink, FILTERS));
        processor.sort_unstable();
        union.sort_unstable();
        union.dedup();
        assert_eq!(processor, union);
        assert_eq!(
            allowed_filters(Role::Reader, FILTERS).len(),
            FILTERS.len() - 2,
            "everything under wattbus/, not # nor +/..."
        );
        assert_eq!(allowed_filters(Role::Admin, FILTERS).len(), FILTERS.len());
    }

    #[test]
    fn a_wildcard_in_the_filter_is_covered_only_by_a_wildcard_in_the_pattern() {
        let sink = grant(Role::Sink, "me");
        // `#` matches any depth (zero levels too): only a `#` covers it.
        assert!(!sink.may_subscribe("wattbus/v1/+/meas/#"));
        assert!(!sink.may_subscribe("wattbus/v1/+/meas/we515-1/#"));
        // `+` in the filter needs `+` (or `#`) in the pattern.
        assert!(!sink.may_subscribe("wattbus/+/+/meas/+/+"));
        let producer = grant(Role::Producer, "me");
        assert!(producer.may_subscribe("wattbus/v1/+/ack/#"));
        assert!(producer.may_subscribe("wattbus/v1/+/ack/+/+/+"));
        assert!(
            producer.may_subscribe("wattbus/v1/site-a/ack"),
            "a/# matches a"
        );
        assert!(!producer.may_subscribe("wattbus/v1/+/+/#"));
        let reader = grant(Role::Reader, "me");
        assert!(reader.may_subscribe("wattbus/#"));
        assert!(reader.may_subscribe("wattbus"), "wattbus/# matches wattbus");
        assert!(!reader.may_subscribe("+/#"));
        assert!(!reader.may_subscribe("other/#"));
    }

    #[test]
    fn shared_subscriptions_are_checked_without_their_prefix_in_the_users_own_group() {
        let sink = grant(Role::Sink, "influx-writer");
        assert!(sink.may_subscribe("$share/influx-writer/wattbus/v1/+/meas/+/+"));
        assert!(sink.may_subscribe("$share/influx-writer/wattbus/v1/+/raw/+"));
        // Another's group: it would take a share of that sink's readings.
        assert!(!sink.may_subscribe("$share/any-group/wattbus/v1/+/raw/+"));
        assert!(!sink.may_subscribe("$share/csv-writer/wattbus/v1/+/meas/+/+"));
        let reader = grant(Role::Reader, "grafana");
        assert!(reader.may_subscribe("$share/grafana/wattbus/v1/+/meas/+/+"));
        assert!(!reader.may_subscribe("$share/influx-writer/wattbus/v1/+/meas/+/+"));
        let admin = grant(Role::Admin, "tools");
        assert!(admin.may_subscribe("$share/influx-writer/wattbus/v1/+/meas/+/+"));
        assert!(!sink.may_subscribe("$share/influx-writer/wattbus/v1/+/ack/#"));
        assert!(!sink.may_subscribe("$share/influx-writer/#"));
        for malformed in [
            "$share/influx-writer",
            "$share//wattbus/#",
            "$share/g/",
            "$share",
        ] {
            assert!(
                !grant(Role::Reader, "r").may_subscribe(malformed),
                "{malformed}"
            );
        }
        assert_eq!(strip_share("$share/g/a/b"), Some("a/b"));
        assert_eq!(strip_share("a/b"), Some("a/b"));
        assert_eq!(strip_share("$share/g"), None);
    }

    #[test]
    fn malformed_and_dollar_filters_are_refused_to_all_but_admin() {
        let long_site_status = format!("wattbus/v1/{}/status/+", "s".repeat(65));
        for filter in [
            "",
            "wattbus/#/meas",
            "wattbus/v1/+/status/+#",
            "wattbus/v1/+/status/a+",
            long_site_status.as_str(),
            "$SYS/#",
            "$share/g/$SYS/#",
        ] {
            for role in [Role::Producer, Role::Sink, Role::Processor, Role::Reader] {
                assert!(
                    !grant(role, "me").may_subscribe(filter),
                    "{role:?} {filter:?}"
                );
            }
        }
        assert!(grant(Role::Admin, "me").may_subscribe("$SYS/#"));
    }

    #[test]
    fn a_client_id_belongs_to_the_longest_username_it_names() {
        let users = ["influx", "influx-writer", "modbus-ingest", "tools"];
        let owner = |id: &str| client_id_owner(id, users);
        assert_eq!(owner("influx-writer"), Some("influx-writer"));
        assert_eq!(owner("influx-writer-2"), Some("influx-writer"));
        assert_eq!(owner("influx-1"), Some("influx"));
        assert_eq!(owner("influx"), Some("influx"));
        assert_eq!(owner("modbus-ingest-north"), Some("modbus-ingest"));
        assert_eq!(owner("influxwriter"), None);
        assert_eq!(owner("my-tool"), None);
        assert_eq!(owner(""), None);
    }

    #[test]
    fn every_role_name_parses_as_written_in_the_config() {
        for role in Role::ALL {
            let parsed: Role =
                serde::Deserialize::deserialize(serde::de::value::StrDeserializer::<
                    serde::de::value::Error,
                >::new(role.as_str()))
                .unwrap();
            assert_eq!(parsed, role);
        }
    }
}
