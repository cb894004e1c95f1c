//! InfluxDB line protocol, encoded by hand (no I/O, no async: unit-tested and benchmarked on
//! its own).
//!
//! `measurement,tag=value,tag2=value2 field=1.5,field2="text" 1764000000123`
//!
//! Escaping (InfluxDB's reference): in a measurement name, `,` and space; in tag keys, tag
//! values and field keys, `,`, `=` and space; in string field values, `"` and `\`. A backslash
//! elsewhere is written as is. Newlines are not allowed anywhere, NaN and ±∞ are not numbers
//! InfluxDB accepts, and an empty tag value is invalid (the tag is left out instead).
//!
//! A bad point is an error *for that point*: [`encode_batch`] writes every good point and
//! reports the bad ones by index, so one bad reading never costs a whole batch.
//!
//! Writes are idempotent: the same measurement, tag set, field and timestamp overwrite. That
//! is what makes the delivery contract's replays harmless, so a point's identity must come only
//! from the reading (never from the time it is written).

use std::fmt::Write as _;

use proto::Measurement;

/// Timestamp unit of a write. Chosen to match the data: readings carry `ts_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Precision {
    #[serde(rename = "ns")]
    Ns,
    #[serde(rename = "us")]
    Us,
    #[serde(rename = "ms")]
    Ms,
    #[serde(rename = "s")]
    S,
}

impl Precision {
    /// The `precision` query parameter of `/api/v2/write`.
    pub const fn v2_param(self) -> &'static str {
        match self {
            Precision::Ns => "ns",
            Precision::Us => "us",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }

    /// The `precision` query parameter of the v1 `/write` (`n`, `u`, `ms`, `s`).
    pub const fn v1_param(self) -> &'static str {
        match self {
            Precision::Ns => "n",
            Precision::Us => "u",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }

    /// A Unix-ms timestamp in this unit, or `None` if it does not fit (ns beyond 2262).
    pub fn from_ms(self, ts_ms: i64) -> Option<i64> {
        match self {
            Precision::Ns => ts_ms.checked_mul(1_000_000),
            Precision::Us => ts_ms.checked_mul(1_000),
            Precision::Ms => Some(ts_ms),
            Precision::S => Some(ts_ms.div_euclid(1000)),
        }
    }
}

/// A field value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    Int(i64),
    /// Only InfluxDB 2.x/3.x accept `u` integers; 1.x does not.
    UInt(u64),
    Bool(bool),
    Str(&'a str),
}

/// One point to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Point<'a> {
    pub measurement: &'a str,
    /// Written in the order given; [`measurement_point`] sorts them by key, as InfluxDB
    /// recommends for speed.
    pub tags: Vec<(&'a str, &'a str)>,
    pub fields: Vec<(&'a str, FieldValue<'a>)>,
    /// In the batch's precision.
    pub timestamp: i64,
}

/// Why a point cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("the measurement name is empty")]
    EmptyMeasurement,
    #[error("a point needs at least one field")]
    NoFields,
    #[error("{what} {name:?} contains a newline, which line protocol cannot carry")]
    Newline { what: &'static str, name: String },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("field {0:?} is not a finite number (NaN and infinity cannot be stored)")]
    NotFinite(String),
    #[error("timestamp {0} ms cannot be written at this precision")]
    TimestampRange(i64),
}

fn check(what: &'static str, s: &str) -> Result<(), LineError> {
    if s.is_empty() {
        return Err(LineError::Empty { what });
    }
    if s.contains(['\n', '\r']) {
        return Err(LineError::Newline {
            what,
            name: s.to_string(),
        });
    }
    Ok(())
}

