//! Device connection strings and SAS tokens, as Microsoft documents them ("Control access to
//! IoT Hub with shared access signatures"). Pure: no clock, no I/O.
//!
//! ```text
//! resource  = {hub}.azure-devices.net/devices/{deviceId}
//! to sign   = urlencode(resource) + "\n" + expiry            (expiry: Unix seconds)
//! signature = urlencode(base64(HMAC-SHA256(base64decode(key), to sign)))
//! password  = SharedAccessSignature sr={urlencode(resource)}&sig={signature}&se={expiry}[&skn={policy}]
//! username  = {hub}.azure-devices.net/{deviceId}/?api-version=2021-04-12
//! ```

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// The MQTT API version wattbus speaks (Microsoft's current one for devices).
pub const API_VERSION: &str = "2021-04-12";

/// A device's identity and credentials, from a connection string
/// (`HostName=…;DeviceId=…;SharedAccessKey=…`).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `{hub}.azure-devices.net` (or an IoT Edge gateway's name).
    pub host_name: String,
    pub device_id: String,
    pub credential: Credential,
}

/// How the device proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The device's own symmetric key (decoded from base64).
    DeviceKey(Vec<u8>),
    /// A hub-level shared access policy (`SharedAccessKeyName`): the token names it (`skn`).
    Policy { name: String, key: Vec<u8> },
    /// `x509=true`: the TLS client certificate is the credential; no password is sent.
    X509,
}

impl fmt::Debug for Credential {
    /// Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::DeviceKey(_) => f.write_str("DeviceKey(***)"),
            Credential::Policy { name, .. } => write!(f, "Policy({name}, ***)"),
            Credential::X509 => f.write_str("X509"),
        }
    }
}

impl fmt::Debug for ConnectionString {
    /// Never the key: a connection string is a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.credential {
            Credential::DeviceKey(_) => "device key",
            Credential::Policy { .. } => "shared access policy",
            Credential::X509 => "x509",
        };
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("credential", &kind)
            .finish()
    }
}

/// What is wrong with a connection string (never quoting the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("`{0}` is not `Key=value` (parts are separated by `;`)")]
    NotKeyValue(String),
    #[error("`{0}` is missing")]
    Missing(&'static str),
    #[error("`{0}` is given twice")]
    Twice(String),
    #[error(
        "`{0}` is not a key IoT Hub connection strings have (HostName, DeviceId, SharedAccessKey, SharedAccessKeyName, GatewayHostName, ModuleId, x509)"
    )]
    Unknown(String),
    #[error(
        "SharedAccessKey is not base64: copy it again from the portal or `az iot hub device-identity connection-string show`"
    )]
    KeyNotBase64,
    #[error("`{0}` is empty")]
    Empty(&'static str),
    #[error("a SharedAccessKey and x509=true are both given; use one")]
    KeyAndX509,
    #[error(
        "ModuleId is given: azure-bridge connects as a device, not a module; use the device's connection string"
    )]
    Module,
    #[error(
        "DeviceId `{0}` has characters IoT Hub does not allow (letters, digits and -.%_*?!(),:=@$' only, at most 128)"
    )]
    BadDeviceId(String),
}

impl ConnectionString {
    /// Parse a connection string as the Azure portal and `az` print it. Keys are matched
    /// case-insensitively; whitespace around the whole string (a file's newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut host = None;
        let mut device = None;
        let mut key = None;
        let mut key_name = None;
        let mut gateway = None;
        let mut x509 = false;
        for part in text.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| ParseError::NotKeyValue(part.chars().take(40).collect()))?;
            let k = k.trim();
            let slot = match k.to_ascii_lowercase().as_str() {
                "hostname" => &mut host,
                "deviceid" => &mut device,
                "sharedaccesskey" => &mut key,
                "sharedaccesskeyname" => &mut key_name,
                "gatewayhostname" => &mut gateway,
                "x509" => {
                    x509 = v.trim().eq_ignore_ascii_case("true");
                    continue;
                }
                "moduleid" => return Err(ParseError::Module),
                _ => return Err(ParseError::Unknown(k.to_string())),
            };
            if slot.is_some() {
                return Err(ParseError::Twice(k.to_string()));
            }
            // Base64 keys end in `=`: only the first `=` separates.
            *slot = Some(v.trim().to_string());
        }
        let host_name = host.ok_or(ParseError::Missing("HostName"))?;
        let device_id = device.ok_or(ParseError::Missing("DeviceId"))?;
        if host_name.is_empty() {
            return Err(ParseError::Empty("HostName"));
        }
        check_device_id(&device_id)?;
        // An IoT Edge gateway: connect to it, sign for the hub.
        let _ = gateway;
        let credential = match (key, x509) {
            (Some(_), true) => return Err(ParseError::KeyAndX509),
            (None, true) => Credential::X509,
            (None, false) => return Err(ParseError::Missing("SharedAccessKey")),
            (Some(k), false) => {
                if k.is_empty() {
                    return Err(ParseError::Empty("SharedAccessKey"));
                }
                let key = STANDARD.decode(k).map_err(|_| ParseError::KeyNotBase64)?;
                match key_name {
                    Some(name) => Credential::Policy { name, key },
                    None => Credential::DeviceKey(key),
                }
            }
        };
        Ok(Self {
            host_name,
            device_id,
            credential,
        })
    }

    /// The MQTT user name IoT Hub expects.
    pub fn username(&self) -> String {
        username(&self.host_name, &self.device_id)
    }

    /// `{host}/devices/{deviceId}`, what a SAS token grants.
    pub fn resource_uri(&self) -> String {
        format!("{}/devices/{}", self.host_name, self.device_id)
    }

    /// The MQTT password, valid until `expiry` (Unix seconds); `None` for X.509.
    pub fn password(&self, expiry: u64) -> Option<String> {
        match &self.credential {
            Credential::DeviceKey(key) => Some(sas_token(&self.resource_uri(), key, expiry, None)),
            Credential::Policy { name, key } => {
                Some(sas_token(&self.resource_uri(), key, expiry, Some(name)))
            }
            Credential::X509 => None,
        }
    }
}

