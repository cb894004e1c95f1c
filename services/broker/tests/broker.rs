//! The broker against real MQTT clients (rumqttc, v4 and v5) on loopback ports.
//!
//! Every test starts its own broker on free ports; rumqttd cannot be stopped, so the brokers
//! live until the test binary exits. Metrics are process-wide, so the tests that count them
//! live in `metrics.rs`, a process of their own.

// Helpers outside #[test] fns panic on a failed setup just like the tests themselves;
// clippy's allow-unwrap-in-tests only covers the test functions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use broker::{Config, Role, Started, User};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use runtime::telemetry::Gauge;
use runtime::{ConfigSource, Context, Health, shutdown};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

fn free_addr() -> SocketAddr {
    // Never the same port twice in one process, and outside the ephemeral range.
    SocketAddr::from((Ipv4Addr::LOCALHOST, wattbus_testkit::free_port()))
}

fn user(name: &str, password: &str) -> User {
    User::new(name, password, Role::Admin)
}

/// A config on free loopback ports, with users alice/s3cret and bob/hunter2.
fn config() -> Config {
    Config {
        listen: free_addr(),
        listen_v5: Some(free_addr()),
        users: vec![user("alice", "s3cret"), user("bob", "hunter2")],
        health_listen: None,
        ..Config::default()
    }
}

async fn started(config: &Config) -> Started {
    let mut started = broker::start(config).unwrap();
    started.wait_ready(WAIT).await.unwrap();
    started
}

fn client(
    config: &Config,
    id: &str,
    credentials: Option<(&str, &str)>,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, config.listen.ip().to_string(), config.listen.port());
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    AsyncClient::new(opts, 10)
}

/// The first thing the event loop yields: the ConnAck, or the error that ended the attempt.
async fn first_event(eventloop: &mut EventLoop) -> Result<Event, ConnectionError> {
    timeout(WAIT, eventloop.poll())
        .await
        .expect("no answer from the broker within 5 s")
}

fn assert_refused(first: Result<Event, ConnectionError>) {
    match first {
        Err(ConnectionError::ConnectionRefused(code)) => {
            panic!("expected the connection to be dropped, got a CONNACK refusal {code:?}")
        }
        Err(_dropped) => {}
        Ok(event) => panic!("expected no CONNACK, got {event:?}"),
    }
}

async fn connects(config: &Config, id: &str, credentials: Option<(&str, &str)>) -> bool {
    let (_client, mut eventloop) = client(config, id, credentials);
    matches!(
        first_event(&mut eventloop).await,
        Ok(Event::Incoming(Packet::ConnAck(_)))
    )
}

