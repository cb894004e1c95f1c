//! `scan`: which slave ids answer, and which profile their values fit.
//!
//! A timeout means nobody is there; an exception means somebody is (a meter that refuses a read
//! still answers). A model is guessed from plausible values (mains frequency 45–65 Hz, L1
//! voltage 80–300 V) at the addresses each profile gives, so the guess names the values behind
//! it.

use std::fmt;
use std::ops::RangeInclusive;

use super::read::{round, unit_suffix};
use super::session::{Session, ToolError, exception_name};
use crate::decode::decode;
use crate::profile::{Function, Profile, Profiles, Register};

/// One value a scan reads to test whether a slave fits a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanProbe {
    /// What it is, for the output: `frequency`, `L1 voltage`, `L2 voltage`.
    pub quantity: &'static str,
    pub register: Register,
    /// Values a working meter on a 50/60 Hz grid reports.
    pub plausible: RangeInclusive<f64>,
}

/// Grid frequency on any public grid (50 or 60 Hz) with generous margins.
const FREQUENCY_HZ: RangeInclusive<f64> = 45.0..=65.0;
/// Phase-to-neutral voltage from 100 V grids to 240 V grids with margins.
const VOLTAGE_V: RangeInclusive<f64> = 80.0..=300.0;

/// The probes for a profile: its frequency and L1 voltage, plus the L2 voltage when it has one,
/// which is what tells a three-phase meter from a single-phase one at the same addresses
/// (SDM630 vs SDM120). `None` for a profile with no frequency or no L1 voltage register.
pub fn probes(profile: &Profile) -> Option<Vec<ScanProbe>> {
    let find = |field: &str, channel: Option<&str>| {
        profile.registers.iter().find(|r| {
            r.field == field && r.tags.is_empty() && channel.is_none_or(|c| r.channel.as_str() == c)
        })
    };
    let frequency = find("frequency_hz", None)?;
    let l1 = find("voltage_v", Some("l1"))?;
    let mut out = vec![
        ScanProbe {
            quantity: "frequency",
            register: frequency.clone(),
            plausible: FREQUENCY_HZ,
        },
        ScanProbe {
            quantity: "L1 voltage",
            register: l1.clone(),
            plausible: VOLTAGE_V,
        },
    ];
    if let Some(l2) = find("voltage_v", Some("l2")) {
        out.push(ScanProbe {
            quantity: "L2 voltage",
            register: l2.clone(),
            plausible: VOLTAGE_V,
        });
    }
    Some(out)
}

/// What one probe read gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub probe: ScanProbe,
    /// The decoded value, or why there is none (timeout, exception, NaN).
    pub value: Result<f64, String>,
}

impl Observation {
    pub fn is_plausible(&self) -> bool {
        self.value
            .as_ref()
            .is_ok_and(|v| self.probe.plausible.contains(v))
    }
}

impl fmt::Display for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.probe.register;
        match &self.value {
            Ok(v) => write!(
                f,
                "{} {}{} at {}{:#06x}",
                self.probe.quantity,
                round(*v, r.scale),
                unit_suffix(&r.unit),
                table_prefix(r.function),
                r.address
            ),
            Err(e) => write!(
                f,
                "{} at {}{:#06x}: {e}",
                self.probe.quantity,
                table_prefix(r.function),
                r.address
            ),
        }
    }
}

fn table_prefix(function: Function) -> &'static str {
    match function {
        Function::Holding => "holding ",
        Function::Input => "input ",
    }
}

/// A profile's observations during a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub model: String,
    pub observations: Vec<Observation>,
}

impl Candidate {
    /// Every probe gave a plausible value.
    pub fn fits(&self) -> bool {
        !self.observations.is_empty() && self.observations.iter().all(Observation::is_plausible)
    }
}

/// The models that fit best: among the candidates whose every probe is plausible, those with the
/// most probes (a three-phase profile that also found a plausible L2 voltage beats the
/// single-phase profile with the same L1 and frequency addresses). Empty when none fits.
pub fn best_fits(candidates: &[Candidate]) -> Vec<&Candidate> {
    let fitting: Vec<&Candidate> = candidates.iter().filter(|c| c.fits()).collect();
    let most = fitting
        .iter()
        .map(|c| c.observations.len())
        .max()
        .unwrap_or(0);
    fitting
        .into_iter()
        .filter(|c| c.observations.len() == most)
        .collect()
}

