//! Notable events of the writer that are not about one output, logged and counted here.

use std::time::Duration;

use proto::{Implausible, Measurement};
use runtime::telemetry::Counter;
use runtime::telemetry::LogLimit;

/// A `good` reading with a value outside the plausible range of its unit, stored as
/// `out_of_range`. WARN: handled (the value is kept, flagged), but a meter, a profile or a
/// producer is wrong and a person should look. A broken register repeats every poll, so the
/// line is logged at most once a minute with the count of the rest; the counter counts all.
pub fn implausible(topic: &str, m: &Measurement, bad: &Implausible) {
    static LOG: LogLimit = LogLimit::new(Duration::from_secs(60));
    Counter::new(
        "wattbus_influx_writer_implausible_readings_total",
        "Readings stored with quality out_of_range because a value is outside the plausible range of its unit.",
        &[],
    )
    .inc();
    if let Some(unlogged) = LOG.allow() {
        tracing::warn!(
            topic,
            device = %m.device,
            channel = %m.channel,
            field = %bad.field,
            value = bad.value,
            unlogged,
            "{bad}; stored with quality out_of_range (value kept)."
        );
    }
}
