//! The three wire protocols of docs/serial-protocols.md, as pure functions on one line.
//!
//! Numbers are parsed strictly: plain ASCII decimals only. Rust's `str::parse` would take
//! `+5`, `NaN`, `inf` and `infinity`; none of those is a reading, so the text is checked
//! before it is converted.

use std::fmt;

/// Why a line is garbled. Shown in the (rate-limited) WARN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} is not a decimal integer")]
    NotInteger(String),
    #[error("{0:?} is not a finite decimal number")]
    NotNumber(String),
    #[error("raw value {value} is outside 0..{max}")]
    OutOfAdcRange { value: u64, max: u32 },
    #[error("{got} values for {expected} channels")]
    WrongCount { got: usize, expected: usize },
    #[error("no `*` and checksum at the end")]
    NoChecksum,
    #[error("checksum {got:?} is not two uppercase hex digits")]
    BadChecksumText { got: String },
    #[error("checksum is {got:02X}, the line's bytes give {want:02X}")]
    ChecksumMismatch { got: u8, want: u8 },
    #[error("no `:` after the sequence number")]
    NoSeq,
    #[error("sequence number {0:?} is not 0..65535")]
    BadSeq(String),
    #[error("{0:?} is not a key=value pair")]
    NotPair(String),
    #[error("key {0:?} is not 1 to 64 of letters, digits, '.', '_' and '-'")]
    BadKey(String),
    #[error("key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("the line is empty")]
    Empty,
}

/// How the device answers, classified before protocol parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind<'a> {
    /// `# ...`: a sketch's banner or comment.
    Comment(&'a str),
    /// Nothing but whitespace (a bare `Serial.println()`).
    Blank,
    Data(&'a str),
}

pub fn classify(line: &str) -> LineKind<'_> {
    if let Some(rest) = line.strip_prefix('#') {
        LineKind::Comment(rest.trim())
    } else if line.trim().is_empty() {
        LineKind::Blank
    } else {
        LineKind::Data(line)
    }
}

/// A request-response channel's calibration (the original PowMon's formula).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub adc_vref_v: f64,
    pub adc_counts: u32,
    pub offset_v: f64,
    pub sensitivity_v_per_a: f64,
    pub supply_v: f64,
    pub max_amps: f64,
}

/// One converted PowMon value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowMonReading {
    pub adc_counts: u32,
    /// `raw × vpp − offset_v`: the sensor's output relative to its zero-current level.
    pub sensor_v: f64,
    pub current_a: f64,
    pub power_w: f64,
    /// `|current_a| > max_amps`: a saturated sensor, published as read.
    pub out_of_range: bool,
}

impl Calibration {
    pub fn convert(&self, raw: u32) -> PowMonReading {
        let vpp = self.adc_vref_v / f64::from(self.adc_counts);
        let sensor_v = f64::from(raw) * vpp - self.offset_v;
        let current_a = sensor_v / self.sensitivity_v_per_a;
        PowMonReading {
            adc_counts: raw,
            sensor_v,
            current_a,
            power_w: current_a * self.supply_v,
            out_of_range: current_a.abs() > self.max_amps,
        }
    }
}

/// Plain decimal digits, nothing else (no sign, no spaces).
fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_u64(s: &str) -> Option<u64> {
    if !digits(s) {
        return None;
    }
    s.parse().ok()
}

/// An integer with an optional leading `-`.
fn parse_i32(s: &str) -> Option<i32> {
    let body = s.strip_prefix('-').unwrap_or(s);
    if !digits(body) {
        return None;
    }
    s.parse().ok()
}

