//! Services' statuses as readings: how every service's health reaches InfluxDB and Grafana.
//!
//! Every running service publishes its retained status on `wattbus/v1/<site>/status/<instance>`
//! every [`proto::STATUS_INTERVAL_S`] seconds, with its core metrics
//! ([`proto::ServiceHealth`]); the broker publishes `offline` as its last will when its
//! connection drops. The writer stores each as a reading of measurement `service`: device =
//! the instance, channel `status`, tag `service`, fields `up` (1, or 0 when it went offline)
//! and the core metrics. A stopped service's readings stop: "service down" is `up = 0` or no
//! reading for a while (docs/grafana.md).
//!
//! Statuses are not journaled (a lost one is replaced by the next, 10 s later), so they carry
//! no origin and are acknowledged to nobody. The broker lets only the user owning a client id
//! publish that instance's status.

use std::collections::BTreeMap;

use proto::{Measurement, Payload as _, Quality, ReadingId, Segment, ServiceState, Status};

/// The measurement service statuses are stored as (no reading may name it).
pub const MEASUREMENT: &str = proto::SERVICE_MEASUREMENT;
/// Their channel (the device is the instance).
pub const CHANNEL: &str = "status";

/// The reading to store for the status `payload` received on `topic` (of `site`), `None` when
/// there is nothing to store: a retained `offline` (stored when it happened; a writer that
/// subscribes later would otherwise store it again at its own start). It is stamped `now_ms`.
pub fn reading(
    site: &Segment,
    topic: &str,
    payload: &[u8],
    retained: bool,
    now_ms: i64,
) -> Result<Option<Measurement>, String> {
    let status = Status::decode(payload).map_err(|e| e.to_string())?;
    let instance = match proto::parse(topic) {
        Some(t) if t.kind == proto::Kind::Status && &t.site == site => t.rest.into_iter().next(),
        _ => None,
    }
    .ok_or_else(|| format!("{topic:?} is not a status topic of site {site}"))?;
    if status.instance != instance {
        return Err(format!(
            "the status names instance {:?} (topic: {:?})",
            status.instance.as_str(),
            instance.as_str()
        ));
    }
    // Stamped when received, by the writer's clock, not the service's: a service on another
    // host with its clock off (a Pi without a real-time clock before NTP) would otherwise
    // write its heartbeats into the past (and look down) or the future (and outlive its
    // offline).
    let fields = match (status.state, status.health) {
        (ServiceState::Offline, _) if retained => return Ok(None),
        (ServiceState::Offline, _) => BTreeMap::from([("up".to_string(), 0.0)]),
        (ServiceState::Online, Some(health)) => health.fields(),
        (ServiceState::Online, None) => BTreeMap::from([("up".to_string(), 1.0)]),
    };
    let ts_ms = now_ms;
    let id = ReadingId {
        site: site.clone(),
        device: instance,
        channel: Segment::new(CHANNEL).map_err(|e| e.to_string())?,
    };
    let measurement = Segment::new(MEASUREMENT).map_err(|e| e.to_string())?;
    let service_tag = Segment::new("service").map_err(|e| e.to_string())?;
    let reading = Measurement {
        tags: BTreeMap::from([(service_tag, status.service)]),
        ..Measurement::new(id, measurement, ts_ms, Quality::Good, fields)
    };
    // Not `validate()`: it refuses the reserved measurement to every reading from the bus.
    // The fields are ServiceHealth's own names and the time the status's (validated) or now.
    Ok(Some(reading))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{ServiceHealth, Topic};

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    fn status(instance: &str, state: ServiceState, health: Option<ServiceHealth>) -> Vec<u8> {
        Status {
            service: seg("serial-ingest"),
            instance: seg(instance),
            state,
            version: "0.1.0".into(),
            ts_ms: 1_700_000_000_000,
            health,
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn a_health_status_becomes_a_service_reading_of_its_instance() {
        let site = seg("home");
        let topic = Topic::status(&site, &seg("serial-ingest-demo"));
        let health = ServiceHealth {
            uptime_s: 60,
            sent: 120,
            errors: 2,
            journal_records: 3,
            journal_oldest_s: 1,
            ..ServiceHealth::default()
        };
        let payload = status("serial-ingest-demo", ServiceState::Online, Some(health));
        let r = reading(&site, topic.as_str(), &payload, true, 5)
            .unwrap()
            .unwrap();
        assert_eq!(r.measurement.as_str(), "service");
        assert_eq!(r.device.as_str(), "serial-ingest-demo");
        assert_eq!(r.channel.as_str(), "status");
        assert_eq!(r.tags[&seg("service")].as_str(), "serial-ingest");
        assert_eq!(r.ts_ms, 5, "stamped on receipt, not by the service's clock");
        assert_eq!(r.fields["up"], 1.0);
        assert_eq!(r.fields["sent"], 120.0);
        assert_eq!(r.fields["errors"], 2.0);
        assert_eq!(r.fields["journal_records"], 3.0);
        assert!(r.origin.is_none());
    }

    #[test]
    fn offline_is_stored_when_it_arrives_and_never_again_from_the_retained_copy() {
        let site = seg("home");
        let topic = Topic::status(&site, &seg("modbus-ingest"));
        let payload = status("modbus-ingest", ServiceState::Offline, None);
        let live = reading(&site, topic.as_str(), &payload, false, 1_700_000_042_000)
            .unwrap()
            .unwrap();
        assert_eq!(live.fields, BTreeMap::from([("up".to_string(), 0.0)]));
        assert_eq!(
            live.ts_ms, 1_700_000_042_000,
            "a will carries its connection's start"
        );
        assert_eq!(
            reading(&site, topic.as_str(), &payload, true, 42).unwrap(),
            None
        );
    }

    #[test]
    fn a_status_naming_another_instance_or_site_is_refused() {
        let site = seg("home");
        let payload = status("modbus-ingest", ServiceState::Online, None);
        let other = Topic::status(&site, &seg("serial-ingest"));
        let err = reading(&site, other.as_str(), &payload, false, 0).unwrap_err();
        assert!(err.contains("instance \"modbus-ingest\""), "{err}");
        let elsewhere = Topic::status(&seg("cabin"), &seg("modbus-ingest"));
        assert!(reading(&site, elsewhere.as_str(), &payload, false, 0).is_err());
        assert!(reading(&site, other.as_str(), b"{not json", false, 0).is_err());
    }
}