#[tokio::test]
async fn a_user_with_the_right_password_receives_its_own_qos1_message() {
    let config = config();
    let _broker = started(&config).await;
    let (client, mut eventloop) = client(&config, "alice-1", Some(("alice", "s3cret")));
    // Queued before the connection exists; sent in order once it does.
    client
        .subscribe("wattbus/test/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("wattbus/test/echo", QoS::AtLeastOnce, false, "42 W")
        .await
        .unwrap();

    let received = timeout(WAIT, async {
        loop {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("own message not received within 5 s");
    assert_eq!(received.topic, "wattbus/test/echo");
    assert_eq!(&received.payload[..], b"42 W");
    assert_eq!(received.qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn a_wrong_password_gets_the_connection_dropped() {
    let config = config();
    let _broker = started(&config).await;
    let (_client, mut eventloop) = client(&config, "mallory", Some(("alice", "wrong")));
    assert_refused(first_event(&mut eventloop).await);
    // The same user with the right password still gets in.
    assert!(connects(&config, "alice-2", Some(("alice", "s3cret"))).await);
}

#[tokio::test]
async fn an_unknown_user_is_refused() {
    let config = config();
    let _broker = started(&config).await;
    let (_client, mut eventloop) = client(&config, "eve", Some(("eve", "s3cret")));
    assert_refused(first_event(&mut eventloop).await);
}

#[tokio::test]
async fn no_credentials_are_refused_while_authentication_is_on() {
    let config = config();
    let _broker = started(&config).await;
    let (_client, mut eventloop) = client(&config, "anon", None);
    assert_refused(first_event(&mut eventloop).await);
}

#[tokio::test]
async fn allow_anonymous_without_users_lets_anyone_connect() {
    let config = Config {
        allow_anonymous: true,
        users: Vec::new(),
        ..config()
    };
    let _broker = started(&config).await;
    assert!(connects(&config, "anon", None).await);
}

#[tokio::test]
async fn allow_anonymous_with_users_checks_no_password() {
    // rumqttd cannot mix anonymous and authenticated clients; this pins down what the config
    // doc promises: anonymous wins, and credentials are not checked.
    let config = Config {
        allow_anonymous: true,
        ..config()
    };
    let _broker = started(&config).await;
    assert!(connects(&config, "anon", None).await);
    assert!(connects(&config, "alice-3", Some(("alice", "not-her-password"))).await);
}

#[tokio::test]
async fn a_password_file_works_like_an_inline_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carol.pw");
    std::fs::write(&path, "from-a-file\n").unwrap();
    let mut config = config();
    config.users.push(User {
        password: None,
        password_file: Some(path),
        ..User::new("carol", "unused", Role::Reader)
    });
    let _broker = started(&config).await;
    assert!(connects(&config, "carol-1", Some(("carol", "from-a-file"))).await);
}

#[tokio::test]
async fn the_v5_listener_accepts_a_v5_client_with_credentials() {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::v5::Packet};

    let config = config();
    let _broker = started(&config).await;
    let v5 = config.listen_v5.unwrap();
    let mut opts = MqttOptions::new("alice-v5", v5.ip().to_string(), v5.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_credentials("alice", "s3cret");
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    let first = timeout(WAIT, eventloop.poll())
        .await
        .expect("no answer within 5 s");
    match first {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
            assert_eq!(
                ack.code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
            )
        }
        other => panic!("expected a ConnAck, got {other:?}"),
    }
}

#[tokio::test]
async fn run_becomes_ready_and_returns_when_shutdown_fires() {
    let config = config();
    let health = Health::default();
    let (trigger, shutdown) = shutdown::channel();
    // Registered before `run` starts (it gets the same flag), so that `is_ready` is not
    // vacuously true while no check exists yet.
    let _flag = health.check("broker");
    assert!(!health.is_ready());
    let ctx = Context {
        common: runtime::Common::default(),
        health: health.clone(),
        shutdown,
    };
    // As `wattbus run broker` runs it: with its core metrics.
    let task = tokio::spawn(runtime::service::run::<broker::Broker>(
        config.clone().resolve(broker::SECTION).unwrap(),
        ctx,
    ));
    // Only this test calls `run` in this binary, so the process-wide gauge is its own.
    let up = Gauge::new("wattbus_up", "", &[("service", "broker")]);

    timeout(WAIT, async {
        while !health.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("broker not ready within 5 s");
    assert!(
        connects(&config, "bob-1", Some(("bob", "hunter2"))).await,
        "ready but not serving"
    );
    assert_eq!(up.get(), 1.0);

    trigger.fire();
    let result = timeout(WAIT, task)
        .await
        .expect("run did not return within 5 s")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(!health.is_ready(), "still ready after shutdown");
    assert_eq!(up.get(), 0.0);
}

#[tokio::test]
async fn a_port_in_use_is_an_error_naming_the_listener() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let config = Config {
        listen_v5: Some(taken.local_addr().unwrap()),
        ..config()
    };
    match broker::start(&config) {
        Err(broker::Error::Bind { listener, .. }) => assert_eq!(listener, broker::V5_LISTENER),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

// Configuration, parsed from TOML the way the `wattbus` binary does.

fn parse(toml: &str) -> Result<broker::Plan, runtime::ConfigError> {
    ConfigSource::from_parts(None, Some(toml))?.resolve::<broker::Broker>()
}

#[test]
fn defaults_with_one_user_are_valid_and_listen_on_loopback_only() {
    let config =
        parse("[[broker.users]]\nusername = \"alice\"\npassword = \"s3cret\"\nrole = \"admin\"\n")
            .unwrap();
    assert_eq!(config.listen, "127.0.0.1:1883".parse().unwrap());
    assert_eq!(config.listen_v5, None, "v5 is off unless configured");
    assert!(!config.allow_anonymous);
    assert_eq!(config.segment_bytes, 2 << 20);
    assert_eq!(config.segment_count, 4);
    assert_eq!(
        config.health_listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
}

#[test]
fn no_users_without_anonymous_is_an_error_naming_broker_users() {
    let e = parse("[broker]\nallow_anonymous = false\n").unwrap_err();
    assert_eq!(e.key, "broker.users");
    assert!(e.reason.contains("nobody could connect"), "{e}");
    // A missing section means defaults, which are just as unusable.
    assert_eq!(parse("").unwrap_err().key, "broker.users");
}

#[test]
fn duplicate_usernames_are_an_error() {
    let e = parse(
        "[[broker.users]]\nusername = \"alice\"\npassword = \"a\"\nrole = \"admin\"\n\
         [[broker.users]]\nusername = \"alice\"\npassword = \"b\"\nrole = \"admin\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "broker.users[1].username");
    assert!(e.reason.contains("broker.users[0]"), "{e}");
}

#[test]
fn an_empty_username_is_an_error() {
    let e = parse("[[broker.users]]\nusername = \"\"\npassword = \"a\"\nrole = \"admin\"\n")
        .unwrap_err();
    assert_eq!(e.key, "broker.users[0].username");
}

#[test]
fn a_user_without_any_password_is_an_error() {
    let e = parse("[[broker.users]]\nusername = \"alice\"\nrole = \"admin\"\n").unwrap_err();
    assert_eq!(e.key, "broker.users[0].password");
}

#[test]
fn segment_bytes_below_1024_is_an_error_naming_the_key() {
    let e = parse("[broker]\nallow_anonymous = true\nsegment_bytes = 1023\n").unwrap_err();
    assert_eq!(e.key, "broker.segment_bytes");
    // And start() refuses it too, instead of letting rumqttd's router thread panic.
    let config = Config {
        segment_bytes: 512,
        allow_anonymous: true,
        ..config()
    };
    assert!(
        matches!(broker::start(&config), Err(broker::Error::Config(e)) if e.key == "broker.segment_bytes")
    );
}

#[test]
fn a_missing_password_file_is_an_error_naming_the_key() {
    let e = parse(
        "[[broker.users]]\nusername = \"alice\"\npassword_file = \"/nonexistent/alice.pw\"\n\
         role = \"admin\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "broker.users[0].password_file");
    assert!(e.reason.contains("/nonexistent/alice.pw"), "{e}");
}

#[test]
#[cfg(not(feature = "tls"))]
fn a_tls_section_without_the_tls_feature_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, "x").unwrap();
    std::fs::write(&key, "x").unwrap();
    let e = parse(&format!(
        "[broker]\nallow_anonymous = true\n[broker.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    ))
    .unwrap_err();
    assert_eq!(e.key, "broker.tls");
    assert!(e.reason.contains("--features tls"), "{e}");
}

#[test]
#[cfg(feature = "tls")]
fn tls_files_must_exist() {
    let e = parse(
        "[broker]\nallow_anonymous = true\n[broker.tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "broker.tls.cert_file");
}

#[test]
fn unknown_keys_are_refused() {
    let e = parse("[broker]\nallow_anonymous = true\nmax_conections = 3\n").unwrap_err();
    assert_eq!(e.key, "broker.max_conections");
    let e = parse("[[broker.users]]\nusername = \"a\"\npassword = \"b\"\nrol = \"admin\"\n")
        .unwrap_err();
    assert!(e.key.ends_with("rol"), "{e}");
}

#[test]
fn a_user_without_a_role_is_an_error_naming_the_key_and_the_roles() {
    let e = parse("[[broker.users]]\nusername = \"a\"\npassword = \"b\"\n").unwrap_err();
    assert_eq!(e.key, "broker.users[0].role");
    assert!(
        e.reason.contains(
            "producer, sink, processor, actuator, commander, cloud-bridge, homeassistant, tasmota, reader, admin"
        ),
        "{e}"
    );
    let e = parse(
        "[[broker.users]]\nusername = \"a\"\npassword = \"b\"\nrole = \"admin\"\n\
         [[broker.users]]\nusername = \"c\"\npassword = \"d\"\nrole = \"superuser\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "broker.users[1].role");
    assert!(e.reason.contains("\"superuser\" is not a role"), "{e}");
    assert!(e.reason.contains("reader"), "{e}");
}

#[test]
fn devices_are_for_producers_and_processors_and_must_be_topic_levels() {
    let base = "[[broker.users]]\nusername = \"a\"\npassword = \"b\"\n";
    let ok = parse(&format!(
        "{base}role = \"producer\"\ndevices = [\"we515-1\"]\n"
    ))
    .unwrap();
    assert_eq!(ok.users[0].devices, Some(vec!["we515-1".to_string()]));
    let e = parse(&format!("{base}role = \"sink\"\ndevices = [\"we515-1\"]\n")).unwrap_err();
    assert_eq!(e.key, "broker.users[0].devices");
    assert!(e.reason.contains("a sink has no devices"), "{e}");
    let e = parse(&format!(
        "{base}role = \"producer\"\ndevices = [\"we/1\"]\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "broker.users[0].devices");
}

#[test]
fn a_username_must_be_a_topic_level() {
    let e = parse(
        "[[broker.users]]\nusername = \"influx writer\"\npassword = \"b\"\nrole = \"sink\"\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "broker.users[0].username");
    assert!(e.reason.contains("topic level"), "{e}");
}
