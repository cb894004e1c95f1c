//! One set: every retention policy's every measurement, over a time window, as line protocol.
//!
//! The database is read through InfluxQL only (portable across 1.x, 2.x with DBRP and 3.x):
//! `SHOW RETENTION POLICIES`, `SHOW MEASUREMENTS`, per policy and measurement `SHOW FIELD KEYS`
//! (the field types: JSON turns the float 5.0 into `5`, so the type cannot come from the
//! values) and `SHOW TAG KEYS`, then `SELECT * … GROUP BY *` chunked, a series at a time,
//! encoded with the same line-protocol encoder influx-writer uses and streamed into the part.

use std::collections::BTreeMap;
use std::time::Instant;

use influx_client::line_protocol::{FieldValue, Point, encode_point};
use influx_client::query::{Connection, QueryError, Series, column, ident};

use crate::manifest::{FieldType, Part, RetentionPolicy, part_file};
use crate::store::{Store, StoreError};
use influx_client::query::retention_policies;

use crate::events::Events;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExportError {
    pub fn is_transient(&self) -> bool {
        match self {
            ExportError::Query(e) => e.is_transient(),
            ExportError::Store(e) => e.is_transient(),
        }
    }
}

/// The window of a set: `time >= from_ns` (none: from the start) and `time < to_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportWindow {
    pub from_ns: Option<i64>,
    pub to_ns: i64,
}

/// What [`export`] made: the policies as they were, and the parts written and verified.
#[derive(Debug, Default)]
pub struct Exported {
    pub policies: Vec<RetentionPolicy>,
    pub parts: Vec<Part>,
}

/// The database's retention policies.
pub async fn policies(conn: &Connection) -> Result<Vec<RetentionPolicy>, QueryError> {
    let series = conn
        .query(&format!(
            "SHOW RETENTION POLICIES ON {}",
            ident(conn.database())
        ))
        .await?;
    Ok(retention_policies(&series))
}

async fn measurements(conn: &Connection) -> Result<Vec<String>, QueryError> {
    let series = conn
        .query(&format!("SHOW MEASUREMENTS ON {}", ident(conn.database())))
        .await?;
    Ok(series
        .iter()
        .flat_map(|s| column(s, "name"))
        .map(str::to_string)
        .collect())
}

/// A measurement's fields in one policy, each with every type it has there (more than one
/// when shards disagree).
async fn fields(
    conn: &Connection,
    rp: &str,
    m: &str,
) -> Result<BTreeMap<String, Vec<FieldType>>, QueryError> {
    let series = conn
        .query(&format!(
            "SHOW FIELD KEYS ON {} FROM {}.{}",
            ident(conn.database()),
            ident(rp),
            ident(m)
        ))
        .await?;
    let mut out: BTreeMap<String, Vec<FieldType>> = BTreeMap::new();
    for s in &series {
        let (Some(k), Some(t)) = (
            s.columns.iter().position(|c| c == "fieldKey"),
            s.columns.iter().position(|c| c == "fieldType"),
        ) else {
            continue;
        };
        for row in &s.values {
            if let (Some(key), Some(ty)) = (
                row.get(k).and_then(|v| v.as_str()),
                row.get(t)
                    .and_then(|v| v.as_str())
                    .and_then(FieldType::parse),
            ) {
                out.entry(key.to_string()).or_default().push(ty);
            }
        }
    }
    Ok(out)
}

async fn tag_keys(conn: &Connection, m: &str) -> Result<Vec<String>, QueryError> {
    let series = conn
        .query(&format!(
            "SHOW TAG KEYS ON {} FROM {}",
            ident(conn.database()),
            ident(m)
        ))
        .await?;
    Ok(series
        .iter()
        .flat_map(|s| column(s, "tagKey"))
        .map(str::to_string)
        .collect())
}

/// A JSON value of a field as what line protocol writes. With one type, that type decides
/// (5 in a float field is 5.0); with several (shards that disagree), the value's own JSON
/// kind does. `None`: it cannot be written as that type.
fn field_value<'v>(types: &[FieldType], v: &'v serde_json::Value) -> Option<FieldValue<'v>> {
    let ty = match types {
        [one] => *one,
        many => match v {
            serde_json::Value::String(_) => FieldType::String,
            serde_json::Value::Bool(_) => FieldType::Boolean,
            serde_json::Value::Number(n) if n.is_i64() && many.contains(&FieldType::Integer) => {
                FieldType::Integer
            }
            serde_json::Value::Number(n) if n.is_u64() && many.contains(&FieldType::Unsigned) => {
                FieldType::Unsigned
            }
            _ => FieldType::Float,
        },
    };
    match ty {
        FieldType::Float => v.as_f64().map(FieldValue::Float),
        FieldType::Integer => v.as_i64().map(FieldValue::Int),
        FieldType::Unsigned => v.as_u64().map(FieldValue::UInt),
        FieldType::String => v.as_str().map(FieldValue::Str),
        FieldType::Boolean => v.as_bool().map(FieldValue::Bool),
    }
}

