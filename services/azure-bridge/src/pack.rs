//! Readings packed into IoT Hub messages (pure: no clock, no I/O).
//!
//! The hub bills device-to-cloud messages in 4 KB units, so one reading per message (the
//! Prime seed's way, ~200 bytes of JSON) pays for a whole unit each. A packed message holds
//! the readings of one site in series: what identifies a reading (device, channel,
//! measurement, quality, tags and field names) once per series, then one row of numbers per
//! reading. docs/azure-bridge.md documents the shape, for consumers that read it without
//! wattbus (its JSON Schema is `proto/schemas/azure_message.json`):
//!
//! ```json
//! {"v":1,"id":"3f9c0b2a11d04e7a-42","site":"home","t0":1764000000000,"series":[
//!   {"device":"we515-1","channel":"main","measurement":"power","quality":"good",
//!    "fields":["current_a","power_w","voltage_v"],
//!    "rows":[[123,5.34,-1234.5,231.2],[1123,5.33,-1230.1,231.0]]}]}
//! ```
//!
//! A row is `[ms after t0, value of each field in "fields" order]`; `tags` appears in a
//! series only when the readings have tags. `id` is unique per message and stays the same
//! when the message is sent again, so a consumer can drop a repeat; within a site a reading is
//! also identified by (device, channel, measurement, tags, time).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proto::{Measurement, Quality, Segment};

use crate::seen::Seen;

/// The body's format version (`"v"`).
pub const VERSION: u32 = 1;

/// Room left in a body for its id, whatever the sequence number grows to.
const ID_ROOM: usize = "\"id\":\"0123456789abcdef-18446744073709551615\",".len();

/// What makes readings one series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    device: Segment,
    channel: Segment,
    measurement: Segment,
    /// As written (`Quality` has no order of its own).
    quality: &'static str,
    tags: BTreeMap<Segment, Segment>,
    fields: Vec<String>,
}

#[derive(Debug)]
struct Series {
    /// `{"device":…,"rows":[` as it will be written.
    head: String,
    rows: Vec<String>,
}

impl Series {
    fn len(&self) -> usize {
        // head, rows joined by commas, `]}`
        self.head.len()
            + self.rows.iter().map(String::len).sum::<usize>()
            + self.rows.len().saturating_sub(1)
            + 2
    }
}

/// One message being filled.
#[derive(Debug)]
pub struct Packer {
    site: Segment,
    max_bytes: usize,
    t0: Option<i64>,
    oldest_ms: i64,
    newest_ms: i64,
    series: BTreeMap<SeriesKey, Series>,
    readings: usize,
    /// The body's length without its id (see [`Packer::len`]).
    len: usize,
    /// Where its readings came from (producer, stream, seq), for the outbox's metadata.
    origins: Seen,
}

/// Why a reading was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The message is full: take it and push the reading into a new one.
    Full,
    /// The reading alone is larger than a message may be.
    TooLarge(usize),
    /// Not of this packer's site.
    OtherSite,
}

/// A packed message, ready for the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub body: Vec<u8>,
    pub readings: usize,
    pub origins: Seen,
    /// Read times of its oldest and newest reading (Unix ms).
    pub oldest_ms: i64,
    pub newest_ms: i64,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A finite f64 as JSON (readings have no NaN or infinity: proto refuses them).
fn json_num(v: f64) -> String {
    serde_json::to_string(&v).unwrap_or_else(|_| "null".into())
}

impl Packer {
    pub fn new(site: Segment, max_bytes: usize) -> Self {
        let mut p = Self {
            site,
            max_bytes,
            t0: None,
            oldest_ms: 0,
            newest_ms: 0,
            series: BTreeMap::new(),
            readings: 0,
            len: 0,
            origins: Seen::default(),
        };
        p.len = p.frame_len();
        p
    }

    pub fn is_empty(&self) -> bool {
        self.readings == 0
    }

    /// Whether this message already holds the reading from this origin.
    pub fn holds(&self, o: &proto::Origin) -> bool {
        self.origins.contains(o)
    }

