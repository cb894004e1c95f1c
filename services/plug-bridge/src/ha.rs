//! Home Assistant MQTT discovery for the plugs (pure: the payloads and their topics).
//!
//! Each plug becomes a Home Assistant device with a switch and sensors for power, energy
//! (`state_class: total_increasing`: the bridge's counter never goes backwards), temperature
//! and, for Shelly, voltage and current. They read the plug's own readings
//! (`wattbus/v1/<site>/meas/<plug>/relay`, a `Measurement` whose `fields` hold the values), so
//! Home Assistant sees exactly what InfluxDB stores; the switch sends a `Command` on
//! `wattbus/v1/<site>/cmd/<plug>` (built by its `command_template`), carried out and read back
//! like any other.
//!
//! Configs are published retained under `homeassistant/<component>/wattbus/<object>/config`
//! (node id `wattbus`: the broker lets plug-bridge write only there), on every connection to the
//! broker (wattbus's broker keeps retained messages in memory only) and whenever Home Assistant
//! says `online` on `homeassistant/status`. An entity is available when both plug-bridge is
//! (its retained service status, which the broker turns `offline` when the connection drops)
//! and the plug answers (`…/availability`, retained, `online`/`offline`).

use proto::Segment;
use serde_json::{Value, json};

use crate::config::Kind;

/// Home Assistant's discovery prefix (its default).
pub const PREFIX: &str = "homeassistant";
/// Where Home Assistant says `online` when it (re)starts.
pub const STATUS_TOPIC: &str = "homeassistant/status";
/// The node id of every wattbus entity.
pub const NODE: &str = "wattbus";

/// `<site>_<plug>`, in Home Assistant's id alphabet (`[a-zA-Z0-9_-]`).
fn object(site: &Segment, plug: &Segment) -> String {
    format!("{}_{}", site.as_str(), plug.as_str()).replace('.', "_")
}

/// The plug's availability topic (retained `online` / `offline`).
pub fn availability_topic(site: &Segment, plug: &Segment) -> String {
    format!("{PREFIX}/switch/{NODE}/{}/availability", object(site, plug))
}

/// A value of the plug's reading, or the entity's current state while a reading lacks it.
fn field(name: &str) -> String {
    format!("{{{{ value_json.fields.{name} if '{name}' in value_json.fields else this.state }}}}")
}

/// Every discovery message for one plug: (topic, retained payload).
pub fn announcements(
    site: &Segment,
    plug: &Segment,
    kind: Kind,
    bridge: &Segment,
    version: &str,
) -> Vec<(String, Value)> {
    let obj = object(site, plug);
    let readings = format!("wattbus/v1/{}/meas/{}/relay", site.as_str(), plug.as_str());
    let (manufacturer, model) = match kind {
        Kind::Mystrom => ("myStrom", "WiFi Switch"),
        Kind::Shelly => ("Shelly", "Gen2 switch"),
        Kind::Tasmota => ("Tasmota", "plug with energy monitor"),
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
        "state_topic": readings,
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
                    "{{\"id\":\"ha-{{{{ {now_ms} }}}}\",\"device\":\"{}\",\"action\":\"{{{{ 'on' if value == 'ON' else 'off' }}}}\",\"issued_ts_ms\":{{{{ {now_ms} }}}},\"expires_ts_ms\":{{{{ {now_ms} + 10000 }}}}}}",
                    plug.as_str()
                ),
                "payload_on": "ON",
                "payload_off": "OFF",
                "value_template": "{{ 'ON' if value_json.fields.relay_on == 1 else 'OFF' }}",
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
    if kind != Kind::Mystrom {
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
        let all = announcements(
            &seg("home"),
            &seg("fridge.1"),
            Kind::Shelly,
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
            assert_eq!(o["state_topic"], "wattbus/v1/home/meas/fridge.1/relay");
            assert_eq!(o["device"]["identifiers"][0], "wattbus_home_fridge_1");
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
            announcements(&seg("home"), &seg("lamp"), Kind::Mystrom, &seg("pb"), "0").len(),
            4
        );
    }

    #[test]
    fn the_switch_sends_a_wattbus_command() {
        let all = announcements(&seg("home"), &seg("lamp"), Kind::Mystrom, &seg("pb"), "0");
        let t = all[0].1["command_template"].as_str().unwrap();
        // Rendered as Home Assistant would for "ON" at a fixed time, it is a valid Command.
        let rendered = t
            .replace(
                "{{ (as_timestamp(now()) * 1000) | int + 10000 }}",
                "1700000010000",
            )
            .replace("{{ (as_timestamp(now()) * 1000) | int }}", "1700000000000")
            .replace("{{ 'on' if value == 'ON' else 'off' }}", "on");
        let c: proto::Command = serde_json::from_str(&rendered).expect(&rendered);
        assert_eq!((c.device.as_str(), c.action), ("lamp", proto::Action::On));
        assert_eq!(c.expires_ts_ms - c.issued_ts_ms, 10_000);
        assert_eq!(c.id.as_str(), "ha-1700000000000");
    }
}
