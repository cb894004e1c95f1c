//! Tasmota plugs: they speak MQTT themselves, on wattbus's broker (each logs in as a user
//! with role `tasmota` named like its topic, so it speaks only for itself).
//!
//! The bridge reads and switches them as it does the HTTP plugs, so they get the same poll
//! rate, backoff, energy counter, commands, API and Home Assistant entities. Tasmota's
//! documented commands, with its default full topic `%prefix%/%topic%/`:
//! - read: `cmnd/<topic>/POWER` with an empty payload → `stat/<topic>/POWER` `ON`/`OFF`
//!   (or `stat/<topic>/RESULT` `{"POWER":"ON"}`); then `cmnd/<topic>/STATUS` `10` →
//!   `stat/<topic>/STATUS10` `{"StatusSNS": {"ENERGY": {"Total": kWh, "Power": W,
//!   "Voltage": V, "Current": A, …}}}`. `Total` is the plug's own counter, which a reset or
//!   a lost flash write can take back: the bridge's counter (`energy`) never goes back.
//! - switch: `cmnd/<topic>/POWER` `ON`/`OFF` (explicit, never `TOGGLE`) → the state it took.
//!
//! Tasmota's answers carry no request id: before each request the plug's queue is emptied,
//! and only the answer of the kind asked for is taken.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::Segment;
use runtime::bus::{Bus, Message, Overflow, QoS};
use serde::Deserialize;
use tokio::sync::{Mutex, mpsc};

use crate::device::{PlugReading, finite};
use crate::energy::{Boot, Sample};

/// Answers kept for one plug between its requests; more are dropped (they are stale).
const QUEUE: usize = 16;

/// The Tasmota plugs' answers, each to its plug.
pub struct Hub {
    bus: Bus,
    plugs: HashMap<Segment, Mutex<mpsc::Receiver<Message>>>,
}

impl Hub {
    /// Subscribe to the plugs' `stat/` topics and route each answer to its plug.
    pub fn start(bus: &Bus, topics: &[Segment]) -> (Arc<Hub>, tokio::task::JoinHandle<()>) {
        let mut senders = HashMap::new();
        let mut plugs = HashMap::new();
        for t in topics {
            let (tx, rx) = mpsc::channel(QUEUE);
            senders.insert(t.as_str().to_string(), tx);
            plugs.insert(t.clone(), Mutex::new(rx));
        }
        // A subscription per plug, not one `stat/+/+`: the broker keeps a log per filter, and a
        // plug that floods its own topic then cannot push the others' answers out of it.
        let mut routes = Vec::new();
        for (topic, tx) in senders {
            let mut rx = bus.subscribe(format!("stat/{topic}/+"), QoS::AtLeastOnce, Overflow::Drop);
            routes.push(tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    // A full queue: nobody is waiting, the answer is stale.
                    let _ = tx.try_send(m);
                }
            }));
        }
        let router = tokio::spawn(async move {
            for r in routes {
                let _ = r.await;
            }
        });
        let hub = Hub {
            bus: bus.clone(),
            plugs,
        };
        (Arc::new(hub), router)
    }

    /// Read the plug: its relay, then its energy.
    pub async fn read(&self, topic: &Segment, timeout: Duration) -> Result<PlugReading, String> {
        let mut rx = self.queue(topic)?.lock().await;
        drain(&mut rx);
        self.command(topic, "POWER", "").await?;
        let on = answer(&mut rx, timeout, "POWER", power).await?;
        self.command(topic, "STATUS", "10").await?;
        let mut reading = answer(&mut rx, timeout, "STATUS10", status10).await?;
        reading.relay_on = on;
        Ok(reading)
    }

    /// Set the relay; `Ok` once the plug says it took a state (the caller reads it back).
    pub async fn switch(&self, topic: &Segment, on: bool, timeout: Duration) -> Result<(), String> {
        let mut rx = self.queue(topic)?.lock().await;
        drain(&mut rx);
        self.command(topic, "POWER", if on { "ON" } else { "OFF" })
            .await?;
        answer(&mut rx, timeout, "POWER", power).await.map(|_| ())
    }

    fn queue(&self, topic: &Segment) -> Result<&Mutex<mpsc::Receiver<Message>>, String> {
        self.plugs
            .get(topic)
            .ok_or_else(|| format!("no Tasmota plug with topic {topic} is configured"))
    }

    async fn command(&self, topic: &Segment, command: &str, payload: &str) -> Result<(), String> {
        let t = format!("cmnd/{}/{command}", topic.as_str());
        self.bus
            .publish(&t, payload, false)
            .await
            .map_err(|e| format!("cannot publish {t}: {e}"))
    }
}

fn drain(rx: &mut mpsc::Receiver<Message>) {
    while rx.try_recv().is_ok() {}
}