    /// Note the origin of a reading the bridge settled without packing (filtered out), so
    /// the message's origins stay whole ranges rather than one range per packed reading.
    pub fn note(&mut self, o: &proto::Origin, ts_ms: i64) {
        self.origins.insert(o, ts_ms);
    }

    /// An empty packer for the same site and bound.
    pub fn empty_like(&self) -> Self {
        Self::new(self.site.clone(), self.max_bytes)
    }

    pub fn readings(&self) -> usize {
        self.readings
    }

    /// The body's length as it stands, with room for any id.
    pub fn len(&self) -> usize {
        self.len + ID_ROOM
    }

    /// `{"v":1,"site":…,"t0":…,"series":[` … `]}` without id and series.
    fn frame_len(&self) -> usize {
        let t0 = self.t0.map_or(1, |t| t.to_string().len());
        format!(
            "{{\"v\":{VERSION},\"site\":{},\"t0\":",
            json_str(self.site.as_str())
        )
        .len()
            + t0
            + ",\"series\":[".len()
            + "]}".len()
    }

    fn total_len(&self) -> usize {
        let series: usize = self.series.values().map(Series::len).sum();
        self.frame_len() + series + self.series.len().saturating_sub(1)
    }

    /// Add a reading, or say why not. A refused reading leaves the message as it was.
    pub fn push(&mut self, m: &Measurement) -> Result<(), Refused> {
        if m.site != self.site {
            return Err(Refused::OtherSite);
        }
        let t0 = self.t0.unwrap_or(m.ts_ms);
        let key = SeriesKey {
            device: m.device.clone(),
            channel: m.channel.clone(),
            measurement: m.measurement.clone(),
            quality: m.quality.as_str(),
            tags: m.tags.clone(),
            fields: m.fields.keys().cloned().collect(),
        };
        let mut row = String::with_capacity(16 * (m.fields.len() + 1));
        row.push('[');
        let _ = write!(row, "{}", m.ts_ms.saturating_sub(t0));
        for v in m.fields.values() {
            row.push(',');
            row.push_str(&json_num(*v));
        }
        row.push(']');
        let (added, head) = match self.series.get(&key) {
            Some(_) => (row.len() + 1, None),
            None => {
                let head = series_head(&key);
                let comma = usize::from(!self.series.is_empty());
                (head.len() + row.len() + 2 + comma, Some(head))
            }
        };
        let frame_growth = if self.t0.is_none() {
            m.ts_ms.to_string().len().saturating_sub(1)
        } else {
            0
        };
        let new_len = self.len + added + frame_growth;
        if new_len + ID_ROOM > self.max_bytes {
            return Err(if self.is_empty() {
                Refused::TooLarge(new_len + ID_ROOM)
            } else {
                Refused::Full
            });
        }
        if self.t0.is_none() {
            self.t0 = Some(m.ts_ms);
            self.oldest_ms = m.ts_ms;
            self.newest_ms = m.ts_ms;
        }
        self.oldest_ms = self.oldest_ms.min(m.ts_ms);
        self.newest_ms = self.newest_ms.max(m.ts_ms);
        match head {
            Some(head) => {
                self.series.insert(
                    key,
                    Series {
                        head,
                        rows: vec![row],
                    },
                );
            }
            None => {
                if let Some(s) = self.series.get_mut(&key) {
                    s.rows.push(row);
                }
            }
        }
        self.readings += 1;
        self.len = new_len;
        if let Some(o) = &m.origin {
            self.origins.insert(o, m.ts_ms);
        }
        debug_assert_eq!(self.len, self.total_len());
        Ok(())
    }

