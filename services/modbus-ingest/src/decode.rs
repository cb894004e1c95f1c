//! Register words to numbers.
//!
//! A value is assembled from its words in the profile's word order (bytes inside a word are
//! big-endian, as Modbus requires), interpreted as its type — signed types as two's
//! complement, so the WE-515's export power reads as negative, not as 4 294 966 062 W — and
//! multiplied by the scale.
//!
//! The multiplication is decimal: a register holds an integer and a profile a decimal scale
//! (0.01 V), and 0.01 has no exact binary form, so `23145.0 * 0.01` is 231.45000000000002 —
//! which was published and stored as such. Both factors are taken in their shortest decimal
//! form, multiplied exactly, and the product rounded once to the nearest `f64`: a value with N
//! decimals in the device is published with those N decimals. An `f32` register is taken as
//! the shortest decimal its `f32` stands for (what the meter's display shows: 230.1, not the
//! widened 230.10000610351562).
//!
//! A NaN or infinity is not a reading: meters report NaN for "no value" (an unconnected phase,
//! a counter being reset) and JSON cannot carry either. Decoding returns an error for it so the
//! service publishes the field with `quality = error` rather than a fake number.
//!
//! `u64` values above 2^53 lose precision in the f64 result; an energy counter in Wh reaches
//! that after 9 × 10^15 Wh, so this is documented rather than handled.

use crate::plan::Request;
use crate::profile::{Register, ValueType, WordOrder};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("a {value_type} needs {expected} registers, got {got}")]
    Length {
        value_type: ValueType,
        expected: u16,
        got: usize,
    },
    #[error("the meter reported {0}, an error marker rather than a reading")]
    NotFinite(f64),
    #[error("the response holds {got} registers, the request asked for {expected}")]
    Response { expected: u16, got: usize },
}

/// Decodes one register's words to its scaled value.
pub fn decode(register: &Register, words: &[u16]) -> Result<f64, ValueError> {
    let raw = decode_raw(register.value_type, register.word_order, words)?;
    let digits = if register.value_type == ValueType::F32 {
        // Exact: the value was widened from this f32.
        Decimal::of_f32(raw as f32)
    } else {
        Decimal::of(raw)
    };
    // Both are finite here, so the decimal product always exists; the float product is only
    // a fallback that cannot be reached.
    let value = digits
        .zip(Decimal::of(register.scale))
        .and_then(|(raw, scale)| raw.times(scale))
        .unwrap_or(raw * register.scale);
    // A finite raw value times a huge scale can still overflow.
    if value.is_finite() {
        Ok(value)
    } else {
        Err(ValueError::NotFinite(value))
    }
}

/// Decodes the words of one value without scaling.
pub fn decode_raw(
    value_type: ValueType,
    word_order: WordOrder,
    words: &[u16],
) -> Result<f64, ValueError> {
    let expected = value_type.words();
    if words.len() != usize::from(expected) {
        return Err(ValueError::Length {
            value_type,
            expected,
            got: words.len(),
        });
    }
    // Fold the words high word first into one integer of the value's width.
    let bits = match word_order {
        WordOrder::Big => words
            .iter()
            .fold(0u64, |acc, &w| (acc << 16) | u64::from(w)),
        WordOrder::Little => words
            .iter()
            .rev()
            .fold(0u64, |acc, &w| (acc << 16) | u64::from(w)),
    };
    // The `as` casts below reinterpret bits of exactly the value's width (checked above).
    let value = match value_type {
        ValueType::U16 => bits as u16 as f64,
        ValueType::I16 => bits as u16 as i16 as f64,
        ValueType::U32 => bits as u32 as f64,
        ValueType::I32 => bits as u32 as i32 as f64,
        ValueType::U64 => bits as f64,
        ValueType::F32 => f64::from(f32::from_bits(bits as u32)),
        ValueType::F64 => f64::from_bits(bits),
    };
    if value.is_finite() {
        Ok(value)
    } else {
        Err(ValueError::NotFinite(value))
    }
}

/// A finite number as `mantissa × 10^exponent`, from its shortest round-trip form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    exponent: i32,
}

impl Decimal {
    fn of(v: f64) -> Option<Self> {
        Self::parse(&format!("{v:e}"))
    }

    fn of_f32(v: f32) -> Option<Self> {
        Self::parse(&format!("{v:e}"))
    }

    /// Parses Rust's `{:e}` form (`-2.3145e4`, `1e-2`): at most 17 significant digits, so a
    /// product of two mantissas fits an `i128`. `None` for anything else (a non-finite value).
    fn parse(text: &str) -> Option<Self> {
        let (digits, exponent) = text.split_once('e')?;
        let fraction = digits.split_once('.').map_or(0, |(_, f)| f.len());
        let mantissa: i128 = digits.replace('.', "").parse().ok()?;
        let exponent: i32 = exponent.parse().ok()?;
        Some(Self {
            mantissa,
            exponent: exponent.checked_sub(i32::try_from(fraction).ok()?)?,
        })
    }

