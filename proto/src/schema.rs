//! JSON Schemas generated from the payload types.
//!
//! They are checked in under `proto/schemas/` for people and tools outside Rust (Node-RED,
//! Home Assistant templates, validators). A test fails when a checked-in schema is stale;
//! `UPDATE_SCHEMAS=1 cargo test -p proto` rewrites them.

use schemars::JsonSchema;

use crate::payload::{
    Ack, Command, CommandResult, DeadLetter, Measurement, Payload, RawFrame, ReadingBatch,
    SinkRegistration, Status,
};

/// The schema of one payload type, pretty-printed with a trailing newline.
pub fn schema_json<T: Payload + JsonSchema>() -> String {
    let schema = schemars::schema_for!(T);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// `(file name, schema)` for every payload type.
pub fn all_schemas() -> Vec<(String, String)> {
    fn one<T: Payload>() -> (String, String) {
        (format!("{}.json", T::NAME), schema_json::<T>())
    }
    vec![
        one::<Measurement>(),
        one::<RawFrame>(),
        one::<Command>(),
        one::<CommandResult>(),
        one::<Status>(),
        one::<Ack>(),
        one::<DeadLetter>(),
        one::<SinkRegistration>(),
        one::<ReadingBatch>(),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn checked_in_schemas_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
        let mut stale = Vec::new();
        for (name, schema) in super::all_schemas() {
            let path = dir.join(&name);
            if update {
                std::fs::write(&path, &schema).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(schema.as_str()) {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "stale JSON Schemas in proto/schemas: {stale:?}; run `UPDATE_SCHEMAS=1 cargo test -p proto`"
        );
    }
}
