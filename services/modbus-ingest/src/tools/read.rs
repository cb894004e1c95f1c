//! `read`: registers of one profile, decoded (sign, word order, scale, unit), with the raw
//! words for `--raw`, in the fewest requests the profile's limits allow.

use super::InputError;
use super::session::{Session, ToolError};
use crate::decode::{ValueError, decode};
use crate::plan::plan;
use crate::profile::{Function, Profile, Register};

/// Parses a register address as written in vendor tables: `0x0140`, `0X0140` or `320`.
pub fn parse_register(text: &str) -> Result<u16, InputError> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => t.parse::<u16>(),
    };
    parsed.map_err(|_| {
        InputError::new(
            "--register",
            format!("{text:?} is not a register address (0x0000–0xFFFF or 0–65535)"),
        )
    })
}

/// Which registers of a profile to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    All,
    /// The register that starts at this address (holding or input).
    Address(u16),
    /// Every register with this field name (`power_w` is L1 and total on a WE-515).
    Field(String),
}

/// The registers of `profile` that `select` names, in profile order.
pub fn select(profile: &Profile, select: &Select) -> Result<Vec<Register>, InputError> {
    let chosen: Vec<Register> = profile
        .registers
        .iter()
        .filter(|r| match select {
            Select::All => true,
            Select::Address(a) => r.address == *a,
            Select::Field(f) => r.field == *f,
        })
        .cloned()
        .collect();
    if !chosen.is_empty() {
        return Ok(chosen);
    }
    let model = &profile.meter.model;
    Err(match select {
        Select::All => InputError::new("--profile", format!("{model} has no registers")),
        Select::Address(a) => {
            let near: Vec<String> = profile
                .registers
                .iter()
                .filter(|r| r.address <= *a && *a <= r.last())
                .map(|r| format!("{:#06x} ({})", r.address, r.field))
                .collect();
            let reason = if near.is_empty() {
                format!("no register of {model} starts at {a:#06x}")
            } else {
                format!(
                    "{a:#06x} is inside a wider value of {model}: read {}",
                    near.join(" or ")
                )
            };
            InputError::new("--register", reason)
        }
        Select::Field(f) => {
            let mut fields: Vec<&str> =
                profile.registers.iter().map(|r| r.field.as_str()).collect();
            fields.sort_unstable();
            fields.dedup();
            InputError::new(
                "--field",
                format!("{model} has no field {f:?}; it has {}", fields.join(", ")),
            )
        }
    })
}

/// One register read and decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterReading {
    pub register: Register,
    pub words: Vec<u16>,
    pub value: Result<f64, ValueError>,
}

impl RegisterReading {
    /// `power l1 power_w = -1234 W  (0x0140 i32)`, with the words when `raw`.
    pub fn line(&self, raw: bool) -> String {
        let r = &self.register;
        let mut name = format!("{} {}", r.measurement, r.channel);
        for (k, v) in &r.tags {
            name.push_str(&format!(" {k}={v}"));
        }
        let value = match &self.value {
            Ok(v) => format!("{}{}", round(*v, r.scale), unit_suffix(&r.unit)),
            Err(e) => format!("no value: {e}"),
        };
        let mut line = format!("{:#06x} {:<22} {:<28} {value}", r.address, name, r.field);
        if raw {
            let words: Vec<String> = self.words.iter().map(|w| format!("{w:#06x}")).collect();
            line.push_str(&format!(
                "  [{} {}, {} word order, scale {}: {}]",
                fn_label(r.function),
                r.value_type,
                match r.word_order {
                    crate::profile::WordOrder::Big => "high-first",
                    crate::profile::WordOrder::Little => "low-first",
                },
                r.scale,
                words.join(" ")
            ));
        }
        line
    }
}

fn fn_label(function: Function) -> &'static str {
    match function {
        Function::Holding => "FC03",
        Function::Input => "FC04",
    }
}

/// ` V` after a value with a unit, nothing after one without.
pub(super) fn unit_suffix(unit: &str) -> String {
    if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    }
}