fn escape(out: &mut String, s: &str, special: &[char]) {
    for c in s.chars() {
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Append one point as a line (with its trailing newline) to `out`. On error `out` is left
/// exactly as it was.
pub fn encode_point(out: &mut String, p: &Point<'_>) -> Result<(), LineError> {
    if p.measurement.is_empty() {
        return Err(LineError::EmptyMeasurement);
    }
    check("measurement", p.measurement)?;
    if p.fields.is_empty() {
        return Err(LineError::NoFields);
    }
    for (k, v) in &p.tags {
        check("tag key", k)?;
        // An empty tag value is invalid line protocol; such a tag is simply not written.
        if v.contains(['\n', '\r']) {
            return Err(LineError::Newline {
                what: "tag value",
                name: (*v).to_string(),
            });
        }
    }
    for (k, v) in &p.fields {
        check("field key", k)?;
        match v {
            FieldValue::Float(f) if !f.is_finite() => {
                return Err(LineError::NotFinite((*k).to_string()));
            }
            FieldValue::Str(s) if s.contains(['\n', '\r']) => {
                return Err(LineError::Newline {
                    what: "string field",
                    name: (*k).to_string(),
                });
            }
            _ => {}
        }
    }
    escape(out, p.measurement, &[',', ' ']);
    for (k, v) in p.tags.iter().filter(|(_, v)| !v.is_empty()) {
        out.push(',');
        escape(out, k, &[',', '=', ' ']);
        out.push('=');
        escape(out, v, &[',', '=', ' ']);
    }
    for (i, (k, v)) in p.fields.iter().enumerate() {
        out.push(if i == 0 { ' ' } else { ',' });
        escape(out, k, &[',', '=', ' ']);
        out.push('=');
        // Writing to a String cannot fail.
        let _ = match v {
            // `{:?}` keeps a decimal point or exponent, so 2.0 stays a float ("2.0"), never an
            // integer that would clash with the field's type.
            FieldValue::Float(f) => write!(out, "{f:?}"),
            FieldValue::Int(n) => write!(out, "{n}i"),
            FieldValue::UInt(n) => write!(out, "{n}u"),
            FieldValue::Bool(b) => write!(out, "{b}"),
            FieldValue::Str(s) => {
                out.push('"');
                escape(out, s, &['"', '\\']);
                out.push('"');
                Ok(())
            }
        };
    }
    let _ = writeln!(out, " {}", p.timestamp);
    Ok(())
}

/// Encode every point that can be encoded; return the body and the bad points by index.
pub fn encode_batch<'p>(
    points: impl IntoIterator<Item = &'p Point<'p>>,
) -> (String, Vec<(usize, LineError)>) {
    let mut out = String::new();
    let mut bad = Vec::new();
    for (i, p) in points.into_iter().enumerate() {
        if let Err(e) = encode_point(&mut out, p) {
            bad.push((i, e));
        }
    }
    (out, bad)
}

/// The point of a [`Measurement`]: measurement name; tags `site`, `device`, `channel`,
/// `quality` and the measurement's own tags, sorted by key; its fields; its read time.
///
/// `quality` is a tag, so a dashboard can filter out `out_of_range` readings, and it is part of
/// the series identity: a replayed reading has the same quality, so it overwrites itself.
pub fn measurement_point(m: &Measurement, precision: Precision) -> Result<Point<'_>, LineError> {
    let mut tags: Vec<(&str, &str)> = vec![
        ("site", m.site.as_str()),
        ("device", m.device.as_str()),
        ("channel", m.channel.as_str()),
        ("quality", m.quality.as_str()),
    ];
    tags.extend(m.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    tags.sort_by(|a, b| a.0.cmp(b.0));
    tags.dedup_by(|a, b| a.0 == b.0);
    let fields = m
        .fields
        .iter()
        .map(|(k, v)| (k.as_str(), FieldValue::Float(*v)))
        .collect();
    let timestamp = precision
        .from_ms(m.ts_ms)
        .ok_or(LineError::TimestampRange(m.ts_ms))?;
    Ok(Point {
        measurement: m.measurement.as_str(),
        tags,
        fields,
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Quality, Segment};

    fn line(p: &Point<'_>) -> String {
        let mut s = String::new();
        encode_point(&mut s, p).unwrap();
        s
    }

    fn point<'a>(
        tags: Vec<(&'a str, &'a str)>,
        fields: Vec<(&'a str, FieldValue<'a>)>,
    ) -> Point<'a> {
        Point {
            measurement: "power",
            tags,
            fields,
            timestamp: 1_764_000_000_123,
        }
    }

    #[test]
    fn a_plain_point_reads_like_the_reference() {
        let p = point(
            vec![("device", "we515"), ("site", "home")],
            vec![
                ("power_w", FieldValue::Float(-1234.5)),
                ("count", FieldValue::Int(3)),
            ],
        );
        assert_eq!(
            line(&p),
            "power,device=we515,site=home power_w=-1234.5,count=3i 1764000000123\n"
        );
    }

    #[test]
    fn every_kind_of_field_value() {
        let p = point(
            vec![],
            vec![
                ("f", FieldValue::Float(2.0)),
                ("tiny", FieldValue::Float(1e-7)),
                ("i", FieldValue::Int(-42)),
                ("u", FieldValue::UInt(42)),
                ("b", FieldValue::Bool(true)),
                ("s", FieldValue::Str("ok")),
            ],
        );
        assert_eq!(
            line(&p),
            "power f=2.0,tiny=1e-7,i=-42i,u=42u,b=true,s=\"ok\" 1764000000123\n"
        );
    }

    #[test]
    fn escaping_follows_the_spec_for_each_position() {
        let p = Point {
            measurement: "my power,total",
            tags: vec![("room name", "living room, east=1"), ("uni", "Küche ☕")],
            fields: vec![("a b,c=d", FieldValue::Str(r#"say "hi" \ bye, a=b"#))],
            timestamp: 1,
        };
        assert_eq!(
            line(&p),
            "my\\ power\\,total,room\\ name=living\\ room\\,\\ east\\=1,uni=Küche\\ ☕ a\\ b\\,c\\=d=\"say \\\"hi\\\" \\\\ bye, a=b\" 1\n"
        );
        // `=` needs no escape in a measurement name, `,`/`=`/space none in a string value.
        let p = Point {
            measurement: "a=b",
            tags: vec![],
            fields: vec![("f", FieldValue::Str("x y,z=w"))],
            timestamp: 1,
        };
        assert_eq!(line(&p), "a=b f=\"x y,z=w\" 1\n");
    }

    #[test]
    fn bad_points_are_refused_one_by_one_and_leave_the_batch_intact() {
        let good = point(
            vec![("site", "home")],
            vec![("power_w", FieldValue::Float(1.0))],
        );
        let nan = point(vec![], vec![("power_w", FieldValue::Float(f64::NAN))]);
        let inf = point(
            vec![],
            vec![("power_w", FieldValue::Float(f64::NEG_INFINITY))],
        );
        let newline_tag = point(
            vec![("site", "ho\nme")],
            vec![("power_w", FieldValue::Float(1.0))],
        );
        let newline_str = point(vec![], vec![("note", FieldValue::Str("a\r\nb"))]);
        let no_fields = point(vec![("site", "home")], vec![]);
        let empty_key = point(vec![("", "x")], vec![("power_w", FieldValue::Float(1.0))]);
        let points = [
            good.clone(),
            nan,
            inf,
            newline_tag,
            newline_str,
            no_fields,
            empty_key,
            good,
        ];
        let (body, bad) = encode_batch(&points);
        assert_eq!(body.lines().count(), 2, "{body}");
        assert!(
            body.lines()
                .all(|l| l == "power,site=home power_w=1.0 1764000000123")
        );
        let idx: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(bad[0].1, LineError::NotFinite("power_w".into()));
        assert!(bad[2].1.to_string().contains("newline"));
        assert_eq!(bad[4].1, LineError::NoFields);
    }

    #[test]
    fn empty_tag_values_are_left_out() {
        let p = point(
            vec![("site", "home"), ("phase", "")],
            vec![("power_w", FieldValue::Float(1.5))],
        );
        assert_eq!(line(&p), "power,site=home power_w=1.5 1764000000123\n");
    }

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    #[test]
    fn a_measurement_maps_to_a_point_with_sorted_identity_tags_and_its_read_time() {
        let m = Measurement {
            origin: None,
            site: seg("home"),
            device: seg("we515-1"),
            channel: seg("main"),
            measurement: seg("power"),
            ts_ms: 1_764_000_000_123,
            quality: Quality::OutOfRange,
            fields: [
                ("power_w".to_string(), 12.5),
                ("voltage_v".to_string(), 230.0),
            ]
            .into(),
            tags: [(seg("tariff"), seg("t1")), (seg("a-first"), seg("x"))].into(),
        };
        let p = measurement_point(&m, Precision::Ms).unwrap();
        assert_eq!(
            line(&p),
            "power,a-first=x,channel=main,device=we515-1,quality=out_of_range,site=home,tariff=t1 power_w=12.5,voltage_v=230.0 1764000000123\n"
        );
        assert_eq!(
            measurement_point(&m, Precision::S).unwrap().timestamp,
            1_764_000_000
        );
        assert_eq!(
            measurement_point(&m, Precision::Ns).unwrap().timestamp,
            1_764_000_000_123_000_000
        );
    }

    #[test]
    fn precision_parameters_differ_between_v1_and_v2() {
        assert_eq!(
            (Precision::Ns.v1_param(), Precision::Ns.v2_param()),
            ("n", "ns")
        );
        assert_eq!(
            (Precision::Us.v1_param(), Precision::Us.v2_param()),
            ("u", "us")
        );
        assert_eq!(Precision::Ns.from_ms(i64::MAX / 10), None);
        assert_eq!(Precision::S.from_ms(-1), Some(-1));
    }
}
