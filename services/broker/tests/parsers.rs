//! rumqttd's packet parsers and writers against mutated packets: whatever a client sends, the
//! parser answers with a packet or an error, never a panic; and a PUBLISH it parsed, both
//! protocols' writers can write on (a v5 publish reaches v4 subscribers). Millions of cases in
//! seconds, where the TCP tests (`hostile.rs`) try a few hundred.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{self, Protocol};

const MAX_PACKET: usize = 1 << 20;

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &[u8]) -> Vec<u8> {
    [&(s.len() as u16).to_be_bytes()[..], s].concat()
}

/// Well-formed packets of each kind, the starting points of the mutations.
fn seeds(v5: bool) -> Vec<Vec<u8>> {
    let props = |p: &[u8]| {
        if v5 {
            [&[p.len() as u8][..], p].concat()
        } else {
            Vec::new()
        }
    };
    let connect = [
        string(b"MQTT"),
        vec![if v5 { 5 } else { 4 }, 0b1110_1110],
        30u16.to_be_bytes().to_vec(),
        props(&[0x11, 0, 0, 0, 10, 0x22, 0, 8]), // session expiry, topic alias max
        string(b"client"),
        props(&[0x18, 0, 0, 0, 5]), // will delay
        string(b"will/topic"),
        string(b"gone"),
        string(b"user"),
        string(b"password"),
    ]
    .concat();
    let publish_props = props(&[
        0x01, 1, 0x02, 0, 0, 0, 60, 0x23, 0, 1, 0x03, 0, 4, b'j', b's', b'o', b'n', 0x26, 0, 1,
        b'k', 0, 1, b'v', 0x0b, 7,
    ]);
    vec![
        packet(0x10, &connect),
        packet(
            0x33,
            &[
                string(b"wattbus/v1/a/meas/b/c"),
                vec![0, 7],
                publish_props,
                b"230.1".to_vec(),
            ]
            .concat(),
        ),
        packet(
            0x30,
            &[string(b""), props(&[0x23, 0, 1]), b"x".to_vec()].concat(),
        ),
        packet(
            0x82,
            &[
                vec![0, 2],
                props(&[0x0b, 3]),
                string(b"$share/g/a/+"),
                vec![0b10_1110],
            ]
            .concat(),
        ),
        packet(
            0xa2,
            &[vec![0, 3], props(&[]), string(b"a/#"), string(b"b")].concat(),
        ),
        packet(
            0x40,
            &[vec![0, 7], if v5 { vec![0x10, 0] } else { vec![] }].concat(),
        ),
        packet(0x50, &[0, 7]),
        packet(0x62, &[0, 7]),
        packet(0x70, &[0, 7]),
        packet(0xe0, &if v5 { vec![0x8e, 0] } else { vec![] }),
        packet(0xc0, &[]),
        packet(0x20, &[0, 0]),
        packet(0xb0, &[0, 1, 0, 0]),
        packet(0x90, &[0, 1, 0, 0x80]),
    ]
}

/// xorshift64: the same cases every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            1 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len())),
            2 => {
                let i = rng.below(bytes.len() + 1);
                bytes.insert(i, rng.next() as u8);
            }
            3 if bytes.len() > 2 => {
                // A length field (remaining length, string length) made to lie.
                let i = 1 + rng.below(bytes.len() - 1);
                bytes[i] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            _ => bytes.extend_from_slice(&seed[..rng.below(seed.len() + 1)]),
        }
    }
    bytes
}

/// Parse everything in `bytes` and write every packet back with both protocols; the panic
/// message if anything panicked.
fn exercise<P: Protocol>(mut protocol: P, bytes: &[u8]) -> Result<(), String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut stream = BytesMut::from(bytes);
        for _ in 0..16 {
            match protocol.read_mut(&mut stream, MAX_PACKET) {
                // A client's PUBLISH is forwarded to subscribers of either protocol; what
                // else the broker writes it builds itself.
                Ok(packet @ protocol::Packet::Publish(..)) => {
                    let mut out = BytesMut::new();
                    let _ = V4.write(packet.clone(), &mut out);
                    let _ = V5.write(packet, &mut out);
                }
                Ok(_) => {}
                Err(protocol::Error::InsufficientBytes(_)) | Err(_) => break,
            }
        }
    }));
    outcome.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

/// rumqttd's panics are caught and reported by [`fuzz`]; printing each would bury the report.
fn quiet_rumqttd_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info
                .location()
                .is_some_and(|l| l.file().contains("rumqttd"))
            {
                default(info);
            }
        }));
    });
}

fn fuzz(v5: bool, cases: usize) {
    quiet_rumqttd_panics();
    let seeds = seeds(v5);
    let mut rng = Rng(if v5 { 0x5eed_0005 } else { 0x5eed_0004 });
    let mut failures = Vec::new();
    for case in 0..cases {
        let seed = &seeds[case % seeds.len()];
        let bytes = if case < seeds.len() {
            seed.clone()
        } else {
            mutate(&mut rng, seed)
        };
        let result = if v5 {
            exercise(V5, &bytes)
        } else {
            exercise(V4, &bytes)
        };
        if let Err(panic) = result {
            failures.push(format!("{bytes:02x?}: {panic}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "parser or writer panicked:\n{}",
        failures.join("\n")
    );
}

#[test]
fn no_v4_packet_makes_the_parser_or_a_writer_panic() {
    fuzz(false, 300_000);
}

#[test]
fn no_v5_packet_makes_the_parser_or_a_writer_panic() {
    fuzz(true, 300_000);
}