/// A scaled value printed with as many decimals as its scale carries (0.001 → 3), so 231.45 V
/// does not print as 231.45000000000002.
pub fn round(value: f64, scale: f64) -> String {
    let decimals = if scale.abs() >= 1.0 || scale == 0.0 {
        0
    } else {
        // 0.01 → 2; capped for odd scales like 1/3.
        ((-scale.abs().log10()).ceil() as usize).min(6)
    };
    // f32 values (scale 1) keep their own precision: print at most 3 decimals, trimmed.
    if scale == 1.0 && value.fract() != 0.0 {
        let s = format!("{value:.3}");
        return s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{value:.decimals$}")
}

/// Reads the selected registers of `profile` from `slave` in the fewest requests the profile's
/// limits allow, and decodes each.
pub async fn read(
    session: &mut Session,
    slave: u8,
    profile: &Profile,
    registers: &[Register],
) -> Result<Vec<RegisterReading>, ToolError> {
    let requests = plan(registers, |_| true, profile.limits)?;
    let mut out: Vec<(usize, RegisterReading)> = Vec::with_capacity(registers.len());
    for request in &requests {
        let words = session
            .read(slave, request.function, request.start, request.count)
            .await?;
        for &index in &request.registers {
            let Some(register) = registers.get(index) else {
                continue;
            };
            let mine = request.words_of(register, &words).unwrap_or_default();
            out.push((
                index,
                RegisterReading {
                    register: register.clone(),
                    words: mine.to_vec(),
                    value: decode(register, mine),
                },
            ));
        }
    }
    // Back to the order the user's profile lists them in.
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profiles;

    fn builtin() -> Profiles {
        Profiles::builtin().unwrap()
    }

    #[test]
    fn register_addresses_parse_in_hex_and_decimal() {
        assert_eq!(parse_register("0x0140"), Ok(0x0140));
        assert_eq!(parse_register("0XA000"), Ok(0xA000));
        assert_eq!(parse_register("320"), Ok(320));
        assert!(parse_register("0x10000").is_err());
        assert!(parse_register("power").is_err());
    }

    #[test]
    fn select_finds_registers_by_address_or_field_and_explains_misses() {
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let r = select(&we515, &Select::Address(0x0140)).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].field, "power_w");
        let r = select(&we515, &Select::Field("power_w".into())).unwrap();
        let at: Vec<u16> = r.iter().map(|r| r.address).collect();
        assert_eq!(at, [0x0140, 0x0146]);
        assert_eq!(
            select(&we515, &Select::All).unwrap().len(),
            we515.registers.len()
        );

        let e = select(&we515, &Select::Address(0x0141)).unwrap_err();
        assert!(e.reason.contains("inside a wider value"), "{e}");
        assert!(e.reason.contains("0x0140 (power_w)"), "{e}");
        let e = select(&we515, &Select::Address(0x0200)).unwrap_err();
        assert!(
            e.reason
                .contains("no register of orno-we-515 starts at 0x0200"),
            "{e}"
        );
        let e = select(&we515, &Select::Field("power_kw".into())).unwrap_err();
        assert!(e.reason.contains("has no field \"power_kw\""), "{e}");
        assert!(e.reason.contains("power_factor"), "{e}");
    }

    #[test]
    fn readings_print_signed_scaled_values_and_raw_words() {
        let we515 = builtin().get("orno-we-515").unwrap().clone();
        let reg = |a| select(&we515, &Select::Address(a)).unwrap().remove(0);
        let power = RegisterReading {
            register: reg(0x0140),
            words: vec![0xFFFF, 0xFB2E],
            value: decode(&reg(0x0140), &[0xFFFF, 0xFB2E]),
        };
        assert_eq!(power.value, Ok(-1234.0));
        let line = power.line(true);
        assert!(line.contains("power_w"), "{line}");
        assert!(line.contains("-1234 W"), "{line}");
        assert!(
            line.contains("FC03 i32, high-first word order, scale 1: 0xffff 0xfb2e"),
            "{line}"
        );
        let pf = decode(&reg(0x0158), &[0xFC9A]).unwrap();
        assert_eq!(round(pf, 0.001), "-0.870");
        let v = decode(&reg(0x0131), &[23145]).unwrap();
        assert_eq!(round(v, 0.01), "231.45");
        assert_eq!(round(230.5, 1.0), "230.5");
        assert_eq!(round(12_345_600.0, 10.0), "12345600");
    }
}