/// One slave that answered a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub slave: u8,
    /// The models that fit best (usually one; several when their maps cannot be told apart).
    pub models: Vec<String>,
    /// The observations behind the guess, or, with no guess, every profile's observations.
    pub evidence: Vec<String>,
    /// How the slave first answered (`answered`, or the exception it sent).
    pub first_answer: String,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = if self.models.is_empty() {
            "unknown model".to_string()
        } else {
            self.models.join(" or ")
        };
        write!(f, "slave {:>3}: {model}", self.slave)?;
        if self.evidence.is_empty() {
            write!(f, " ({})", self.first_answer)
        } else {
            write!(f, " ({})", self.evidence.join(", "))
        }
    }
}

/// How one slave id answered the presence read.
enum Presence {
    Nobody,
    Somebody(String),
}

/// Reads one register of a profile and decodes it; the error is a short reason for the output.
async fn observe(
    session: &mut Session,
    slave: u8,
    probe: &ScanProbe,
) -> Result<Observation, ToolError> {
    let r = &probe.register;
    let value = match session.read(slave, r.function, r.address, r.words()).await {
        Ok(words) => decode(r, &words).map_err(|e| e.to_string()),
        Err(ToolError::Exception { code, .. }) => Err(exception_name(code)),
        Err(ToolError::Timeout { .. }) => Err("no answer".to_string()),
        Err(e @ (ToolError::Connect { .. } | ToolError::Transport { .. })) => return Err(e),
        Err(e) => Err(e.to_string()),
    };
    Ok(Observation {
        probe: probe.clone(),
        value,
    })
}

