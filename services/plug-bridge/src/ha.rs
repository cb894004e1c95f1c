//! Home Assistant MQTT discovery for the plugs (pure: the payloads and their topics).
//!
//! Each plug becomes a Home Assistant device with a switch and sensors for power, energy
//! (`state_class: total_increasing`: the bridge's counter never goes backwards), temperature
//! and, for Shelly and Tasmota, voltage and current. They read the plug's **state**
//! (`homeassistant/switch/wattbus/<object>/state`, [`HaState`]), which plug-bridge publishes
//! retained after every poll — not the journaled readings on `meas/`, which are published
//! again when a sink is slow to acknowledge them, and so would show Home Assistant an older
//! (lower) counter after a newer one. The switch sends a `Command` on
//! `wattbus/v1/<site>/cmd/<plug>` (built by its `command_template`), carried out and read back
//! like any other.
//!
//! `<object>` is a hash of the site and the plug id: ids of any length and alphabet fit
//! Home Assistant's (and a topic level's 64 bytes), and `a_b` + `c` never meets `a` + `b_c`.
//!
//! Configs are published retained under `homeassistant/<component>/wattbus/<object>/config`
//! (node id `wattbus`: the broker lets plug-bridge write only there), on every connection to the
//! broker (wattbus's broker keeps retained messages in memory only) and whenever Home Assistant
//! says `online` on `homeassistant/status`. An entity is available when both plug-bridge is
//! (its retained service status, which the broker turns `offline` when the connection drops)
//! and the plug answers (`…/availability`, retained, `online`/`offline`).

use proto::Segment;
use serde_json::{Value, json};

use crate::config::PlugKind;

/// Home Assistant's discovery prefix (its default).
pub const PREFIX: &str = "homeassistant";
/// Where Home Assistant says `online` when it (re)starts.
pub const STATUS_TOPIC: &str = "homeassistant/status";
/// The node id of every wattbus entity.
pub const NODE: &str = "wattbus";

/// The plug's id in Home Assistant: 16 hex digits of SHA-256 over the site and the plug id
/// (unique per plug, in HA's id alphabet, short enough for any topic level).
pub fn object(site: &Segment, plug: &Segment) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{}\0{}", site.as_str(), plug.as_str()).as_bytes(),
    );
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The plug's availability topic (retained `online` / `offline`).
pub fn availability_topic(site: &Segment, plug: &Segment) -> String {
    format!("{PREFIX}/switch/{NODE}/{}/availability", object(site, plug))
}

/// The plug's state topic (retained [`HaState`], after every poll).
pub fn state_topic(site: &Segment, plug: &Segment) -> String {
    format!("{PREFIX}/switch/{NODE}/{}/state", object(site, plug))
}

/// What the entities read: the plug's latest poll, published live only (never replayed), so
/// it only moves forward. A value the plug does not give is `null`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HaState {
    pub relay_on: bool,
    pub power_w: f64,
    /// The bridge's counter, never lower than before.
    pub energy_wh: Option<f64>,
    pub temperature_c: Option<f64>,
    pub voltage_v: Option<f64>,
    pub current_a: Option<f64>,
    pub ts_ms: i64,
}

/// A value of the state, or nothing (which Home Assistant ignores for a numeric sensor)
/// while the plug does not give it.
fn field(name: &str) -> String {
    format!("{{% if value_json.{name} is number %}}{{{{ value_json.{name} }}}}{{% endif %}}")
}

