//! `wattbus tail [filter]`: bus traffic, one readable line per message.
//!
//! It only watches: it never acknowledges, so it cannot hide a sink's failure.

use std::fmt::Write as _;
use std::path::PathBuf;

use proto::{
    Ack, Command, CommandResult, DeadLetter, Kind, Measurement, Payload, RawFrame, Segment,
    SinkRegistration, Status,
};
use runtime::ConfigSource;
use runtime::bus::{Bus, Identity, Overflow, QoS};

#[derive(clap::Args, Debug)]
pub struct TailOptions {
    /// MQTT filter [default: wattbus/v1/#].
    filter: Option<String>,
    /// Print payloads as they are, not summarised.
    #[arg(long)]
    raw: bool,
    /// Stop after this many messages.
    #[arg(long, short = 'n')]
    count: Option<u64>,
    #[arg(long, short)]
    config: Option<PathBuf>,
}

pub async fn run(opts: TailOptions) -> anyhow::Result<()> {
    let src = ConfigSource::load(crate::services::config_path(opts.config).as_deref())?;
    let common = src.common()?;
    runtime::telemetry::init_logging(&common.log)?;
    let id = Identity {
        service: Segment::new("tail")?,
        instance: Segment::new(format!("wattbus-tail-{}", std::process::id()))?,
    };
    let health = runtime::Health::default();
    let (bus, task) = Bus::observe(&common.bus, &common.site, &id, &health)?;
    let filter = opts.filter.unwrap_or_else(proto::everything);
    let mut rx = bus.subscribe(filter, QoS::AtMostOnce, Overflow::Drop);
    let mut seen = 0u64;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if opts.raw {
                    println!("{} {}", msg.topic, printable(&String::from_utf8_lossy(&msg.payload)));
                } else {
                    println!("{}", describe(&msg.topic, &msg.payload));
                }
                seen += 1;
                if opts.count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            r = tokio::signal::ctrl_c() => { let _ = r; break; }
        }
    }
    bus.close(task).await;
    Ok(())
}

/// One line for a message: its kind, where it comes from and what it says.
pub fn describe(topic: &str, payload: &[u8]) -> String {
    let Some(parsed) = proto::parse(topic) else {
        return format!("{topic}  {}", preview(payload));
    };
    let path: Vec<&str> = parsed.rest.iter().map(Segment::as_str).collect();
    let place = format!("{}/{}", parsed.site, path.join("/"));
    let body = match parsed.kind {
        Kind::Measurement => decoded::<Measurement>(payload, |m| {
            let mut s = format!("{} ", m.measurement);
            for (k, v) in &m.fields {
                let _ = write!(s, "{k}={v} ");
            }
            let _ = write!(
                s,
                "[{}] read {} ms ago",
                serde_plain(&m.quality),
                proto::now_ms() - m.ts_ms
            );
            if let Some(o) = &m.origin {
                let _ = write!(s, " ({}#{})", o.producer, o.seq);
            }
            s
        }),
        Kind::Raw => decoded::<RawFrame>(payload, |f| {
            let n = f.channels.first().map_or(0, |c| c.samples.len());
            format!(
                "{} channels × {n} samples at {} Hz",
                f.channels.len(),
                f.sample_rate_hz
            )
        }),
        Kind::Command => decoded::<Command>(payload, |c| {
            format!("{:?} {} (id {})", c.action, c.device, c.id)
        }),
        Kind::CommandResult => decoded::<CommandResult>(payload, |r| {
            format!(
                "{} {}{}",
                r.id,
                if r.ok { "ok" } else { "FAILED" },
                r.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        }),
        Kind::Status => decoded::<Status>(payload, |s| {
            format!("{} {} v{}", s.service, serde_plain(&s.state), s.version)
        }),
        Kind::Ack => decoded::<Ack>(payload, |a| {
            let n: u64 = a.ranges.iter().map(|[f, l]| l - f + 1).sum();
            format!(
                "{n} acknowledged in {} range(s), up to #{}",
                a.ranges.len(),
                a.ranges.last().map_or(0, |r| r[1])
            )
        }),
        Kind::DeadLetter => decoded::<DeadLetter>(payload, |d| {
            format!("from {}: {} — {}", d.service, d.reason, d.topic)
        }),
        Kind::Sink if payload.is_empty() => "registration cleared".to_string(),
        Kind::Sink => decoded::<SinkRegistration>(payload, |r| {
            if r.is_withdrawn() {
                "withdrawn: producers no longer wait for it".to_string()
            } else {
                format!("consumes {}", r.filters.join(", "))
            }
        }),
    };
    format!("{:<6} {place}  {body}", parsed.kind.as_str())
}

fn decoded<T: Payload>(payload: &[u8], f: impl FnOnce(&T) -> String) -> String {
    match T::decode(payload) {
        Ok(v) => f(&v),
        Err(e) => format!("INVALID ({e}): {}", preview(payload)),
    }
}

fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// At most 200 characters of `payload`, control characters escaped: a payload is anyone's
/// text, and ESC sequences in it would retitle or clear the terminal of whoever watches.
fn preview(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let shown: String = text.chars().take(200).collect();
    let mut s = printable(&shown);
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// `text` with control characters escaped (`\u{1b}`, `\n`), so nothing in a payload acts on
/// the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_a_payload_never_reach_the_terminal() {
        let shown = preview(b"\x1b]0;pwned\x07\x1b[2Jok\nnext");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("ok"), "{shown:?}");
    }

    #[test]
    fn measurements_and_garbage_read_well() {
        let m = serde_json::json!({
            "site": "home", "device": "m1", "channel": "main", "measurement": "power",
            "ts_ms": proto::now_ms(), "quality": "good", "fields": {"power_w": 12.5},
            "origin": {"producer": "sim", "stream": "meas", "seq": 7}
        });
        let line = describe("wattbus/v1/home/meas/m1/main", m.to_string().as_bytes());
        assert!(
            line.starts_with("meas   home/m1/main  power power_w=12.5 [good]"),
            "{line}"
        );
        assert!(line.ends_with("(sim#7)"), "{line}");
        let bad = describe("wattbus/v1/home/meas/m1/main", b"{not json");
        assert!(bad.contains("INVALID"), "{bad}");
        assert_eq!(describe("other/topic", b"hi"), "other/topic  hi");
    }
}