    /// The exact product, rounded once to the nearest `f64` (infinite if it is beyond one).
    fn times(self, other: Self) -> Option<f64> {
        let mantissa = self.mantissa.checked_mul(other.mantissa)?;
        let exponent = self.exponent.checked_add(other.exponent)?;
        format!("{mantissa}e{exponent}").parse().ok()
    }
}

/// One register's outcome in a response: its index in the profile's register list and its
/// value or why there is none.
pub type Decoded = (usize, Result<f64, ValueError>);

/// Decodes every register a request carries from its response: `(index, value)` pairs, the
/// index into the same `registers` slice given to [`crate::plan::plan`]. One bad value does not
/// spoil the others; a response of the wrong length spoils all of them.
pub fn decode_response(
    registers: &[Register],
    request: &Request,
    response: &[u16],
) -> Result<Vec<Decoded>, ValueError> {
    if response.len() != usize::from(request.count) {
        return Err(ValueError::Response {
            expected: request.count,
            got: response.len(),
        });
    }
    let mut out = Vec::with_capacity(request.registers.len());
    for &index in &request.registers {
        let Some(register) = registers.get(index) else {
            continue;
        };
        let value = match request.words_of(register, response) {
            Some(words) => decode(register, words),
            None => Err(ValueError::Length {
                value_type: register.value_type,
                expected: register.words(),
                got: 0,
            }),
        };
        out.push((index, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use WordOrder::{Big, Little};

    fn raw(t: ValueType, o: WordOrder, words: &[u16]) -> f64 {
        decode_raw(t, o, words).unwrap()
    }

    #[test]
    fn sixteen_bit_types() {
        assert_eq!(raw(ValueType::U16, Big, &[0xFFFF]), 65535.0);
        assert_eq!(raw(ValueType::I16, Big, &[0xFFFF]), -1.0);
        assert_eq!(raw(ValueType::I16, Big, &[0x8000]), -32768.0);
        assert_eq!(raw(ValueType::I16, Big, &[0x7FFF]), 32767.0);
        // A single word has no word order.
        assert_eq!(raw(ValueType::I16, Little, &[0xFC18]), -1000.0);
    }

    #[test]
    fn thirty_two_bit_integers_in_both_word_orders() {
        assert_eq!(raw(ValueType::U32, Big, &[0x0001, 0x0002]), 65538.0);
        assert_eq!(raw(ValueType::U32, Little, &[0x0002, 0x0001]), 65538.0);
        assert_eq!(raw(ValueType::U32, Big, &[0xFFFF, 0xFFFF]), 4_294_967_295.0);
        // -1234 = 0xFFFF_FB2E
        assert_eq!(raw(ValueType::I32, Big, &[0xFFFF, 0xFB2E]), -1234.0);
        assert_eq!(raw(ValueType::I32, Little, &[0xFB2E, 0xFFFF]), -1234.0);
        assert_eq!(
            raw(ValueType::I32, Big, &[0x8000, 0x0000]),
            -2_147_483_648.0
        );
    }

    #[test]
    fn sixty_four_bit_integer_in_both_word_orders() {
        let words = [0x0000, 0x0001, 0x0002, 0x0003];
        let expected = (1u64 << 32 | 2 << 16 | 3) as f64;
        assert_eq!(raw(ValueType::U64, Big, &words), expected);
        let swapped = [0x0003, 0x0002, 0x0001, 0x0000];
        assert_eq!(raw(ValueType::U64, Little, &swapped), expected);
    }

    #[test]
    fn floats_in_both_word_orders() {
        // 230.5 as f32 = 0x4366_8000
        assert_eq!(raw(ValueType::F32, Big, &[0x4366, 0x8000]), 230.5);
        assert_eq!(raw(ValueType::F32, Little, &[0x8000, 0x4366]), 230.5);
        // -1234.5 as f32 = 0xC49A_5000
        assert_eq!(raw(ValueType::F32, Big, &[0xC49A, 0x5000]), -1234.5);
        // 50.01 as f64 = 0x4049_0147_AE14_7AE1
        let w = [0x4049, 0x0147, 0xAE14, 0x7AE1];
        assert_eq!(raw(ValueType::F64, Big, &w), 50.01);
        let r = [0x7AE1, 0xAE14, 0x0147, 0x4049];
        assert_eq!(raw(ValueType::F64, Little, &r), 50.01);
    }

    #[test]
    fn nan_and_infinity_are_errors_not_readings() {
        // Quiet NaN 0x7FC0_0000, +inf 0x7F80_0000, -inf 0xFF80_0000.
        assert!(matches!(
            decode_raw(ValueType::F32, Big, &[0x7FC0, 0x0000]),
            Err(ValueError::NotFinite(v)) if v.is_nan()
        ));
        assert_eq!(
            decode_raw(ValueType::F32, Big, &[0x7F80, 0x0000]),
            Err(ValueError::NotFinite(f64::INFINITY))
        );
        assert_eq!(
            decode_raw(ValueType::F32, Big, &[0xFF80, 0x0000]),
            Err(ValueError::NotFinite(f64::NEG_INFINITY))
        );
        assert!(matches!(
            decode_raw(ValueType::F64, Big, &[0x7FF8, 0, 0, 0]),
            Err(ValueError::NotFinite(v)) if v.is_nan()
        ));
    }

    #[test]
    fn a_response_is_split_per_register_and_one_bad_value_spoils_only_itself() {
        use crate::plan::{Limits, plan};
        use crate::profile::{Function, Register};
        let reg = |address, value_type, field: &str| Register {
            address,
            function: Function::Holding,
            value_type,
            word_order: Big,
            scale: 0.5,
            unit: String::new(),
            measurement: proto::Segment::new("m").unwrap(),
            channel: proto::Segment::new("c").unwrap(),
            field: field.to_string(),
            tags: Default::default(),
            poll: "fast".to_string(),
        };
        let regs = [
            reg(0x10, ValueType::I16, "a"),
            reg(0x12, ValueType::F32, "b"),
            reg(0x14, ValueType::U16, "c"),
        ];
        let requests = plan(&regs, |_| true, Limits::default()).unwrap();
        assert_eq!(requests.len(), 1);
        // 0x10 = -4, 0x11 hole, 0x12..0x13 NaN, 0x14 = 10.
        let response = [0xFFFC, 0xDEAD, 0x7FC0, 0x0000, 10];
        let out = decode_response(&regs, &requests[0], &response).unwrap();
        assert_eq!(out[0], (0, Ok(-2.0)));
        assert!(matches!(out[1], (1, Err(ValueError::NotFinite(_)))));
        assert_eq!(out[2], (2, Ok(5.0)));
        assert_eq!(
            decode_response(&regs, &requests[0], &response[..4]),
            Err(ValueError::Response {
                expected: 5,
                got: 4
            })
        );
    }

    fn register(value_type: ValueType, scale: f64) -> Register {
        Register {
            address: 0x0131,
            function: crate::profile::Function::Holding,
            value_type,
            word_order: Big,
            scale,
            unit: String::new(),
            measurement: proto::Segment::new("power").unwrap(),
            channel: proto::Segment::new("l1").unwrap(),
            field: "voltage_v".to_string(),
            tags: Default::default(),
            poll: "fast".to_string(),
        }
    }

    #[test]
    fn a_decimal_scale_keeps_the_devices_decimals() {
        // 23145 × 0.01 as floats is 231.45000000000002; the meter means 231.45.
        assert_ne!(23145.0 * 0.01, 231.45);
        let volts = register(ValueType::U16, 0.01);
        assert_eq!(decode(&volts, &[23145]), Ok(231.45));
        assert_eq!(decode(&volts, &[23145]).unwrap().to_string(), "231.45");
        // Every 0.01 V step of the WE-515's range, and the other scales of the profiles.
        for raw in 0..=u16::MAX {
            let text = format!("{}.{:02}", raw / 100, raw % 100);
            assert_eq!(decode(&volts, &[raw]), Ok(text.parse().unwrap()), "{raw}");
        }
        let amps = register(ValueType::U32, 0.001);
        assert_eq!(decode(&amps, &[0, 5123]).unwrap().to_string(), "5.123");
        let pf = register(ValueType::I16, 0.001);
        assert_eq!(decode(&pf, &[0xFC9A]).unwrap().to_string(), "-0.87");
        let wh = register(ValueType::U32, 10.0);
        assert_eq!(decode(&wh, &[0x0001, 0x0002]), Ok(655_380.0));
    }

    #[test]
    fn an_f32_register_is_the_decimal_the_meter_shows() {
        // 230.1 as f32 (0x4366_199A) widens to 230.10000610351562.
        let volts = register(ValueType::F32, 1.0);
        assert_eq!(
            decode(&volts, &[0x4366, 0x199A]).unwrap().to_string(),
            "230.1"
        );
        // kWh to Wh: 1234.567 kWh is 1234567 Wh, not 1234567.0000000002.
        let kwh = 1234.567f32.to_bits();
        let wh = register(ValueType::F32, 1000.0);
        assert_eq!(
            decode(&wh, &[(kwh >> 16) as u16, kwh as u16]),
            Ok(1_234_567.0)
        );
    }

    #[test]
    fn wrong_word_count_is_an_error() {
        assert_eq!(
            decode_raw(ValueType::U32, Big, &[1]),
            Err(ValueError::Length {
                value_type: ValueType::U32,
                expected: 2,
                got: 1
            })
        );
        assert!(decode_raw(ValueType::U16, Big, &[1, 2]).is_err());
    }
}
