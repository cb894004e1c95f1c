//! HTTP digest authentication with SHA-256 (RFC 7616), as Shelly Gen2 plugs ask for it when a
//! password is set: user `admin`, `qop="auth"`, `algorithm=SHA-256` (pure: no I/O).

use std::fmt::Write as _;

/// A `WWW-Authenticate: Digest …` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
}

/// The Digest challenge in a `WWW-Authenticate` value; `Err` says why it cannot be answered.
pub fn parse_challenge(header: &str) -> Result<Challenge, String> {
    let rest = header
        .trim()
        .strip_prefix("Digest ")
        .or_else(|| header.trim().strip_prefix("digest "))
        .ok_or_else(|| format!("not a digest challenge: {header:?}"))?;
    let mut realm = None;
    let mut nonce = None;
    let mut opaque = None;
    let mut algorithm = String::from("MD5");
    let mut qop = None;
    for (k, v) in params(rest) {
        match k.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(v),
            "nonce" => nonce = Some(v),
            "opaque" => opaque = Some(v),
            "algorithm" => algorithm = v,
            "qop" => qop = Some(v),
            _ => {}
        }
    }
    if !algorithm.eq_ignore_ascii_case("SHA-256") {
        return Err(format!(
            "the plug asks for digest algorithm {algorithm}; only SHA-256 (Shelly Gen2's) is supported"
        ));
    }
    if !qop
        .as_deref()
        .is_some_and(|q| q.split(',').any(|q| q.trim() == "auth"))
    {
        return Err("the plug's digest challenge does not offer qop=auth".into());
    }
    Ok(Challenge {
        realm: realm.ok_or("the digest challenge has no realm")?,
        nonce: nonce.ok_or("the digest challenge has no nonce")?,
        opaque,
    })
}

/// `key=value` and `key="quoted, value"` pairs, comma separated.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

fn sha256_hex(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The `Authorization` value answering `c` for `method uri`, the `nc`-th use of its nonce.
pub fn authorization(
    c: &Challenge,
    user: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    let ha1 = sha256_hex(&format!("{user}:{}:{password}", c.realm));
    let ha2 = sha256_hex(&format!("{method}:{uri}"));
    let nc = format!("{nc:08x}");
    let response = sha256_hex(&format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", c.nonce));
    let mut v = format!(
        "Digest username=\"{user}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", algorithm=SHA-256, response=\"{response}\", qop=auth, nc={nc}, cnonce=\"{cnonce}\"",
        c.realm, c.nonce
    );
    if let Some(o) = &c.opaque {
        let _ = write!(v, ", opaque=\"{o}\"");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7616, 3.9.1: the SHA-256 example.
    #[test]
    fn the_rfc_example() {
        let c = parse_challenge(
            r#"Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#,
        )
        .unwrap();
        assert_eq!(c.realm, "http-auth@example.org");
        let a = authorization(
            &c,
            "Mufasa",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            1,
            "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        );
        assert!(
            a.contains(
                r#"response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1""#
            ),
            "{a}"
        );
        assert!(
            a.contains("nc=00000001") && a.contains(r#"opaque="FQhe"#),
            "{a}"
        );
    }

    #[test]
    fn what_cannot_be_answered_is_said() {
        // Shelly's own challenge.
        let c = parse_challenge(
            r#"Digest qop="auth", realm="shellyplusplugs-e465b8b961a4", nonce="1700000000", algorithm=SHA-256"#,
        )
        .unwrap();
        assert_eq!(c.nonce, "1700000000");
        assert!(
            parse_challenge(r#"Digest realm="x", nonce="y", qop="auth""#)
                .unwrap_err()
                .contains("MD5")
        );
        assert!(parse_challenge(r#"Basic realm="x""#).is_err());
        assert!(parse_challenge(r#"Digest realm="x", nonce="y", algorithm=SHA-256"#).is_err());
    }
}