/// Scans slave ids `from..=to` and identifies every slave that answers against `profiles`.
/// `progress` is called once per id before it is tried (for a progress line).
///
/// A slave is present when the first profile's first probe gets any answer (a value or an
/// exception); only then are the other probes read, so an empty id costs one timeout.
pub async fn scan(
    session: &mut Session,
    profiles: &Profiles,
    from: u8,
    to: u8,
    mut progress: impl FnMut(u8),
) -> Result<Vec<Found>, ToolError> {
    let all: Vec<(String, Vec<ScanProbe>)> = profiles
        .iter()
        .filter_map(|p| probes(p).map(|probes| (p.meter.model.clone(), probes)))
        .collect();
    let Some((_, first_probes)) = all.first() else {
        return Ok(Vec::new());
    };
    let Some(presence_probe) = first_probes.first().cloned() else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for slave in from..=to {
        progress(slave);
        let presence = match observe(session, slave, &presence_probe).await {
            Ok(Observation {
                value: Err(reason), ..
            }) if reason == "no answer" => Presence::Nobody,
            Ok(Observation { value: Ok(_), .. }) => Presence::Somebody("answered".to_string()),
            Ok(Observation {
                value: Err(reason), ..
            }) => Presence::Somebody(format!("answered with {reason}")),
            // A garbled or foreign answer still means something is on the line at this id.
            Err(ToolError::Transport { source, .. }) => {
                Presence::Somebody(format!("answered, but not validly: {source}"))
            }
            Err(e) => return Err(e),
        };
        let Presence::Somebody(first_answer) = presence else {
            continue;
        };
        let mut candidates = Vec::with_capacity(all.len());
        for (model, probes) in &all {
            let mut observations = Vec::with_capacity(probes.len());
            for probe in probes {
                let observation = observe(session, slave, probe).await?;
                let plausible = observation.is_plausible();
                observations.push(observation);
                // The rest of this profile cannot make it fit any more.
                if !plausible {
                    break;
                }
            }
            candidates.push(Candidate {
                model: model.clone(),
                observations,
            });
        }
        let best = best_fits(&candidates);
        let models: Vec<String> = best.iter().map(|c| c.model.clone()).collect();
        let evidence = match best.first() {
            Some(c) => c.observations.iter().map(ToString::to_string).collect(),
            None => candidates
                .iter()
                .flat_map(|c| {
                    c.observations
                        .iter()
                        .map(move |o| format!("{}: {o}", c.model))
                })
                .collect(),
        };
        found.push(Found {
            slave,
            models,
            evidence,
            first_answer,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin() -> Profiles {
        Profiles::builtin().unwrap()
    }

    fn observe_all(
        profile: &Profile,
        value: impl Fn(&ScanProbe) -> Result<f64, String>,
    ) -> Candidate {
        let observations = probes(profile)
            .unwrap()
            .into_iter()
            .map(|probe| Observation {
                value: value(&probe),
                probe,
            })
            .collect();
        Candidate {
            model: profile.meter.model.clone(),
            observations,
        }
    }

    /// What each built-in profile would see on a slave whose registers hold `values`
    /// ((function, address) → decoded value); anything else answers IllegalDataAddress.
    fn candidates(values: &[((Function, u16), f64)]) -> Vec<Candidate> {
        builtin()
            .iter()
            .map(|p| {
                observe_all(p, |probe| {
                    let key = (probe.register.function, probe.register.address);
                    values
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, v)| *v)
                        .ok_or_else(|| "IllegalDataAddress".to_string())
                })
            })
            .collect()
    }

    fn models(c: &[Candidate]) -> Vec<String> {
        best_fits(c).iter().map(|c| c.model.clone()).collect()
    }

    #[test]
    fn every_builtin_profile_has_identification_probes() {
        for p in builtin().iter() {
            let probes = probes(p).unwrap_or_else(|| panic!("{} has no probes", p.meter.model));
            assert_eq!(probes[0].quantity, "frequency", "{}", p.meter.model);
        }
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let p = probes(&we515).unwrap();
        let at: Vec<(Function, u16)> = p
            .iter()
            .map(|p| (p.register.function, p.register.address))
            .collect();
        assert_eq!(
            at,
            [(Function::Holding, 0x0130), (Function::Holding, 0x0131)]
        );
        let sdm120 = builtin().get("eastron-sdm120").unwrap().clone();
        let at: Vec<(Function, u16)> = probes(&sdm120)
            .unwrap()
            .iter()
            .map(|p| (p.register.function, p.register.address))
            .collect();
        assert_eq!(at, [(Function::Input, 0x0046), (Function::Input, 0x0000)]);
    }

    #[test]
    fn a_we515_is_identified_by_frequency_and_voltage_in_holding_registers() {
        let c = candidates(&[
            ((Function::Holding, 0x0130), 50.01),
            ((Function::Holding, 0x0131), 231.45),
        ]);
        assert_eq!(models(&c), ["orno-we-515"]);
    }

    #[test]
    fn an_implausible_frequency_rules_a_profile_out() {
        // A WE-515 map, but 0x0130 holds 500 Hz: not a meter on a grid.
        let c = candidates(&[
            ((Function::Holding, 0x0130), 500.0),
            ((Function::Holding, 0x0131), 231.45),
        ]);
        assert!(models(&c).is_empty());
        let c = candidates(&[
            ((Function::Holding, 0x0130), 50.0),
            ((Function::Holding, 0x0131), 12.0),
        ]);
        assert!(models(&c).is_empty());
    }

    #[test]
    fn an_sdm120_is_told_from_an_sdm630_by_the_l2_voltage() {
        let single = candidates(&[
            ((Function::Input, 0x0046), 49.98),
            ((Function::Input, 0x0000), 229.1),
        ]);
        assert_eq!(models(&single), ["eastron-sdm120"]);
        let three = candidates(&[
            ((Function::Input, 0x0046), 49.98),
            ((Function::Input, 0x0000), 229.1),
            ((Function::Input, 0x0002), 231.0),
        ]);
        assert_eq!(models(&three), ["eastron-sdm630"]);
    }

    #[test]
    fn a_we517_is_identified_by_float_registers() {
        let c = candidates(&[
            ((Function::Holding, 0x0014), 50.0),
            ((Function::Holding, 0x000E), 230.0),
            ((Function::Holding, 0x0010), 231.0),
        ]);
        assert_eq!(models(&c), ["orno-we-517"]);
    }

    #[test]
    fn observations_print_the_values_that_convinced() {
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let c = observe_all(&we515, |p| {
            Ok(if p.quantity == "frequency" {
                50.01
            } else {
                231.45
            })
        });
        let text: Vec<String> = c.observations.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "frequency 50.01 Hz at holding 0x0130",
                "L1 voltage 231.45 V at holding 0x0131"
            ]
        );
    }
}
