//! The TLS listener (cargo feature `tls`) with a real handshake from a client nobody here
//! wrote: mosquitto_pub with a self-signed certificate made by openssl for the test.
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use broker::{Config, Role, TlsConfig, User};

fn free_addr() -> SocketAddr {
    // Never the same port twice in one process, and outside the ephemeral range.
    SocketAddr::from((Ipv4Addr::LOCALHOST, wattbus_testkit::free_port()))
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

/// A broker with a TLS listener on a certificate made for the test; `(config, cert, dir)`.
async fn tls_broker(connection_timeout_ms: u16) -> (Config, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    self_signed(&cert, &key, "localhost");
    let config = Config {
        listen: free_addr(),
        listen_v5: None,
        users: vec![User::new("alice", "s3cret", Role::Admin)],
        tls: Some(TlsConfig {
            listen: free_addr(),
            cert_file: cert.clone(),
            key_file: key,
            ca_file: None,
        }),
        health_listen: None,
        connection_timeout_ms,
        ..Config::default()
    };
    let mut started = broker::start(&config).unwrap();
    started.wait_ready(Duration::from_secs(10)).await.unwrap();
    (config, cert, dir)
}

/// mosquitto_pub over TLS to `port`, given up after 20 s (it would wait for ever on a listener
/// that does not answer).
fn publish(port: u16, password: &str, cafile: &std::path::Path) -> std::process::Output {
    Command::new("timeout")
        .arg("20")
        .arg("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string()])
        .args(["-u", "alice", "-P", password])
        .args(["-t", "wattbus/v1/lab/meas/a/b", "-m", "over tls", "-q", "1"])
        .arg("--cafile")
        .arg(cafile)
        .output()
        .expect("mosquitto_pub (tests/run.sh installs mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_publishes_over_tls_with_a_password() {
    let (config, cert, dir) = tls_broker(5000).await;
    let port = config.tls.as_ref().unwrap().listen.port();
    let ok = publish(port, "s3cret", &cert);
    assert!(
        ok.status.success(),
        "TLS publish failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Authentication still applies behind TLS.
    assert!(
        !publish(port, "guess", &cert).status.success(),
        "a wrong password was accepted over TLS"
    );
    // A client that does not trust the certificate cannot connect.
    let other = dir.path().join("other.pem");
    self_signed(&other, &dir.path().join("other.key"), "other");
    assert!(
        !publish(port, "s3cret", &other).status.success(),
        "an untrusted certificate was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_starts_its_handshake_keeps_nobody_out_and_is_closed() {
    let (config, cert, _dir) = tls_broker(3000).await;
    let tls = config.tls.as_ref().unwrap().listen;
    // Connected, and silent: no ClientHello. The listener once awaited this handshake before
    // accepting anybody else, with no time limit.
    let mut idle = tokio::net::TcpStream::connect(tls).await.unwrap();
    let ok = publish(tls.port(), "s3cret", &cert);
    assert!(
        ok.status.success(),
        "a TLS client was kept out by an idle socket: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // And the idle socket is closed after the connection timeout (3 s).
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut idle, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle socket was never closed");
}
