//! Every wattbus topic and payload, defined once.
//!
//! Services never build a topic string or a payload struct of their own: they call the
//! constructors here, so a topic is always tied to the type it carries ([`Topic<T>`]) and a
//! service cannot publish the wrong payload on it. A reading's identity (site, device,
//! channel: [`ReadingId`]) is written once: a producer builds the reading from it
//! ([`Measurement::new`]) and publishes it on the topic built from the reading itself
//! ([`Measurement::topic`], [`RawFrame::topic`]), so topic and payload cannot disagree.
//!
//! The tree is versioned: `wattbus/v1/<site>/<kind>/...`. A breaking change to a payload means a
//! new version prefix, so old and new services can share one broker during an upgrade.
//!
//! | topic | payload | retained | journaled |
//! |---|---|---|---|
//! | `wattbus/v1/<site>/raw/<device>` | [`RawFrame`] | no | in memory (loss acceptable) |
//! | `wattbus/v1/<site>/meas/<device>/<channel>` | [`Measurement`] | no | on disk |
//! | `wattbus/v1/<site>/cmd/<device>` | [`Command`] | no | no (commands expire) |
//! | `wattbus/v1/<site>/cmd-result/<device>` | [`CommandResult`] | no | no |
//! | `wattbus/v1/<site>/status/<instance>` | [`Status`] (with [`ServiceHealth`] every 10 s) | yes (last will: offline) | no |
//! | `wattbus/v1/<site>/ack/<producer>/<stream>/<sink>` | [`Ack`] | no | no |
//! | `wattbus/v1/<site>/dead/<service>` | [`DeadLetter`] | no | no |
//! | `wattbus/v1/<site>/sink/<group>` | [`SinkRegistration`] | yes | no |
//!
//! Everything is JSON, so `mosquitto_sub`, Node-RED and Home Assistant can read it. Units are in
//! field names (`power_w`, `current_a`, `ts_ms`), and every reading carries the time it was
//! *read*, never the time it was written.
//!
//! Layout:
//! - `topic`: [`Segment`], [`ReadingId`] (a reading's site, device and channel), typed
//!   [`Topic`] and [`Filter`], and [`parse`] for incoming topics.
//! - `payload`: the [`Payload`] trait (encode, decode, validate, the topic a payload belongs
//!   on) and every payload type.
//! - `plausible`: the physical range of each unit, by field-name suffix, that sinks judge
//!   readings by ([`RANGES`]).
//! - `schema`: JSON Schemas generated from the types (checked in under `proto/schemas/`).
//! - [`utc`]: calendar dates of Unix times, for timestamps people read or programs write.

mod payload;
mod plausible;
mod schema;
mod topic;
pub mod utc;

pub use payload::{
    Ack, Action, Command, CommandResult, DeadLetter, DecodeError, EncodeError, MAX_ACK_RANGES,
    MAX_PAYLOAD_BYTES, MAX_SINK_FILTERS, MAX_TAGS, Measurement, Origin, Payload, Quality,
    READING_BATCH_FORMAT, RESERVED_NAMES, RawChannel, RawFrame, ReadingBatch, SERVICE_MEASUREMENT,
    STATUS_INTERVAL_S, Sequenced, ServiceHealth, ServiceState, SinkRegistration, Status,
    check_field_name, now_ms,
};
pub use plausible::{Implausible, RANGES, UnitRange, plausible_range};
pub use schema::{all_schemas, schema_json};
pub use topic::{
    Filter, Kind, PREFIX, ParsedTopic, ReadingId, Segment, SegmentError, Topic, deserialize_text,
    everything, filters_overlap, matches_filter as topic_matches, parse,
};
