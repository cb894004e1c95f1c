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
        .split_once(char::is_whitespace)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("digest"))
        .map(|(_, rest)| rest)
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

/// `key=value` and `key="quoted, \"value\""` pairs, comma separated (RFC 7235's
/// auth-params); a parameter without a value is skipped.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        // The key, up to `=` or `,`.
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        let key = key.trim().to_string();
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => {}
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(escaped) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
            // Up to the next comma.
            for c in chars.by_ref() {
                if c == ',' {
                    break;
                }
            }
        } else {
            for c in chars.by_ref() {
                if c == ',' {
                    break;
                }
                value.push(c);
            }
        }
        if !key.is_empty() {
            out.push((key, value.trim().to_string()));
        }
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
        // Escaped quotes, another case, a parameter without a value.
        let c = parse_challenge(
            "DIGEST stale, realm=\"shelly\\\"plug, 1\", qop=\"auth\", nonce=\"n\", algorithm=SHA-256",
        )
        .unwrap();
        assert_eq!(
            (c.realm.as_str(), c.nonce.as_str()),
            ("shelly\"plug, 1", "n")
        );
        assert!(parse_challenge(r#"Digest realm="x", nonce="y", algorithm=SHA-256"#).is_err());
    }
}