/// The first answer `parse` takes (it is given the last topic level and the payload) within
/// `timeout`.
async fn answer<T>(
    rx: &mut mpsc::Receiver<Message>,
    timeout: Duration,
    what: &str,
    parse: impl Fn(&str, &[u8]) -> Option<Result<T, String>>,
) -> Result<T, String> {
    let wait = async {
        while let Some(m) = rx.recv().await {
            let last = m.topic.rsplit('/').next().unwrap_or_default();
            if let Some(r) = parse(last, &m.payload) {
                return r;
            }
        }
        Err("plug-bridge is stopping".to_string())
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no {what} answer within {} ms (is the plug online, its topic right?)",
                timeout.as_millis()
            ))
        })
}

/// `stat/<t>/POWER` `ON`/`OFF`, or `stat/<t>/RESULT` `{"POWER": "ON"}`; also as Tasmota
/// sends them with SetOption4 (JSON on `POWER`) or SetOption26 (`POWER1`). Anything else is
/// not this answer (`None`): the wait goes on.
pub fn power(last: &str, payload: &[u8]) -> Option<Result<bool, String>> {
    #[derive(Deserialize)]
    struct Json {
        #[serde(rename = "POWER")]
        power: Option<String>,
        #[serde(rename = "POWER1")]
        power1: Option<String>,
    }
    let state = match last {
        "POWER" | "POWER1" | "RESULT" => {
            let text = String::from_utf8_lossy(payload).trim().to_string();
            match serde_json::from_str::<Json>(&text) {
                Ok(j) => j.power.or(j.power1)?,
                Err(_) if last != "RESULT" => text,
                Err(_) => return None,
            }
        }
        _ => return None,
    };
    match state.to_ascii_uppercase().as_str() {
        "ON" | "1" => Some(Ok(true)),
        "OFF" | "0" => Some(Ok(false)),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Status10 {
    #[serde(rename = "StatusSNS")]
    sns: Sns,
}

#[derive(Deserialize)]
struct Sns {
    #[serde(rename = "ENERGY")]
    energy: Option<PlugEnergy>,
}

#[derive(Deserialize)]
struct PlugEnergy {
    #[serde(rename = "Total")]
    total_kwh: f64,
    #[serde(rename = "Power")]
    power_w: f64,
    #[serde(rename = "Voltage")]
    voltage_v: Option<f64>,
    #[serde(rename = "Current")]
    current_a: Option<f64>,
}

/// `stat/<t>/STATUS10`: the energy monitor's values (the relay is filled in by the caller).
pub fn status10(last: &str, payload: &[u8]) -> Option<Result<PlugReading, String>> {
    if last != "STATUS10" {
        return None;
    }
    let parsed = serde_json::from_slice::<Status10>(payload)
        .map_err(|e| format!("not a Tasmota STATUS 10 answer: {e}"))
        .and_then(|s| {
            s.sns.energy.ok_or_else(|| {
                "it has no ENERGY in its sensors: not a plug with an energy monitor".to_string()
            })
        })
        .and_then(|e| {
            Ok(PlugReading {
                power_w: finite("Power", e.power_w)?,
                relay_on: false,
                temperature_c: None,
                voltage_v: e.voltage_v.filter(|v| v.is_finite()),
                current_a: e.current_a.filter(|v| v.is_finite()),
                energy: Sample {
                    boot: Boot::Unknown,
                    total_wh: finite("Total", e.total_kwh)? * 1000.0,
                },
            })
        });
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_tasmota_documents_them() {
        assert_eq!(power("POWER", b"ON"), Some(Ok(true)));
        assert_eq!(power("RESULT", br#"{"POWER":"OFF"}"#), Some(Ok(false)));
        assert_eq!(power("RESULT", br#"{"Dimmer":50}"#), None);
        assert_eq!(power("STATUS10", b"{}"), None);
        assert_eq!(power("POWER", b"MAYBE"), None);
        assert_eq!(power("POWER", br#"{"POWER":"ON"}"#), Some(Ok(true)));
        assert_eq!(power("POWER1", b"OFF"), Some(Ok(false)));
        assert_eq!(power("RESULT", br#"{"POWER1":"ON"}"#), Some(Ok(true)));
        let r = status10(
            "STATUS10",
            br#"{"StatusSNS":{"Time":"2026-12-04T17:00:00","ENERGY":{"TotalStartTime":"2026-01-01T00:00:00","Total":12.345,"Yesterday":1.2,"Today":0.3,"Power":57,"ApparentPower":60,"ReactivePower":18,"Factor":0.95,"Voltage":231,"Current":0.26}}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.power_w, 57.0);
        assert!((r.energy.total_wh - 12_345.0).abs() < 1e-6);
        assert_eq!((r.voltage_v, r.current_a), (Some(231.0), Some(0.26)));
        let e = status10("STATUS10", br#"{"StatusSNS":{"Time":"x"}}"#)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("ENERGY"), "{e}");
        assert!(status10("STATUS10", b"<html>").unwrap().is_err());
        assert!(status10("POWER", b"ON").is_none());
    }
}
