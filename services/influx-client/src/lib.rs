//! What wattbus's InfluxDB users share, and nothing else: no service depends on another, so
//! influx-writer (writes), backup-rotator (exports) and the `wattbus` tools (setup, restore)
//! meet here.
//!
//! - `line_protocol`: points, escaping, validation per point, the [`proto::Measurement`]
//!   mapping (pure: no I/O, no async).
//! - `query`: InfluxQL over `/query`, the one read path every InfluxDB speaks (1.x natively,
//!   2.x through a DBRP mapping, 3.x through its v1 API), with chunked answers streamed a
//!   series at a time.

pub mod line_protocol;
pub mod query;

/// The `Authorization` value of HTTP basic authentication (InfluxDB 1.x users).
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding (for a Basic header; not worth a crate).
fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(basic_auth("u", "p"), "Basic dTpw");
    }
}
