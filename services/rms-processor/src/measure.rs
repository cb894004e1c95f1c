//! One window to one reading per channel (pure: no tokio).
//!
//! Which channel is what: every channel of the frame is a current channel, except one that a
//! configured channel names as its `voltage`; a channel labelled `v` that nobody pairs is
//! reported as a voltage of its own. A current channel with a paired voltage gets real power
//! and power factor; without one, apparent power from the nominal voltage, labelled so.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::kernel::{self, Calibration};
use crate::window::Window;

/// What a channel's power figure rests on: the `power_basis` tag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Basis {
    /// Real power from a paired voltage channel.
    Measured,
    /// `Irms × nominal`: apparent power only.
    NominalVoltage(f64),
    /// A voltage channel on its own.
    VoltageOnly,
}

impl Basis {
    pub const fn tag(self) -> &'static str {
        match self {
            Basis::Measured => "measured",
            Basis::NominalVoltage(_) => "nominal_voltage",
            Basis::VoltageOnly => "voltage_only",
        }
    }
}

/// A channel's figures for one window, before energy is added.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub channel: String,
    pub basis: Basis,
    /// `current_a`, `voltage_v`, `power_w`, `apparent_power_va`, `power_factor`, … (no energy).
    pub fields: BTreeMap<String, f64>,
    /// The power to integrate into energy (W for `Measured`, VA for `NominalVoltage`).
    pub power_for_energy: Option<f64>,
    /// Whole mains cycles were found (false: a flat or dead channel, the block was used).
    pub whole_cycles: bool,
}

/// Compute every channel of `w` of `device`.
pub fn window(cfg: &Config, device: &str, w: &Window, scratch: &mut Vec<f32>) -> Vec<Reading> {
    let paired: Vec<&str> = w
        .channels
        .iter()
        .filter_map(|c| cfg.channel(device, &c.name)?.voltage.as_ref())
        .map(|v| v.as_str())
        .collect();
    let mut out = Vec::new();
    for c in &w.channels {
        if paired.contains(&c.name.as_str()) {
            continue;
        }
        let cc = cfg.channel(device, &c.name);
        let scale = cc.map_or(1.0, |x| x.scale);
        let voltage = cc
            .and_then(|x| x.voltage.as_ref())
            .and_then(|v| w.channel(v.as_str()));
        let voltage_scale = voltage
            .and_then(|v| cfg.channel(device, &v.name))
            .map_or(1.0, |x| x.scale);
        let cal = Calibration {
            sample_rate_hz: w.sample_rate_hz,
            mains_hz: cfg.mains_hz,
            current_scale: scale,
            voltage_scale,
            phase_shift: cc.map_or(0.0, |x| x.phase_shift),
        };
        let win = kernel::Window {
            current: &c.samples,
            voltage: voltage.map(|v| v.samples.as_slice()),
        };
        let Some(r) = kernel::compute(&win, &cal, scratch) else {
            continue;
        };
        let mut fields = BTreeMap::new();
        let (basis, power) = if c.unit == "v" && voltage.is_none() {
            fields.insert("voltage_v".to_string(), r.current_rms_a);
            (Basis::VoltageOnly, None)
        } else if let (Some(v), Some(p), Some(va)) =
            (r.voltage_rms_v, r.real_power_w, r.apparent_power_va)
        {
            fields.insert("current_a".to_string(), r.current_rms_a);
            fields.insert("voltage_v".to_string(), v);
            fields.insert("power_w".to_string(), p);
            fields.insert("apparent_power_va".to_string(), va);
            if let Some(pf) = r.power_factor {
                fields.insert("power_factor".to_string(), pf);
            }
            (Basis::Measured, Some(p))
        } else {
            let nominal = cc
                .and_then(|x| x.nominal_voltage_v)
                .unwrap_or(cfg.nominal_voltage_v);
            let va = r.current_rms_a * nominal;
            fields.insert("current_a".to_string(), r.current_rms_a);
            fields.insert("apparent_power_va".to_string(), va);
            fields.insert("nominal_voltage_v".to_string(), nominal);
            (Basis::NominalVoltage(nominal), Some(va))
        };
        out.push(Reading {
            channel: c.name.clone(),
            basis,
            fields,
            power_for_energy: power,
            whole_cycles: r.whole_cycles,
        });
    }
    out
}