/// `{host}/{deviceId}/?api-version=…`.
pub fn username(host: &str, device_id: &str) -> String {
    format!("{host}/{device_id}/?api-version={API_VERSION}")
}

/// IoT Hub's device id rule: up to 128 of ASCII letters, digits and `-.%_*?!(),:=@$'`.
fn check_device_id(id: &str) -> Result<(), ParseError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.%_*?!(),:=@$'".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ParseError::BadDeviceId(id.chars().take(140).collect()))
    }
}

/// A SAS token for `resource_uri`, valid until `expiry` (Unix seconds).
pub fn sas_token(resource_uri: &str, key: &[u8], expiry: u64, policy: Option<&str>) -> String {
    let sr = url_encode(resource_uri);
    let to_sign = format!("{sr}\n{expiry}");
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&hmac, to_sign.as_bytes());
    let sig = url_encode(&STANDARD.encode(tag.as_ref()));
    let mut token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(name) = policy {
        token.push_str("&skn=");
        token.push_str(&url_encode(name));
    }
    token
}

/// Percent-encoding of everything but RFC 3986's unreserved characters, as .NET's
/// `WebUtility.UrlEncode` and Python's `urllib.parse.quote(s, safe="")` agree on for the
/// characters a resource URI and a base64 signature contain (`/`, `+`, `=`, `:`).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The parts of a SAS token, for checking one (the tests' hub, `wattbus azure sas --check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenParts {
    pub sr: String,
    pub sig: String,
    pub se: u64,
    pub skn: Option<String>,
}

/// Split `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` (values left encoded).
pub fn parse_token(token: &str) -> Option<TokenParts> {
    let rest = token.strip_prefix("SharedAccessSignature ")?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for part in rest.split('&') {
        let (k, v) = part.split_once('=')?;
        match k {
            "sr" => sr = Some(v.to_string()),
            "sig" => sig = Some(v.to_string()),
            "se" => se = v.parse().ok(),
            "skn" => skn = Some(v.to_string()),
            _ => return None,
        }
    }
    Some(TokenParts {
        sr: sr?,
        sig: sig?,
        se: se?,
        skn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_B64: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLW9ubHk=";

    #[test]
    fn parses_a_portal_connection_string() {
        let cs = ConnectionString::parse(&format!(
            "HostName=myhub.azure-devices.net;DeviceId=pi-kitchen;SharedAccessKey={KEY_B64}\n"
        ))
        .unwrap();
        assert_eq!(cs.host_name, "myhub.azure-devices.net");
        assert_eq!(cs.device_id, "pi-kitchen");
        assert_eq!(
            cs.username(),
            "myhub.azure-devices.net/pi-kitchen/?api-version=2021-04-12"
        );
        assert!(!format!("{cs:?}").contains(KEY_B64));
    }

    #[test]
    fn a_bad_connection_string_says_what_is_wrong_without_the_key() {
        let e = |s: &str| ConnectionString::parse(s).unwrap_err().to_string();
        assert!(e("HostName=h;SharedAccessKey=abc=").contains("DeviceId"));
        assert!(e("HostName=h;DeviceId=d;SharedAccessKey=***").contains("not base64"));
        assert!(e("HostName=h;DeviceId=d").contains("SharedAccessKey"));
        assert!(e("HostName=h;DeviceId=d;Foo=1").contains("Foo"));
        assert!(e("HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=YQ==").contains("module"));
        assert!(e("HostName=h;DeviceId=a/b;SharedAccessKey=YQ==").contains("a/b"));
        let x = ConnectionString::parse("HostName=h;DeviceId=d;x509=true").unwrap();
        assert_eq!(x.credential, Credential::X509);
        assert_eq!(x.password(1), None);
    }

    #[test]
    fn a_token_has_the_documented_shape_and_parses_back() {
        let cs = ConnectionString::parse(&format!(
            "HostName=h.azure-devices.net;DeviceId=d1;SharedAccessKey={KEY_B64}"
        ))
        .unwrap();
        let t = cs.password(1_700_000_000).unwrap();
        let p = parse_token(&t).unwrap();
        assert_eq!(p.sr, "h.azure-devices.net%2Fdevices%2Fd1");
        assert_eq!(p.se, 1_700_000_000);
        assert_eq!(p.skn, None);
        // The signature is urlencoded base64 of a 32-byte HMAC: 44 characters, `=` as %3D.
        assert!(p.sig.ends_with("%3D"), "{}", p.sig);
    }

    #[test]
    fn url_encoding_matches_python_quote_with_no_safe_characters() {
        assert_eq!(url_encode("a/b+c=d:e f"), "a%2Fb%2Bc%3Dd%3Ae%20f");
        assert_eq!(url_encode("AZaz09-_.~"), "AZaz09-_.~");
    }
}