/// Every discovery message for one plug: (topic, retained payload).
pub fn announcements(
    site: &Segment,
    plug: &Segment,
    kind: PlugKind,
    bridge: &Segment,
    version: &str,
) -> Vec<(String, Value)> {
    let obj = object(site, plug);
    let (manufacturer, model) = match kind {
        PlugKind::Mystrom => ("myStrom", "WiFi Switch"),
        PlugKind::Shelly => ("Shelly", "Gen2 switch"),
        PlugKind::Tasmota => ("Tasmota", "plug with energy monitor"),
    };
    let common = json!({
        "availability": [
            {
                "topic": format!("wattbus/v1/{}/status/{}", site.as_str(), bridge.as_str()),
                "value_template": "{{ value_json.state }}",
            },
            { "topic": availability_topic(site, plug) },
        ],
        "availability_mode": "all",
        "device": {
            "identifiers": [format!("wattbus_{obj}")],
            "name": plug.as_str(),
            "manufacturer": manufacturer,
            "model": model,
        },
        "origin": {
            "name": "wattbus plug-bridge",
            "sw_version": version,
        },
        "state_topic": state_topic(site, plug),
        "qos": 1,
    });
    let entity = |component: &str, what: &str, extra: Value| -> (String, Value) {
        let mut v = common.clone();
        if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            v.insert("unique_id".into(), json!(format!("wattbus_{obj}_{what}")));
            for (k, x) in extra {
                v.insert(k.clone(), x.clone());
            }
        }
        (
            format!("{PREFIX}/{component}/{NODE}/{obj}_{what}/config"),
            v,
        )
    };
    let now_ms = "(as_timestamp(now()) * 1000) | int";
    // Microseconds: two presses within a millisecond are two commands.
    let now_us = "(as_timestamp(now()) * 1000000) | int";
    let mut out = vec![
        entity(
            "switch",
            "relay",
            json!({
                // The device's name alone: "fridge", not "fridge Relay".
                "name": Value::Null,
                "command_topic": format!("wattbus/v1/{}/cmd/{}", site.as_str(), plug.as_str()),
                // A wattbus Command: its own id, the explicit state, 10 s to be carried out.
                "command_template": format!(
                    "{{\"id\":\"ha-{{{{ {now_us} }}}}\",\"device\":\"{}\",\"action\":\"{{{{ 'on' if value == 'ON' else 'off' }}}}\",\"issued_ts_ms\":{{{{ {now_ms} }}}},\"expires_ts_ms\":{{{{ {now_ms} + 10000 }}}}}}",
                    plug.as_str()
                ),
                "payload_on": "ON",
                "payload_off": "OFF",
                "value_template": "{{ 'ON' if value_json.relay_on else 'OFF' }}",
                "state_on": "ON",
                "state_off": "OFF",
                "optimistic": false,
            }),
        ),
        entity(
            "sensor",
            "power",
            json!({
                "name": "Power",
                "device_class": "power",
                "state_class": "measurement",
                "unit_of_measurement": "W",
                "value_template": field("power_w"),
            }),
        ),
        entity(
            "sensor",
            "energy",
            json!({
                "name": "Energy",
                "device_class": "energy",
                "state_class": "total_increasing",
                "unit_of_measurement": "Wh",
                "value_template": field("energy_wh"),
            }),
        ),
        entity(
            "sensor",
            "temperature",
            json!({
                "name": "Temperature",
                "device_class": "temperature",
                "state_class": "measurement",
                "unit_of_measurement": "°C",
                "value_template": field("temperature_c"),
                "entity_category": "diagnostic",
            }),
        ),
    ];
    if kind != PlugKind::Mystrom {
        out.push(entity(
            "sensor",
            "voltage",
            json!({
                "name": "Voltage",
                "device_class": "voltage",
                "state_class": "measurement",
                "unit_of_measurement": "V",
                "value_template": field("voltage_v"),
            }),
        ));
        out.push(entity(
            "sensor",
            "current",
            json!({
                "name": "Current",
                "device_class": "current",
                "state_class": "measurement",
                "unit_of_measurement": "A",
                "value_template": field("current_a"),
            }),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    /// The keys Home Assistant's MQTT switch and sensor document (full names; the
    /// abbreviations are optional), and the ones each requires.
    const COMMON: &[&str] = &[
        "availability",
        "availability_mode",
        "device",
        "origin",
        "state_topic",
        "qos",
        "unique_id",
        "name",
        "value_template",
        "entity_category",
    ];
    const SWITCH: &[&str] = &[
        "command_topic",
        "command_template",
        "payload_on",
        "payload_off",
        "state_on",
        "state_off",
        "optimistic",
    ];
    const SENSOR: &[&str] = &["device_class", "state_class", "unit_of_measurement"];

    #[test]
    fn every_config_follows_home_assistants_documented_schema() {
        let plug = seg("fridge.1");
        let all = announcements(
            &seg("home"),
            &plug,
            PlugKind::Shelly,
            &seg("plug-bridge"),
            "0.1.0",
        );
        assert_eq!(all.len(), 6);
        let mut unique = std::collections::BTreeSet::new();
        for (topic, v) in &all {
            let levels: Vec<&str> = topic.split('/').collect();
            assert_eq!(levels.len(), 5, "{topic}");
            assert_eq!(
                (levels[0], levels[2], levels[4]),
                ("homeassistant", "wattbus", "config")
            );
            let component = levels[1];
            assert!(
                levels[3]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{topic}: object id outside [a-zA-Z0-9_-]"
            );
            let allowed: Vec<&str> = match component {
                "switch" => [COMMON, SWITCH].concat(),
                "sensor" => [COMMON, SENSOR].concat(),
                other => panic!("{other}"),
            };
            let o = v.as_object().unwrap();
            for k in o.keys() {
                assert!(
                    allowed.contains(&k.as_str()),
                    "{topic}: key {k} is not HA's"
                );
            }
            assert!(unique.insert(o["unique_id"].as_str().unwrap().to_string()));
            assert_eq!(o["state_topic"], state_topic(&seg("home"), &plug).as_str());
            assert_eq!(
                o["device"]["identifiers"][0],
                format!("wattbus_{}", object(&seg("home"), &plug)).as_str()
            );
            assert!(levels[3].len() <= 64, "{topic}");
            for a in o["availability"].as_array().unwrap() {
                assert!(a["topic"].is_string());
            }
            assert_eq!(o["availability_mode"], "all");
            if component == "switch" {
                assert_eq!(o["command_topic"], "wattbus/v1/home/cmd/fridge.1");
            }
        }
        let energy = &all
            .iter()
            .find(|(t, _)| t.ends_with("_energy/config"))
            .unwrap()
            .1;
        assert_eq!(
            (
                &energy["device_class"],
                &energy["state_class"],
                &energy["unit_of_measurement"]
            ),
            (&json!("energy"), &json!("total_increasing"), &json!("Wh"))
        );
        // A myStrom measures neither voltage nor current.
        assert_eq!(
            announcements(
                &seg("home"),
                &seg("lamp"),
                PlugKind::Mystrom,
                &seg("pb"),
                "0"
            )
            .len(),
            4
        );
    }

    #[test]
    fn the_switch_sends_a_wattbus_command() {
        let all = announcements(
            &seg("home"),
            &seg("lamp"),
            PlugKind::Mystrom,
            &seg("pb"),
            "0",
        );
        let t = all[0].1["command_template"].as_str().unwrap();
        // Rendered as Home Assistant would for "ON" at a fixed time, it is a valid Command.
        let rendered = t
            .replace(
                "{{ (as_timestamp(now()) * 1000) | int + 10000 }}",
                "1700000010000",
            )
            .replace(
                "{{ (as_timestamp(now()) * 1000000) | int }}",
                "1700000000000123",
            )
            .replace("{{ (as_timestamp(now()) * 1000) | int }}", "1700000000000")
            .replace("{{ 'on' if value == 'ON' else 'off' }}", "on");
        let c: proto::Command = serde_json::from_str(&rendered).expect(&rendered);
        assert_eq!((c.device.as_str(), c.action), ("lamp", proto::Action::On));
        assert_eq!(c.expires_ts_ms - c.issued_ts_ms, 10_000);
        assert_eq!(c.id.as_str(), "ha-1700000000000123");
    }

    #[test]
    fn ids_are_unique_and_fit_any_topic_level() {
        let (home, other) = (seg("home"), seg("home_a"));
        // `home` + `a_b` and `home_a` + `b`, `fridge.1` and `fridge_1`: four plugs, four ids.
        let ids: std::collections::BTreeSet<String> = [
            object(&home, &seg("a_b")),
            object(&other, &seg("b")),
            object(&home, &seg("fridge.1")),
            object(&home, &seg("fridge_1")),
        ]
        .into();
        assert_eq!(ids.len(), 4);
        let long = seg(&"p".repeat(64));
        for (topic, _) in announcements(
            &seg(&"s".repeat(64)),
            &long,
            PlugKind::Shelly,
            &seg("pb"),
            "0",
        ) {
            assert!(topic.split('/').all(|l| l.len() <= 64), "{topic}");
        }
    }

    #[test]
    fn a_missing_value_renders_nothing_and_the_state_serialises_nulls() {
        assert_eq!(
            field("temperature_c"),
            "{% if value_json.temperature_c is number %}{{ value_json.temperature_c }}{% endif %}"
        );
        let s = HaState {
            relay_on: true,
            power_w: 5.0,
            energy_wh: Some(1.5),
            temperature_c: None,
            voltage_v: None,
            current_a: None,
            ts_ms: 1,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["temperature_c"].is_null() && v["energy_wh"] == 1.5);
    }
}