/// The energy counter's key for a channel: measured Wh and nominal VAh never share one, so
/// adding a voltage sensor later does not splice two kinds of energy into one counter.
pub fn energy_key(device: &str, channel: &str, basis: Basis) -> String {
    match basis {
        Basis::NominalVoltage(_) => format!("{device}/{channel}/vah"),
        _ => format!("{device}/{channel}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChannelConfig;
    use crate::window::Channel;
    use proto::Segment;
    use std::f64::consts::PI;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn sine(n: usize, fs: f64, rms: f64, dc: f64, phase: f64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (rms * 2f64.sqrt() * (2.0 * PI * 50.0 * i as f64 / fs + phase).sin() + dc) as f32
            })
            .collect()
    }

    fn window(channels: Vec<Channel>) -> Window {
        Window {
            start_us: 1_764_000_000_000_000,
            end_us: 1_764_000_001_000_000,
            sample_rate_hz: 2000.0,
            channels,
            partial: false,
        }
    }

    fn chan(name: &str, unit: &str, samples: Vec<f32>) -> Channel {
        Channel {
            name: name.into(),
            unit: unit.into(),
            samples,
        }
    }

    #[test]
    fn a_ct_alone_gets_apparent_power_from_the_nominal_voltage_labelled_so() {
        let cfg = Config {
            channels: vec![ChannelConfig {
                device: seg("prime-1"),
                channel: seg("ct1"),
                scale: 0.5,
                voltage: None,
                phase_shift: 0.0,
                nominal_voltage_v: Some(120.0),
            }],
            ..Config::default()
        };
        // 10 counts RMS on a 512 offset, 0.5 A per count: 5 A.
        let w = window(vec![chan(
            "ct1",
            "adc",
            sine(2000, 2000.0, 10.0, 512.0, 0.3),
        )]);
        let r = super::window(&cfg, "prime-1", &w, &mut Vec::new());
        assert_eq!(r.len(), 1);
        let f = &r[0].fields;
        assert!((f["current_a"] - 5.0).abs() < 0.025, "{f:?}");
        assert!((f["apparent_power_va"] - 600.0).abs() < 3.0, "{f:?}");
        assert_eq!(f["nominal_voltage_v"], 120.0);
        assert!(
            !f.contains_key("power_w"),
            "no real power without a voltage"
        );
        assert_eq!(r[0].basis.tag(), "nominal_voltage");
        assert_eq!(energy_key("prime-1", "ct1", r[0].basis), "prime-1/ct1/vah");
    }

    #[test]
    fn a_paired_voltage_gives_real_power_and_is_not_reported_twice() {
        let cfg = Config {
            channels: vec![ChannelConfig {
                device: seg("d"),
                channel: seg("ct1"),
                scale: 1.0,
                voltage: Some(seg("v1")),
                phase_shift: 0.0,
                nominal_voltage_v: None,
            }],
            ..Config::default()
        };
        // 4 A and 230 V, current lagging by 60°: P = 460 W, PF = 0.5.
        let w = window(vec![
            chan("ct1", "a", sine(2000, 2000.0, 4.0, 0.0, -PI / 3.0)),
            chan("v1", "v", sine(2000, 2000.0, 230.0, 0.0, 0.0)),
        ]);
        let r = super::window(&cfg, "d", &w, &mut Vec::new());
        assert_eq!(r.len(), 1, "the voltage channel is part of ct1's reading");
        let f = &r[0].fields;
        assert!((f["power_w"] - 460.0).abs() < 4.6, "{f:?}");
        assert!((f["power_factor"] - 0.5).abs() < 0.01, "{f:?}");
        assert!((f["voltage_v"] - 230.0).abs() < 1.0, "{f:?}");
        assert_eq!(r[0].basis, Basis::Measured);
        assert_eq!(r[0].power_for_energy, Some(f["power_w"]));
    }

    #[test]
    fn an_unpaired_voltage_channel_reports_its_voltage() {
        let w = window(vec![chan("v1", "v", sine(2000, 2000.0, 231.0, 0.0, 0.0))]);
        let r = super::window(&Config::default(), "d", &w, &mut Vec::new());
        assert_eq!(r[0].basis, Basis::VoltageOnly);
        assert!((r[0].fields["voltage_v"] - 231.0).abs() < 1.0);
        assert_eq!(r[0].power_for_energy, None);
    }
}
