//! influx-writer: measurements from the bus into InfluxDB (v2 `/api/v2/write` and v1 `/write`)
//! and into rotating local files.
//!
//! **In progress (issue 5).** What exists so far is the pure core every output shares: the
//! line-protocol encoder. The HTTP writer, batching, durable spool, dead letters, file sink and
//! `run()` are not written yet, and the service is not in `wattbus run` until they are.
//!
//! Why our own encoder rather than the `influxdb2` crate: it writes only to `/api/v2/write` (no
//! InfluxDB 1.x, which is what 32-bit Pis run), escapes `"` but not `\` in string fields, lets
//! NaN and infinity through, and brings reqwest 0.11 with an advisory-affected rustls-webpki.
//!
//! Layout:
//! - `line_protocol`: points, escaping, validation per point, [`Measurement`] mapping (pure).

pub mod line_protocol;

pub use line_protocol::{FieldValue, LineError, Point, Precision, encode_batch, measurement_point};

#[doc(no_inline)]
pub use proto::Measurement;