    /// The message, with id `id`, and an empty packer for the next.
    pub fn take(&mut self, id: &str) -> Packed {
        let mut body = String::with_capacity(self.len + id.len() + 8);
        let _ = write!(
            body,
            "{{\"v\":{VERSION},\"id\":{},\"site\":{},\"t0\":{},\"series\":[",
            json_str(id),
            json_str(self.site.as_str()),
            self.t0.unwrap_or(0)
        );
        let mut first = true;
        for s in std::mem::take(&mut self.series).into_values() {
            if !first {
                body.push(',');
            }
            first = false;
            body.push_str(&s.head);
            body.push_str(&s.rows.join(","));
            body.push_str("]}");
        }
        body.push_str("]}");
        let packed = Packed {
            body: body.into_bytes(),
            readings: self.readings,
            origins: std::mem::take(&mut self.origins),
            oldest_ms: self.oldest_ms,
            newest_ms: self.newest_ms,
        };
        *self = Self::new(self.site.clone(), self.max_bytes);
        packed
    }
}

fn series_head(k: &SeriesKey) -> String {
    let mut h = format!(
        "{{\"device\":{},\"channel\":{},\"measurement\":{},\"quality\":{},",
        json_str(k.device.as_str()),
        json_str(k.channel.as_str()),
        json_str(k.measurement.as_str()),
        json_str(k.quality),
    );
    if !k.tags.is_empty() {
        let tags: BTreeMap<&str, &str> = k
            .tags
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        h.push_str("\"tags\":");
        h.push_str(&serde_json::to_string(&tags).unwrap_or_else(|_| "{}".into()));
        h.push(',');
    }
    h.push_str("\"fields\":");
    h.push_str(&serde_json::to_string(&k.fields).unwrap_or_else(|_| "[]".into()));
    h.push_str(",\"rows\":[");
    h
}

/// The message id: the outbox's random prefix and the record's sequence number.
pub fn message_id(prefix: &str, seq: u64) -> String {
    format!("{prefix}-{seq}")
}