/// The lines of one series; rows without any field (other fields' rows) are no points.
/// Returns (points, skipped).
fn encode_series(
    s: &Series,
    fields: &BTreeMap<String, Vec<FieldType>>,
    out: &mut String,
) -> (u64, u64) {
    let Some(time) = s.columns.iter().position(|c| c == "time") else {
        return (0, s.values.len() as u64);
    };
    let cols: Vec<(usize, &str, &[FieldType])> = s
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != time)
        .filter_map(|(i, c)| fields.get(c).map(|t| (i, c.as_str(), t.as_slice())))
        .collect();
    let tags: Vec<(&str, &str)> = s
        .tags
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (mut points, mut skipped) = (0, 0);
    for row in &s.values {
        let Some(ts) = row.get(time).and_then(serde_json::Value::as_i64) else {
            skipped += 1;
            continue;
        };
        let mut bad = false;
        let mut fv = Vec::with_capacity(cols.len());
        for (i, name, types) in &cols {
            match row.get(*i) {
                None | Some(serde_json::Value::Null) => {}
                Some(v) => match field_value(types, v) {
                    Some(value) => fv.push((*name, value)),
                    None => bad = true,
                },
            }
        }
        if fv.is_empty() && !bad {
            continue;
        }
        let p = Point {
            measurement: &s.name,
            tags: tags.clone(),
            fields: fv,
            timestamp: ts,
        };
        if bad || encode_point(out, &p).is_err() {
            skipped += 1;
        } else {
            points += 1;
        }
    }
    (points, skipped)
}

/// Export the window into set `id`: one part per policy and measurement with points, each
/// uploaded and read back before the next. `progress` hears of every part done.
pub async fn export(
    conn: &Connection,
    store: &Store,
    id: &str,
    window: ExportWindow,
    chunk_rows: usize,
    events: &Events,
) -> Result<Exported, ExportError> {
    let policies = policies(conn).await?;
    let measurements = measurements(conn).await?;
    let mut parts = Vec::new();
    let mut text = String::with_capacity(1 << 20);
    for rp in &policies {
        for m in &measurements {
            let fields = fields(conn, &rp.name, m).await?;
            if fields.is_empty() {
                continue;
            }
            let mut condition = format!("time < {}", window.to_ns);
            if let Some(from) = window.from_ns {
                condition = format!("time >= {from} AND {condition}");
            }
            let q = format!(
                "SELECT * FROM {}.{}.{} WHERE {condition} GROUP BY *",
                ident(conn.database()),
                ident(&rp.name),
                ident(m)
            );
            let started = Instant::now();
            let mut stream = conn.stream(&q, chunk_rows).await?;
            let file = part_file(parts.len() + 1);
            let mut writer = None;
            let (mut points, mut skipped) = (0u64, 0u64);
            let result: Result<(), ExportError> = async {
                while let Some(series) = stream.next().await? {
                    text.clear();
                    let (p, s) = encode_series(&series, &fields, &mut text);
                    points += p;
                    skipped += s;
                    if text.is_empty() {
                        continue;
                    }
                    if writer.is_none() {
                        writer = Some(store.part_writer(id, &file).await?);
                    }
                    if let Some(w) = writer.as_mut() {
                        w.write(text.as_bytes()).await?;
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                if let Some(w) = writer {
                    w.abort().await;
                }
                return Err(e);
            }
            if skipped > 0 {
                events.rows_skipped(&rp.name, m, skipped);
            }
            let Some(w) = writer else { continue };
            let (bytes, sha256) = w.finish().await?;
            let part = Part {
                file,
                retention_policy: rp.name.clone(),
                measurement: m.clone(),
                fields: fields
                    .iter()
                    .filter_map(|(k, t)| t.first().map(|t| (k.clone(), *t)))
                    .collect(),
                tags: tag_keys(conn, m).await?,
                points,
                bytes,
                sha256,
                skipped,
            };
            // Read back before it counts.
            store.read_part(id, &part, |_| Ok(())).await?;
            events.part_stored(id, &part, started.elapsed().as_secs_f64());
            parts.push(part);
        }
    }
    Ok(Exported { policies, parts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(json: &str) -> Series {
        serde_json::from_str(json).expect("series")
    }

    #[test]
    fn types_come_from_the_field_keys_not_the_json() {
        let s = series(
            r#"{"name":"power","tags":{"device":"meter 1","quality":"good","empty":""},"columns":["time","count","power_w","state","on","note"],"values":[[1000000123,5,230,"ok",true,null],[2000000000,null,null,null,null,null],[3000000000,-7,1.5,"a \"q\" \\","false",null]]}"#,
        );
        let fields = BTreeMap::from([
            ("count".to_string(), vec![FieldType::Integer]),
            ("power_w".to_string(), vec![FieldType::Float]),
            ("state".to_string(), vec![FieldType::String]),
            ("on".to_string(), vec![FieldType::Boolean]),
            ("note".to_string(), vec![FieldType::String]),
        ]);
        let mut out = String::new();
        let (points, skipped) = encode_series(&s, &fields, &mut out);
        // The second row has no fields: no point. The third has "false" as a string in a
        // boolean field: skipped, counted.
        assert_eq!((points, skipped), (1, 1));
        assert_eq!(
            out,
            "power,device=meter\\ 1,quality=good count=5i,power_w=230.0,state=\"ok\",on=true 1000000123\n"
        );
    }

    #[test]
    fn fields_whose_shards_disagree_follow_each_value() {
        let both = [FieldType::Float, FieldType::Integer];
        assert_eq!(
            field_value(&both, &serde_json::json!(3)),
            Some(FieldValue::Int(3))
        );
        assert_eq!(
            field_value(&both, &serde_json::json!(3.5)),
            Some(FieldValue::Float(3.5))
        );
        assert_eq!(
            field_value(&[FieldType::Integer], &serde_json::json!(3.5)),
            None
        );
    }
}
