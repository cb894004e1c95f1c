//! The TLS listener (cargo feature `tls`) with a real handshake from a client nobody here
//! wrote: mosquitto_pub with a self-signed certificate made by openssl for the test.
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use broker::{Config, Role, TlsConfig, User};

fn free_addr() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A self-signed certificate for `cn` (valid for localhost and 127.0.0.1), made by openssl.
fn self_signed(cert: &std::path::Path, key: &std::path::Path, cn: &str) {
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={cn}"),
        ])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl (tests/run.sh installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_publishes_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    self_signed(&cert, &key, "localhost");
    let tls = free_addr();
    let config = Config {
        listen: free_addr(),
        listen_v5: None,
        users: vec![User::new("alice", "s3cret", Role::Admin)],
        tls: Some(TlsConfig {
            listen: tls,
            cert_file: cert.clone(),
            key_file: key,
            ca_file: None,
        }),
        health_listen: None,
        ..Config::default()
    };
    let mut started = broker::start(&config).unwrap();
    started.wait_ready(Duration::from_secs(10)).await.unwrap();
    let port = tls.port().to_string();
    let publish = |password: &str, cafile: &std::path::Path| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &port,
                "-u",
                "alice",
                "-P",
                password,
                "-t",
                "wattbus/v1/lab/meas/a/b",
                "-m",
                "over tls",
                "-q",
                "1",
            ])
            .arg("--cafile")
            .arg(cafile)
            .output()
            .expect("mosquitto_pub (tests/run.sh installs mosquitto-clients)")
    };
    let ok = publish("s3cret", &cert);
    assert!(
        ok.status.success(),
        "TLS publish failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Authentication still applies behind TLS.
    assert!(
        !publish("guess", &cert).status.success(),
        "a wrong password was accepted over TLS"
    );
    // A client that does not trust the certificate cannot connect.
    let other = dir.path().join("other.pem");
    self_signed(&other, &dir.path().join("other.key"), "other");
    assert!(
        !publish("s3cret", &other).status.success(),
        "an untrusted certificate was accepted"
    );
}
