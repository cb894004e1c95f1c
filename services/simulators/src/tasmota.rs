//! A simulated Tasmota plug with an energy monitor, speaking MQTT as Tasmota documents it
//! (default full topic `%prefix%/%topic%/`), on a wattbus bus connection of its own:
//! - `cmnd/<topic>/POWER` empty → `stat/<topic>/POWER` `ON`/`OFF`; `ON`/`OFF`/`TOGGLE` →
//!   switched, then `stat/<topic>/RESULT` `{"POWER":"…"}` and `stat/<topic>/POWER`;
//! - `cmnd/<topic>/STATUS` `10` → `stat/<topic>/STATUS10` `{"StatusSNS": {"ENERGY": {"Total"
//!   (kWh), "Power", "Voltage", "Current", …}}}`;
//! - `tele/<topic>/LWT` `Online`, retained.
//!
//! Its load draws `load_w` while the relay is on; `Total` grows with the real time.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use runtime::bus::{Bus, Overflow, QoS};

#[derive(Debug)]
struct State {
    on: bool,
    total_kwh: f64,
    load_w: f64,
    at: Instant,
}

impl State {
    fn advance(&mut self) {
        let now = Instant::now();
        if self.on {
            self.total_kwh += self.load_w * now.duration_since(self.at).as_secs_f64() / 3.6e6;
        }
        self.at = now;
    }
}

#[derive(Debug, Clone)]
pub struct SimTasmota {
    topic: String,
    state: Arc<Mutex<State>>,
}

impl SimTasmota {
    pub fn new(topic: &str, load_w: f64) -> Self {
        Self {
            topic: topic.to_string(),
            state: Arc::new(Mutex::new(State {
                on: true,
                total_kwh: 0.0,
                load_w,
                at: Instant::now(),
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.advance();
        f(&mut s)
    }

    pub fn relay_on(&self) -> bool {
        self.with(|s| s.on)
    }

    /// Answer commands on `bus` until it closes.
    pub async fn run(self, bus: Bus) {
        let mut rx = bus.subscribe(
            format!("cmnd/{}/+", self.topic),
            QoS::AtLeastOnce,
            Overflow::Drop,
        );
        let stat = |what: &str| format!("stat/{}/{what}", self.topic);
        let _ = bus
            .publish(&format!("tele/{}/LWT", self.topic), "Online", true)
            .await;
        while let Some(m) = rx.recv().await {
            let command = m
                .topic
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            let payload = String::from_utf8_lossy(&m.payload)
                .trim()
                .to_ascii_uppercase();
            let replies: Vec<(String, String)> = match (command.as_str(), payload.as_str()) {
                ("POWER", "") => vec![(stat("POWER"), state(self.relay_on()).into())],
                ("POWER", p @ ("ON" | "OFF" | "TOGGLE" | "1" | "0")) => {
                    let on = self.with(|s| {
                        s.on = match p {
                            "ON" | "1" => true,
                            "OFF" | "0" => false,
                            _ => !s.on,
                        };
                        s.on
                    });
                    vec![
                        (stat("RESULT"), format!(r#"{{"POWER":"{}"}}"#, state(on))),
                        (stat("POWER"), state(on).into()),
                    ]
                }
                ("STATUS", "10") => {
                    let (total, power) =
                        self.with(|s| (s.total_kwh, if s.on { s.load_w } else { 0.0 }));
                    let current = power / 230.0;
                    vec![(
                        stat("STATUS10"),
                        format!(
                            r#"{{"StatusSNS":{{"Time":"1970-01-01T00:00:00","ENERGY":{{"TotalStartTime":"1970-01-01T00:00:00","Total":{total:.3},"Yesterday":0.000,"Today":{total:.3},"Power":{power:.0},"ApparentPower":{power:.0},"ReactivePower":0,"Factor":1.00,"Voltage":230,"Current":{current:.3}}}}}}}"#
                        ),
                    )]
                }
                _ => Vec::new(),
            };
            for (topic, body) in replies {
                if bus.publish(&topic, body, false).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn state(on: bool) -> &'static str {
    if on { "ON" } else { "OFF" }
}
