//! What the plugs answer, as their vendors document it, read into one shape (pure: no I/O).
//!
//! - myStrom WiFi Switch: `GET /report` → `{"power": W, "relay": bool, "temperature": °C,
//!   "boot_id": "…", "energy_since_boot": Ws, "time_since_boot": s, "Ws": …}`. `Ws` is the
//!   average power since the previous `/report` call and is reset by every call, so a second
//!   poller (Home Assistant, a script) breaks it: the bridge never reads it and counts
//!   `energy_since_boot` with `boot_id` instead. Switching: `GET /relay?state=1|0`,
//!   `GET /toggle`.
//! - Shelly Gen2 (Plus Plug S and kin): `GET /rpc/Switch.GetStatus?id=N` → `{"output": bool,
//!   "apower": W, "voltage": V, "current": A, "aenergy": {"total": Wh, …}, "temperature":
//!   {"tC": °C}}`. Switching: `GET /rpc/Switch.Set?id=N&on=true|false`, then read back.

use serde::Deserialize;

use crate::energy::{Boot, Sample};

/// One poll of a plug.
#[derive(Debug, Clone, PartialEq)]
pub struct PlugReading {
    pub power_w: f64,
    pub relay_on: bool,
    pub temperature_c: Option<f64>,
    pub voltage_v: Option<f64>,
    pub current_a: Option<f64>,
    /// The plug's own energy counter.
    pub energy: Sample,
}

pub(crate) fn finite(name: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{name} is not a number"))
    }
}

#[derive(Deserialize)]
struct MyStromReport {
    power: f64,
    relay: bool,
    #[serde(default)]
    temperature: Option<f64>,
    boot_id: Option<String>,
    energy_since_boot: Option<f64>,
}

/// myStrom's `/report`.
pub fn mystrom_report(body: &[u8]) -> Result<PlugReading, String> {
    let r: MyStromReport =
        serde_json::from_slice(body).map_err(|e| format!("not a myStrom /report: {e}"))?;
    let (Some(boot_id), Some(ws)) = (r.boot_id, r.energy_since_boot) else {
        return Err(
            "the /report has no boot_id and energy_since_boot: update the plug's firmware \
             (the bridge does not count Ws, which every other poller resets)"
                .into(),
        );
    };
    if boot_id.is_empty() || boot_id.len() > 64 {
        return Err(format!("boot_id {boot_id:?} is not one a plug sends"));
    }
    Ok(PlugReading {
        power_w: finite("power", r.power)?,
        relay_on: r.relay,
        temperature_c: r.temperature.filter(|t| t.is_finite()),
        voltage_v: None,
        current_a: None,
        energy: Sample {
            boot: Boot::Id(boot_id),
            total_wh: finite("energy_since_boot", ws)? / 3600.0,
        },
    })
}

#[derive(Deserialize)]
struct ShellyEnergy {
    total: f64,
}

#[derive(Deserialize)]
struct ShellyTemperature {
    #[serde(rename = "tC")]
    t_c: Option<f64>,
}

#[derive(Deserialize)]
struct ShellySwitch {
    output: bool,
    apower: Option<f64>,
    voltage: Option<f64>,
    current: Option<f64>,
    aenergy: Option<ShellyEnergy>,
    temperature: Option<ShellyTemperature>,
}

/// Shelly's `Switch.GetStatus`.
pub fn shelly_status(body: &[u8]) -> Result<PlugReading, String> {
    let s: ShellySwitch = serde_json::from_slice(body)
        .map_err(|e| format!("not a Shelly Switch.GetStatus answer: {e}"))?;
    let (Some(power), Some(energy)) = (s.apower, s.aenergy) else {
        return Err(
            "this switch does not meter (no apower, aenergy): not a plug with a meter".into(),
        );
    };
    Ok(PlugReading {
        power_w: finite("apower", power)?,
        relay_on: s.output,
        temperature_c: s.temperature.and_then(|t| t.t_c).filter(|t| t.is_finite()),
        voltage_v: s.voltage.filter(|v| v.is_finite()),
        current_a: s.current.filter(|v| v.is_finite()),
        energy: Sample {
            boot: Boot::Unknown,
            total_wh: finite("aenergy.total", energy.total)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mystrom_report_as_the_api_documents_it() {
        let r = mystrom_report(
            br#"{"power": 12.3, "Ws": 12.1, "relay": true, "temperature": 24.8, "boot_id": "A425D9AD", "energy_since_boot": 123456.0, "time_since_boot": 3600}"#,
        )
        .unwrap();
        assert_eq!(r.power_w, 12.3);
        assert!(r.relay_on);
        assert_eq!(r.temperature_c, Some(24.8));
        assert_eq!(r.energy.boot, Boot::Id("A425D9AD".into()));
        assert!((r.energy.total_wh - 123456.0 / 3600.0).abs() < 1e-9);
        // Old firmware without the counter: said, not counted from Ws.
        let e = mystrom_report(br#"{"power": 1, "Ws": 1, "relay": false}"#).unwrap_err();
        assert!(e.contains("firmware"), "{e}");
        assert!(mystrom_report(b"<html>").is_err());
    }

    #[test]
    fn a_shelly_switch_status_as_the_api_documents_it() {
        let r = shelly_status(
            br#"{"id":0,"source":"HTTP","output":true,"apower":51.2,"voltage":231.4,"current":0.25,"aenergy":{"total":1234.567,"by_minute":[1,2,3],"minute_ts":1700000000},"temperature":{"tC":38.1,"tF":100.6}}"#,
        )
        .unwrap();
        assert_eq!((r.power_w, r.relay_on), (51.2, true));
        assert_eq!((r.voltage_v, r.current_a), (Some(231.4), Some(0.25)));
        assert_eq!(r.temperature_c, Some(38.1));
        assert_eq!(r.energy.total_wh, 1234.567);
        assert_eq!(r.energy.boot, Boot::Unknown);
        assert!(shelly_status(br#"{"id":0,"output":true}"#).is_err());
    }
}