/// Readings back out of a body (for tests, `wattbus azure` tools and consumers in Rust).
pub fn unpack(body: &[u8]) -> Result<Vec<Measurement>, String> {
    #[derive(serde::Deserialize)]
    struct Body {
        v: u32,
        site: Segment,
        t0: i64,
        series: Vec<S>,
    }
    #[derive(serde::Deserialize)]
    struct S {
        device: Segment,
        channel: Segment,
        measurement: Segment,
        quality: Quality,
        #[serde(default)]
        tags: BTreeMap<Segment, Segment>,
        fields: Vec<String>,
        rows: Vec<Vec<f64>>,
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if b.v != VERSION {
        return Err(format!("format version {} (this reads {VERSION})", b.v));
    }
    let mut out = Vec::new();
    for s in b.series {
        for row in s.rows {
            let Some((dt, values)) = row.split_first() else {
                return Err("an empty row".into());
            };
            if values.len() != s.fields.len() {
                return Err(format!(
                    "a row of {} values for {} fields",
                    values.len(),
                    s.fields.len()
                ));
            }
            #[allow(clippy::cast_possible_truncation)]
            let ts_ms = b.t0 + *dt as i64;
            out.push(Measurement {
                origin: None,
                site: b.site.clone(),
                device: s.device.clone(),
                channel: s.channel.clone(),
                measurement: s.measurement.clone(),
                ts_ms,
                quality: s.quality,
                fields: s
                    .fields
                    .iter()
                    .cloned()
                    .zip(values.iter().copied())
                    .collect(),
                tags: s.tags.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn reading(device: &str, ts: i64, p: f64) -> Measurement {
        Measurement {
            origin: None,
            site: seg("home"),
            device: seg(device),
            channel: seg("main"),
            measurement: seg("power"),
            ts_ms: ts,
            quality: Quality::Good,
            fields: BTreeMap::from([
                ("power_w".to_string(), p),
                ("voltage_v".to_string(), 230.1),
                ("current_a".to_string(), p / 230.1),
            ]),
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn every_reading_comes_back_exactly() {
        let mut p = Packer::new(seg("home"), 4096);
        let mut sent = Vec::new();
        for i in 0..20 {
            let mut m = reading(
                if i % 2 == 0 { "a" } else { "b" },
                1_764_000_000_000 + i * 1000,
                -1234.5 + i as f64 / 3.0,
            );
            if i == 7 {
                m.quality = Quality::OutOfRange;
                m.tags.insert(seg("phase"), seg("l2"));
            }
            p.push(&m).unwrap();
            sent.push(m);
        }
        let packed = p.take("abc-1");
        assert_eq!(packed.readings, 20);
        let mut back = unpack(&packed.body).unwrap();
        let key = |m: &Measurement| (m.device.clone(), m.ts_ms);
        back.sort_by_key(key);
        sent.sort_by_key(key);
        assert_eq!(back, sent);
        let v: serde_json::Value = serde_json::from_slice(&packed.body).unwrap();
        assert_eq!(v["id"], "abc-1");
        assert!(p.is_empty());
    }

    #[test]
    fn a_message_never_exceeds_its_bound_and_is_filled_close_to_it() {
        for max in [512, 4096, 65536] {
            let mut p = Packer::new(seg("home"), max);
            let mut i = 0;
            loop {
                match p.push(&reading(
                    "we515-1",
                    1_764_000_000_000 + i * 997,
                    100.0 + i as f64 * 0.1,
                )) {
                    Ok(()) => i += 1,
                    Err(Refused::Full) => break,
                    Err(e) => panic!("{e:?}"),
                }
            }
            let packed = p.take(&message_id("0123456789abcdef", u64::MAX));
            assert!(packed.body.len() <= max, "{} > {max}", packed.body.len());
            assert!(
                packed.body.len() > max - 80,
                "{} of {max}",
                packed.body.len()
            );
        }
    }

    /// The checked-in schema (proto/schemas/azure_message.json) describes what the packer
    /// writes: every required key there, with its type, and nothing else.
    #[test]
    fn a_packed_body_follows_its_published_json_schema() {
        fn check(schema: &serde_json::Value, v: &serde_json::Value, at: &str) {
            let ty = schema["type"].as_str().unwrap_or("");
            let ok = match ty {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                _ => true,
            };
            assert!(ok, "{at}: {v} is not {ty}");
            if let Some(e) = schema["enum"].as_array() {
                assert!(e.contains(v), "{at}: {v} not in {e:?}");
            }
            if let Some(c) = schema.get("const") {
                assert_eq!(v, c, "{at}");
            }
            if let (Some(props), Some(obj)) = (schema["properties"].as_object(), v.as_object()) {
                for r in schema["required"].as_array().into_iter().flatten() {
                    assert!(obj.contains_key(r.as_str().unwrap()), "{at}: {r} missing");
                }
                for (k, val) in obj {
                    let sub = props
                        .get(k)
                        .unwrap_or_else(|| panic!("{at}: {k} is not in the schema"));
                    check(sub, val, &format!("{at}.{k}"));
                }
            }
            if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
                for (i, x) in arr.iter().enumerate() {
                    check(items, x, &format!("{at}[{i}]"));
                }
            }
        }
        let schema: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../proto/schemas/azure_message.json"
        )))
        .unwrap();
        let mut p = Packer::new(seg("home"), 4096);
        let mut m = reading("a", 1_764_000_000_000, 5.0);
        m.tags.insert(seg("phase"), seg("l1"));
        p.push(&m).unwrap();
        p.push(&reading("b", 1_764_000_000_500, 7.0)).unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&p.take(&message_id("0123456789abcdef", 42)).body).unwrap();
        check(&schema, &body, "body");
    }

    #[test]
    fn a_reading_of_another_site_or_too_large_is_refused() {
        let mut p = Packer::new(seg("home"), 512);
        let mut other = reading("a", 1, 1.0);
        other.site = seg("cabin");
        assert_eq!(p.push(&other), Err(Refused::OtherSite));
        let mut big = reading("a", 1, 1.0);
        for i in 0..40 {
            big.fields.insert(format!("field_number_{i}_w"), 1.0);
        }
        assert!(matches!(p.push(&big), Err(Refused::TooLarge(_))));
        assert!(p.is_empty());
    }
}