/// A finite decimal: `[+-]?(d+(.d*)?|.d+)([eE][+-]?d+)?`. Anything else (`nan`, `inf`,
/// `0x1A`, `4.5C`, `1e999`) is `None`.
pub fn parse_decimal(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut mantissa_digits = i - int_start;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        mantissa_digits += i - frac_start;
    }
    if mantissa_digits == 0 {
        return None;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A request-response answer: one raw ADC value per channel, `,`-separated.
pub fn parse_response(
    line: &str,
    channels: usize,
    adc_counts: &[u32],
) -> Result<Vec<u32>, ParseError> {
    let line = line.trim_matches(' ');
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    let parts: Vec<&str> = line.split(',').collect();
    if parts.len() != channels {
        return Err(ParseError::WrongCount {
            got: parts.len(),
            expected: channels,
        });
    }
    let mut out = Vec::with_capacity(channels);
    for (i, p) in parts.iter().enumerate() {
        let p = p.trim_matches(' ');
        let v = parse_u64(p).ok_or_else(|| ParseError::NotInteger(p.to_string()))?;
        let max = adc_counts.get(i).copied().unwrap_or(0);
        if v >= u64::from(max) {
            return Err(ParseError::OutOfAdcRange { value: v, max });
        }
        out.push(v as u32);
    }
    Ok(out)
}

/// One parsed stream line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLine {
    pub seq: u16,
    /// Interleaved by instant: with two channels `a0,b0,a1,b1,...`.
    pub values: Vec<i32>,
}

/// The XOR of every byte (NMEA style).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

/// `<seq>:<v>,<v>,...*<CS>` with `channels × k` values (k ≥ 1).
pub fn parse_stream(line: &str, channels: usize) -> Result<StreamLine, ParseError> {
    let (body, cs) = line.rsplit_once('*').ok_or(ParseError::NoChecksum)?;
    let cs_ok = cs.len() == 2
        && cs
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    if !cs_ok {
        return Err(ParseError::BadChecksumText {
            got: cs.to_string(),
        });
    }
    let got = u8::from_str_radix(cs, 16).map_err(|_| ParseError::BadChecksumText {
        got: cs.to_string(),
    })?;
    let want = checksum(body.as_bytes());
    if got != want {
        return Err(ParseError::ChecksumMismatch { got, want });
    }
    let (seq, values) = body.split_once(':').ok_or(ParseError::NoSeq)?;
    let seq = parse_u64(seq)
        .and_then(|v| u16::try_from(v).ok())
        .ok_or_else(|| ParseError::BadSeq(seq.to_string()))?;
    let values = values
        .split(',')
        .map(|v| parse_i32(v).ok_or_else(|| ParseError::NotInteger(v.to_string())))
        .collect::<Result<Vec<i32>, _>>()?;
    if channels == 0 || values.len() % channels != 0 {
        return Err(ParseError::WrongCount {
            got: values.len(),
            expected: channels,
        });
    }
    Ok(StreamLine { seq, values })
}

/// What a stream device's banner says about itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Banner {
    pub rate_hz: Option<f64>,
    pub channels: Option<usize>,
}

/// `wattbus-stream rate=<hz> channels=<n>` (a comment's text, after the `#`).
pub fn parse_banner(comment: &str) -> Option<Banner> {
    let mut words = comment.split_whitespace();
    if words.next() != Some("wattbus-stream") {
        return None;
    }
    let mut banner = Banner {
        rate_hz: None,
        channels: None,
    };
    for w in words {
        match w.split_once('=') {
            Some(("rate", v)) => banner.rate_hz = parse_decimal(v),
            Some(("channels", v)) => banner.channels = parse_u64(v).map(|n| n as usize),
            _ => {}
        }
    }
    Some(banner)
}

/// `key=value` pairs separated by spaces or commas. One bad pair garbles the whole line.
pub fn parse_pairs(line: &str) -> Result<Vec<(&str, f64)>, ParseError> {
    let mut out: Vec<(&str, f64)> = Vec::new();
    for token in line.split([' ', ',', '\t']).filter(|t| !t.is_empty()) {
        let (k, v) = token
            .split_once('=')
            .ok_or_else(|| ParseError::NotPair(token.to_string()))?;
        if !crate::config::is_line_key(k) {
            return Err(ParseError::BadKey(k.to_string()));
        }
        let v = parse_decimal(v).ok_or_else(|| ParseError::NotNumber(v.to_string()))?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ParseError::DuplicateKey(k.to_string()));
        }
        out.push((k, v));
    }
    if out.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(out)
}

/// A short, printable excerpt of a bad line for a log (never the whole 4 KiB).
pub struct Excerpt<'a>(pub &'a str);

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: String = self.0.chars().take(60).collect();
        if s.len() < self.0.len() {
            write!(f, "{s:?}…")
        } else {
            write!(f, "{s:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CALIBRATION;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-3
    }

    #[test]
    fn powmon_conversion_matches_the_worked_examples() {
        // docs/serial-protocols.md, "Worked examples".
        for (raw, volts, amps, watts, oor) in [
            (512, 0.0, 0.0, 0.0, false),
            (520, 0.0390625, 0.591856, 136.127, false),
            (600, 0.4296875, 6.510416, 1497.395, false),
            (700, 0.91796875, 13.908617, 3198.982, true),
            (400, -0.546875, -8.285984, -1905.776, false),
        ] {
            let r = DEFAULT_CALIBRATION.convert(raw);
            assert_eq!(r.sensor_v, volts, "volts of {raw}");
            assert!(close(r.current_a, amps), "amps of {raw}: {}", r.current_a);
            assert!(close(r.power_w, watts), "watts of {raw}: {}", r.power_w);
            assert_eq!(r.out_of_range, oor, "range of {raw}");
            assert_eq!(r.adc_counts, raw);
        }
    }

    #[test]
    fn a_saturated_reading_keeps_its_value() {
        let r = DEFAULT_CALIBRATION.convert(1023);
        assert!(r.out_of_range);
        assert!(
            r.current_a > 10.0,
            "never replaced by zero: {}",
            r.current_a
        );
    }

    #[test]
    fn responses_need_one_in_range_integer_per_channel() {
        let c = [1024, 1024, 1024];
        assert_eq!(
            parse_response("537,512,498", 3, &c),
            Ok(vec![537, 512, 498])
        );
        assert_eq!(parse_response("537", 1, &c), Ok(vec![537]));
        assert_eq!(parse_response("0", 1, &c), Ok(vec![0]));
        assert_eq!(parse_response("1023", 1, &c), Ok(vec![1023]));
        assert_eq!(
            parse_response("1024", 1, &c),
            Err(ParseError::OutOfAdcRange {
                value: 1024,
                max: 1024
            })
        );
        assert!(matches!(
            parse_response("537,512", 3, &c),
            Err(ParseError::WrongCount {
                got: 2,
                expected: 3
            })
        ));
        for bad in [
            "-1",
            "+5",
            "5.0",
            "0x1A",
            "nan",
            "537x",
            "",
            "5 3",
            "99999999999999999999999",
        ] {
            assert!(
                parse_response(bad, 1, &c).is_err(),
                "{bad:?} must be garbled"
            );
        }
    }

    fn with_cs(body: &str) -> String {
        format!("{body}*{:02X}", checksum(body.as_bytes()))
    }

    #[test]
    fn stream_lines_are_checked_and_interleaved() {
        let l = with_cs("1234:512,530,498,501");
        assert_eq!(
            parse_stream(&l, 2),
            Ok(StreamLine {
                seq: 1234,
                values: vec![512, 530, 498, 501]
            })
        );
        // Wrong checksum: one flipped value byte.
        let bad = l.replace("530", "531");
        assert!(matches!(
            parse_stream(&bad, 2),
            Err(ParseError::ChecksumMismatch { .. })
        ));
        // No checksum at all.
        assert_eq!(parse_stream("7:1", 1), Err(ParseError::NoChecksum));
        // A count that is not a multiple of the channels.
        assert!(matches!(
            parse_stream(&with_cs("8:1,2,3"), 2),
            Err(ParseError::WrongCount {
                got: 3,
                expected: 2
            })
        ));
        // Sequence numbers: 0..65535 only.
        assert_eq!(
            parse_stream(&with_cs("65535:1"), 1).map(|s| s.seq),
            Ok(65535)
        );
        assert!(matches!(
            parse_stream(&with_cs("65536:1"), 1),
            Err(ParseError::BadSeq(_))
        ));
        assert!(matches!(
            parse_stream(&with_cs("x:1"), 1),
            Err(ParseError::BadSeq(_))
        ));
        // Values: integers, nothing else, none missing.
        for body in ["9:1,,2", "9:1.5", "9:nan", "9:", "9:1,2 "] {
            assert!(parse_stream(&with_cs(body), 1).is_err(), "{body:?}");
        }
        assert_eq!(
            parse_stream(&with_cs("9:-3,4"), 1).map(|s| s.values),
            Ok(vec![-3, 4])
        );
    }

    #[test]
    fn lowercase_checksum_is_refused() {
        // Find a body whose checksum has a letter, so case matters.
        let body = "1:10";
        let cs = checksum(body.as_bytes());
        let text = format!("{body}*{cs:02x}");
        if text.bytes().rev().take(2).any(|b| b.is_ascii_lowercase()) {
            assert!(matches!(
                parse_stream(&text, 1),
                Err(ParseError::BadChecksumText { .. })
            ));
        } else {
            panic!("pick a body whose checksum has a hex letter: {text}");
        }
    }

    #[test]
    fn banners_are_recognised() {
        assert_eq!(
            parse_banner("wattbus-stream rate=2000 channels=2"),
            Some(Banner {
                rate_hz: Some(2000.0),
                channels: Some(2)
            })
        );
        assert_eq!(parse_banner("PowMon v1.2"), None);
        assert_eq!(
            classify("# wattbus-stream rate=1"),
            LineKind::Comment("wattbus-stream rate=1")
        );
        assert_eq!(classify("  "), LineKind::Blank);
    }

    #[test]
    fn pairs_separated_by_spaces_or_commas() {
        assert_eq!(
            parse_pairs("fridge=4.5 freezer=-18.25"),
            Ok(vec![("fridge", 4.5), ("freezer", -18.25)])
        );
        assert_eq!(
            parse_pairs("t1=21.0,h1=48"),
            Ok(vec![("t1", 21.0), ("h1", 48.0)])
        );
        assert_eq!(
            parse_pairs("a=1e3, b=.5"),
            Ok(vec![("a", 1000.0), ("b", 0.5)])
        );
    }

    #[test]
    fn nan_inf_hex_and_trailing_junk_garble_the_whole_line() {
        for bad in [
            "temp=nan",
            "temp=NaN",
            "temp=inf",
            "temp=-Infinity",
            "temp=INF",
            "temp=infinity",
            "temp=0x1A",
            "temp=4.5C",
            "temp=1e999",
            "temp=",
            "temp=1e",
            "temp=.",
            "temp=--1",
            "ok=1 temp=nan",
            "=4",
            "temp",
            "te mp=4",
            "t/1=4",
            "a=1 a=2",
            "",
        ] {
            assert!(parse_pairs(bad).is_err(), "{bad:?} must be garbled");
        }
        let long_key = format!("{}=1", "k".repeat(65));
        assert!(matches!(parse_pairs(&long_key), Err(ParseError::BadKey(_))));
    }

    #[test]
    fn strict_decimals() {
        assert_eq!(parse_decimal("-18.25"), Some(-18.25));
        assert_eq!(parse_decimal("+2"), Some(2.0));
        assert_eq!(parse_decimal("5."), Some(5.0));
        assert_eq!(parse_decimal("1E-3"), Some(0.001));
        for bad in [
            "nan", "NAN", "inf", "infinity", "Infinity", "-inf", " 1", "1 ", "1_000", "1,5",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn random_lines_never_panic_and_never_yield_non_finite_values() {
        let mut rng = fastrand::Rng::with_seed(42);
        let alphabet = b"0123456789,:*=.-+eEnaifINFxA \t#";
        for _ in 0..20_000 {
            let n = rng.usize(0..40);
            let s: String = (0..n)
                .map(|_| char::from(alphabet[rng.usize(..alphabet.len())]))
                .collect();
            if let Ok(pairs) = parse_pairs(&s) {
                assert!(pairs.iter().all(|(_, v)| v.is_finite()), "{s:?}");
            }
            if let Ok(v) = parse_response(&s, 1, &[1024]) {
                assert!(v[0] < 1024, "{s:?}");
            }
            if let Ok(l) = parse_stream(&s, 2) {
                assert!(!l.values.is_empty() && l.values.len() % 2 == 0, "{s:?}");
            }
        }
    }
}
