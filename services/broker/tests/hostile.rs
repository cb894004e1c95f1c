//! Hostile and careless clients against the real broker (`broker::start`): each test ends by
//! checking that the broker still serves a publish/subscribe round trip and that rumqttd never
//! panicked (a panic is an abort in the release build; see `support`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use broker::Config;
use rumqttc::{QoS, SubscribeReasonCode};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout};

/// How long a message that must not arrive is waited for, after a later one that must did.
const GRACE: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_client_that_resets_and_reconnects_with_one_id_never_crashes_the_broker() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let connect = raw::connect("resetter", "tools", None);
    for _ in 0..200 {
        let stream = raw::dial(config.listen).await;
        let mut stream = stream;
        stream.write_all(&connect).await.unwrap();
        // SO_LINGER 0: close with a reset, before the CONNACK can be written.
        stream.set_zero_linger().unwrap();
        drop(stream);
    }
    // And once more the polite way, with the same id: it gets in.
    let (_stream, code) = raw::connack(config.listen, &connect).await;
    assert_eq!(code, Some(0));
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_refused_client_retrying_at_max_connections_does_not_crash_the_broker() {
    watch_panics();
    let config = Config {
        max_connections: 3,
        max_connections_per_user: 1,
        ..support::config()
    };
    let _broker = start(&config).await;
    let mut fillers = Vec::new();
    for i in 0..3 {
        fillers.push(connected(config.listen, &format!("filler-{i}"), "tools").await);
    }
    // A service that is refused retries ~170 ms later with the same client id.
    for _ in 0..5 {
        let (_stream, code) =
            raw::connack(config.listen, &raw::connect("retry", "tools", None)).await;
        assert_eq!(code, None, "no room: no CONNACK");
    }
    drop(fillers.pop());
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

/// One login (a reader's password on a dashboard, a stolen service password) must not take
/// every connection and lock the services out (hostile review: a reader held all 32).
#[tokio::test]
async fn one_user_cannot_take_every_connection() {
    watch_panics();
    let config = Config {
        max_connections: 6,
        max_connections_per_user: 3,
        ..support::config()
    };
    let _broker = start(&config).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(connected(config.listen, &format!("grafana-{i}"), "grafana").await);
    }
    for i in 3..6 {
        let (_stream, code) = raw::connack(
            config.listen,
            &raw::connect(&format!("grafana-{i}"), "grafana", None),
        )
        .await;
        assert_eq!(code, None, "a fourth connection of one user: no CONNACK");
    }
    // The services still get in, and an admin is not limited by the per-user count.
    held.push(connected(config.listen, "influx-writer", "influx-writer").await);
    held.push(connected(config.listen, "tools-1", "tools").await);
    held.push(connected(config.listen, "tools-2", "tools").await);
    // Once one of the user's connections is gone, it may connect again.
    drop(held.remove(0));
    let mut again = false;
    for _ in 0..100 {
        let (_stream, code) =
            raw::connack(config.listen, &raw::connect("grafana-9", "grafana", None)).await;
        if code.is_some() {
            again = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(again, "a connection freed by the user was not given back");
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn two_thousand_connections_leave_the_broker_serving_the_next_client() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let addr = config.listen;
        tasks.push(tokio::spawn(async move {
            // Ids repeat, as when refused services retry.
            let connect = raw::connect(&format!("flood-{}", i % 500), "tools", None);
            let (stream, code) = raw::connack(addr, &connect).await;
            (stream, code == Some(0))
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        let (stream, ok) = task.await.unwrap();
        if ok {
            accepted.push(stream);
        }
    }
    assert!(!accepted.is_empty(), "nobody got in");
    // A repeated id takes the earlier connection over, so more than max_connections got a
    // CONNACK; but no more than that are connected now.
    let checks: Vec<_> = accepted
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(
                async move { !raw::closed_within(&mut stream, Duration::from_secs(2)).await },
            )
        })
        .collect();
    let mut open = 0;
    for check in checks {
        open += usize::from(check.await.unwrap());
    }
    assert!(open <= config.max_connections, "{open} connected at once");
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

/// Before the login is checked, a client may not make the broker hold a large packet, nor
/// hold many connections waiting: 1,500 sockets each declaring a 1 MiB CONNECT took it to
/// 893 MB, and under a memory limit it aborted (fourth hostile review). A CONNECT declaring
/// more than 64 KiB is refused at its header; a real client still gets in during the flood.
/// Reads until the peer closes; `false` if it is still open after [`WAIT`].
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 16];
    timeout(WAIT, async {
        loop {
            match tokio::io::AsyncReadExt::read(stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn unauthenticated_clients_cannot_make_the_broker_hold_big_connects() {
    watch_panics();
    // Longer than the wait below: only a refusal at the header closes the connection in time.
    let config = Config {
        connection_timeout_ms: 30_000,
        ..support::config()
    };
    let _broker = start(&config).await;
    // CONNECT, remaining length 1,000,000 (varint 0xC0 0x84 0x3D), then a little body.
    let mut header = vec![
        0x10, 0xC0, 0x84, 0x3D, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2,
    ];
    header.extend_from_slice(&[0u8; 4000]);
    let mut stream = raw::dial(config.listen).await;
    stream.write_all(&header).await.unwrap();
    assert!(
        closed_by_peer(&mut stream).await,
        "a 1 MB CONNECT was not refused at its header"
    );
    // Many clients holding half a CONNECT: the broker closes those past its limit, memory
    // stays bounded, and a real client is served once they are gone.
    let mut held = Vec::new();
    for _ in 0..400 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(config.listen).await {
            let _ = s.write_all(&[0x10, 0xFF, 0xFF, 0x03]).await;
            held.push(s);
        }
    }
    drop(held);
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn sockets_that_never_log_in_keep_no_real_client_out() {
    watch_panics();
    // Far longer than the test: the idle sockets are not timed out, newer ones push them out.
    let config = Config {
        connection_timeout_ms: 60_000,
        ..support::config()
    };
    let _broker = start(&config).await;
    let per_source = runtime::telemetry::Counter::new(
        "wattbus_broker_waiting_closed_total",
        "",
        &[("limit", "per_source")],
    );
    let total = runtime::telemetry::Counter::new(
        "wattbus_broker_waiting_closed_total",
        "",
        &[("limit", "total")],
    );
    let (per_source_before, total_before) = (per_source.get(), total.get());

    // One source (127.0.0.1): 100 sockets that connect and send nothing. A bound that refused
    // the newest connection kept every login out while they were held.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(tokio::net::TcpStream::connect(config.listen).await.unwrap());
    }
    round_trip(config.listen).await;
    // All but the newest 16 of them were closed, oldest first.
    for (i, socket) in flood.iter_mut().take(100 - 16).enumerate() {
        assert!(closed_by_peer(socket).await, "idle socket {i} still open");
    }
    assert!(per_source.get() - per_source_before >= 100 - 16);

    // Many sources (127.0.0.2 to 127.0.0.10, 16 each, 144 in all): past the broker's 128.
    for host in 2..=10u8 {
        for _ in 0..16 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))
                .unwrap();
            flood.push(socket.connect(config.listen).await.unwrap());
        }
    }
    round_trip(config.listen).await;
    assert!(
        total.get() > total_before,
        "nothing closed for the broker's bound"
    );
    drop(flood);
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_connect_sent_one_byte_a_second_is_dropped_after_the_connection_timeout() {
    watch_panics();
    let config = Config {
        connection_timeout_ms: 1500,
        ..support::config()
    };
    let _broker = start(&config).await;
    let connect = raw::connect("slowloris", "tools", None);
    let mut stream = raw::dial(config.listen).await;
    let started = Instant::now();
    let (mut reader, mut writer) = stream.split();
    let slow = async {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        for byte in &connect {
            ticks.tick().await;
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let dropped = async {
        let mut buf = [0u8; 16];
        loop {
            match tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let others_served = round_trip(config.listen);
    let closed = timeout(WAIT, async {
        tokio::join!(
            async {
                tokio::select! {
                    () = slow => {}
                    () = dropped => {}
                }
            },
            others_served
        )
    })
    .await;
    assert!(
        closed.is_ok(),
        "the slow CONNECT was not dropped within {WAIT:?}"
    );
    let after = started.elapsed();
    assert!(
        after < Duration::from_secs(connect.len() as u64),
        "dropped only after {after:?}, when the CONNECT was complete"
    );
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_forged_acknowledgement_is_refused_and_never_reaches_the_producer() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let ack = topic("ack/serial-ingest/meas/influx-writer");
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    let codes = subscribe(&producer, &mut producer_loop, &[&topic("ack/#")]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // Another sink acknowledges on the writer's behalf: everything, forever.
    let forged = r#"{"sink":"influx-writer","ranges":[[1,18446744073709551615]],"ts_ms":0}"#;
    let (mallory, mut mallory_loop) = connected(config.listen, "csv-writer", "csv-writer").await;
    assert!(
        !publish_acked(&mallory, &mut mallory_loop, &ack, forged).await,
        "the forged acknowledgement was accepted"
    );
    // A reader cannot either.
    let (grafana, mut grafana_loop) = connected(config.listen, "grafana", "grafana").await;
    assert!(!publish_acked(&grafana, &mut grafana_loop, &ack, forged).await);

    // The writer's own acknowledgement goes through, and is the first the producer sees.
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    let real = r#"{"sink":"influx-writer","ranges":[[1,5]],"ts_ms":1}"#;
    assert!(publish_acked(&writer, &mut writer_loop, &ack, real).await);
    let got = next_publish(&mut producer_loop, WAIT).await;
    assert_eq!(got, Some((ack.clone(), real.as_bytes().to_vec())));
    assert_eq!(next_publish(&mut producer_loop, GRACE).await, None);
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn forged_readings_from_a_reader_or_a_sink_are_refused_and_never_stored() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let reading = topic("meas/we515-1/power_w");
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    let codes = subscribe(&writer, &mut writer_loop, &[&topic("meas/+/+")]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    for user in ["grafana", "csv-writer"] {
        let (forger, mut forger_loop) = connected(config.listen, user, user).await;
        assert!(
            !publish_acked(&forger, &mut forger_loop, &reading, "1e308").await,
            "{user} published a reading"
        );
    }
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    assert!(publish_acked(&producer, &mut producer_loop, &reading, "230.1").await);
    assert_eq!(
        next_publish(&mut writer_loop, WAIT).await,
        Some((reading.clone(), b"230.1".to_vec()))
    );
    assert_eq!(next_publish(&mut writer_loop, GRACE).await, None);
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

/// A sink acknowledges the origin a payload claims. A producer that publishes, on a topic it
/// may use, a payload claiming another producer's origin (even one that is no reading at all)
/// would have the real sink acknowledge that producer's readings, and the producer delete them
/// unstored. The broker refuses the publish; the sink never sees it.
#[tokio::test]
async fn a_payload_claiming_another_producers_origin_is_refused_and_never_reaches_a_sink() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    subscribe(&writer, &mut writer_loop, &[&topic("meas/+/+")]).await;
    let own = topic("meas/ct-1/current_a");
    for forged in [
        r#"{"origin":{"producer":"modbus-ingest","stream":"meas","seq":98}}"#,
        r#"{"origin":{"producer":"rms-processor","stream":"meas","seq":1},"site":"site-a","device":"ct-1"}"#,
        r#"{"origin":{"producer":"nobodys-producer","stream":"meas","seq":1}}"#,
    ] {
        let (forger, mut forger_loop) =
            connected(config.listen, "serial-ingest", "serial-ingest").await;
        assert!(
            !publish_acked(&forger, &mut forger_loop, &own, forged).await,
            "published {forged}"
        );
    }
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    let real = r#"{"origin":{"producer":"serial-ingest-north","stream":"meas","seq":1}}"#;
    assert!(publish_acked(&producer, &mut producer_loop, &own, real).await);
    assert_eq!(
        next_publish(&mut writer_loop, WAIT).await,
        Some((own, real.as_bytes().to_vec())),
        "only the payload claiming its own producer arrives"
    );
    assert_eq!(next_publish(&mut writer_loop, GRACE).await, None);
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_producer_restricted_to_its_devices_cannot_publish_another_device() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    subscribe(&writer, &mut writer_loop, &[&topic("meas/+/+")]).await;

    let (modbus, mut modbus_loop) =
        connected(config.listen, "modbus-ingest", "modbus-ingest").await;
    let other = topic("meas/we515-2/power_w");
    assert!(!publish_acked(&modbus, &mut modbus_loop, &other, "1").await);
    let (modbus, mut modbus_loop) =
        connected(config.listen, "modbus-ingest", "modbus-ingest").await;
    let own = topic("meas/we515-1/power_w");
    assert!(publish_acked(&modbus, &mut modbus_loop, &own, "2").await);
    assert_eq!(
        next_publish(&mut writer_loop, WAIT).await,
        Some((own, b"2".to_vec()))
    );
    assert_eq!(next_publish(&mut writer_loop, GRACE).await, None);
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_client_id_of_another_user_is_refused_and_its_owner_stays_connected() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    let status = topic("status/influx-writer");
    subscribe(&writer, &mut writer_loop, &[&status]).await;

    for id in ["influx-writer", "influx-writer-2"] {
        let (_stream, code) = raw::connack(config.listen, &raw::connect(id, "tools", None)).await;
        assert_eq!(code, None, "tools took over {id}");
    }
    // The owner's connection was not taken over: it still publishes and receives.
    assert!(publish_acked(&writer, &mut writer_loop, &status, "online").await);
    assert_eq!(
        next_publish(&mut writer_loop, WAIT).await,
        Some((status, b"online".to_vec()))
    );
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn one_refused_filter_refuses_the_whole_subscribe_with_failure_codes() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    let acks = topic("ack/#");
    let codes = subscribe(&producer, &mut producer_loop, &[&acks, "wattbus/#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Failure; 2]);
    // The allowed half was not subscribed either: an acknowledgement does not arrive …
    let ack = topic("ack/serial-ingest/meas/influx-writer");
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    assert!(publish_acked(&writer, &mut writer_loop, &ack, "1").await);
    assert_eq!(next_publish(&mut producer_loop, GRACE).await, None);
    // … until it is asked for alone.
    let codes = subscribe(&producer, &mut producer_loop, &[&acks]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    assert!(publish_acked(&writer, &mut writer_loop, &ack, "2").await);
    assert_eq!(
        next_publish(&mut producer_loop, WAIT).await,
        Some((ack, b"2".to_vec()))
    );
    // A shared subscription is judged by its filter.
    let codes = subscribe(
        &writer,
        &mut writer_loop,
        &[&format!("$share/influx-writer/{}", topic("meas/+/+"))],
    )
    .await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn nobody_else_joins_a_sinks_shared_group_to_take_its_readings() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let shared = format!("$share/influx-writer/{}", topic("meas/+/+"));
    // A reader (Grafana) and another sink each try to join influx-writer's group: in it they
    // would get every other reading, which influx-writer would then never store.
    for user in ["grafana", "csv-writer"] {
        let (client, mut eventloop) = connected(config.listen, user, user).await;
        let codes = subscribe(&client, &mut eventloop, &[&shared]).await;
        assert_eq!(
            codes,
            [SubscribeReasonCode::Failure],
            "{user} joined the group"
        );
        // Its own group is fine.
        let own = format!("$share/{user}/{}", topic("meas/+/+"));
        let codes = subscribe(&client, &mut eventloop, &[&own]).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    }
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    let codes = subscribe(&writer, &mut writer_loop, &[&shared]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    let reading = topic("meas/ct-1/a");
    for i in 0..6 {
        assert!(publish_acked(&producer, &mut producer_loop, &reading, &i.to_string()).await);
    }
    // The group is the writer alone: it gets all six.
    for i in 0..6 {
        assert_eq!(
            next_publish(&mut writer_loop, WAIT).await,
            Some((reading.clone(), i.to_string().into_bytes())),
        );
    }
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_will_the_role_does_not_allow_refuses_the_connection() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let forged_will = raw::connect(
        "grafana",
        "grafana",
        Some((&topic("meas/we515-1/power_w"), "0")),
    );
    let (_stream, code) = raw::connack(config.listen, &forged_will).await;
    assert_eq!(code, None, "a reader may not leave a reading as its will");
    let own_will = raw::connect(
        "serial-ingest",
        "serial-ingest",
        Some((&topic("status/serial-ingest"), "offline")),
    );
    let (_stream, code) = raw::connack(config.listen, &own_will).await;
    assert_eq!(code, Some(0));
    assert_rumqttd_never_panicked();
}

/// Bytes no MQTT client sends, to both listeners; the broker must shrug each off.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("zeros", vec![0; 64]),
        ("ones", vec![0xff; 64]),
        (
            "largest remaining length",
            vec![0x10, 0xff, 0xff, 0xff, 0x7f],
        ),
        (
            "five-byte remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        ("CONNACK", vec![0x20, 0x02, 0x00, 0x00]),
        ("UNSUBACK", vec![0xb0, 0x02, 0x00, 0x01]),
        ("SUBACK", vec![0x90, 0x03, 0x00, 0x01, 0x00]),
        ("PUBLISH first", raw::publish("wattbus/x", b"1")),
        ("DISCONNECT first", vec![0xe0, 0x00]),
        ("PINGREQ first", vec![0xc0, 0x00]),
        (
            "CONNECT, MQTT 3.1",
            raw::connect_with("old", "tools", None, 30, 3),
        ),
        (
            "CONNECT, keep-alive 0",
            raw::connect_with("ka0", "tools", None, 0, 4),
        ),
        (
            "CONNECT, empty id",
            raw::connect_with("", "tools", None, 30, 4),
        ),
        ("CONNECT, bad id", raw::connect("a/#", "tools", None)),
        (
            "truncated CONNECT",
            raw::connect("t", "tools", None)[..12].to_vec(),
        ),
        (
            "CONNECT, then garbage",
            [
                raw::connect("g", "tools", None),
                vec![0x30, 0x05, 0xff, 0xff, 0, 0, 0],
            ]
            .concat(),
        ),
        (
            "CONNECT, then a topic length past the packet",
            [
                raw::connect("h", "tools", None),
                vec![0x30, 0x03, 0x40, 0x00, 0x61],
            ]
            .concat(),
        ),
        (
            "CONNECT, then an empty SUBSCRIBE",
            [
                raw::connect("s", "tools", None),
                vec![0x82, 0x02, 0x00, 0x01],
            ]
            .concat(),
        ),
        (
            "CONNECT, then an UNSUBSCRIBE with a broken filter",
            [
                raw::connect("u", "tools", None),
                vec![0xa2, 0x05, 0x00, 0x01, 0x00, 0x09, 0x61],
            ]
            .concat(),
        ),
        (
            "CONNECT, then PUBACK for nothing",
            [
                raw::connect("p", "tools", None),
                vec![0x40, 0x02, 0x00, 0x07],
            ]
            .concat(),
        ),
        (
            "CONNECT, then a publish to an empty topic and to $SYS",
            [
                raw::connect("e", "tools", None),
                raw::publish("", b"x"),
                raw::publish("$SYS/x", b"x"),
            ]
            .concat(),
        ),
        (
            "CONNECT, then a subscribe to $SYS and to an empty filter",
            [
                raw::connect("f", "tools", None),
                raw::subscribe(1, &["$SYS/#", ""]),
            ]
            .concat(),
        ),
        (
            "v5 CONNECT on whichever listener",
            raw::connect_v5("v5", "tools"),
        ),
    ];
    // Random bytes, the same every run (xorshift).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200 {
        let mut bytes = Vec::new();
        let len = 1 + (x % 96) as usize;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        cases.push(("random", bytes));
    }
    cases
}

#[tokio::test]
async fn garbage_and_oversize_lengths_on_either_listener_leave_the_broker_serving() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let v5 = config.listen_v5.unwrap();
    for addr in [config.listen, v5] {
        for (what, bytes) in garbage() {
            let mut stream = raw::dial(addr).await;
            // The broker may close before it has read everything: a failed write is fine.
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            assert!(
                raw::closed_within(&mut stream, WAIT).await,
                "{what}: connection left open"
            );
        }
    }
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_topic_starting_with_a_multibyte_character_does_not_stop_the_router() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (tools, mut tools_loop) = connected(config.listen, "tools-1", "tools").await;
    subscribe(&tools, &mut tools_loop, &["#"]).await;
    for topic in ["é/x", "€", "日本/電力"] {
        assert!(publish_acked(&tools, &mut tools_loop, topic, "1").await);
        assert_eq!(
            next_publish(&mut tools_loop, WAIT).await,
            Some((topic.to_string(), b"1".to_vec()))
        );
    }
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_v5_publish_with_properties_reaches_a_v4_subscriber_without_them() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (v4, mut v4_loop) = connected(config.listen, "tools-v4", "tools").await;
    subscribe(&v4, &mut v4_loop, &["wattbus/test/props"]).await;

    let v5 = config.listen_v5.unwrap();
    let mut opts = rumqttc::v5::MqttOptions::new("tools-v5", v5.ip().to_string(), v5.port());
    opts.set_credentials("tools", PASSWORD);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    let properties = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "W".into())],
        message_expiry_interval: Some(60),
        ..PublishProperties::default()
    };
    client
        .publish_with_properties(
            "wattbus/test/props",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "42",
            properties,
        )
        .await
        .unwrap();
    let v5_driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    assert_eq!(
        next_publish(&mut v4_loop, WAIT).await,
        Some(("wattbus/test/props".into(), b"42".to_vec()))
    );
    v5_driver.abort();
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn two_filters_shared_under_one_group_each_deliver_every_message_once() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let (sink, mut sink_loop) = connected(config.listen, "tools-sink", "tools").await;
    let codes = subscribe(
        &sink,
        &mut sink_loop,
        &["$share/g/wattbus/test/a/+", "$share/g/wattbus/test/b/+"],
    )
    .await;
    assert_eq!(codes.len(), 2);
    let (source, mut source_loop) = connected(config.listen, "tools-source", "tools").await;
    // The two logs must not advance in step, or one group cursor would fit both by chance.
    let mut expected = Vec::new();
    for (kind, count) in [("a", 30), ("b", 10), ("a", 10), ("b", 30)] {
        for i in 0..count {
            let topic = format!("wattbus/test/{kind}/x");
            let payload = format!("{kind}{i}-{}", expected.len());
            assert!(publish_acked(&source, &mut source_loop, &topic, &payload).await);
            expected.push(payload);
        }
    }
    let mut received = Vec::new();
    while let Some((_, payload)) = next_publish(&mut sink_loop, Duration::from_secs(2)).await {
        received.push(String::from_utf8(payload).unwrap());
    }
    received.sort();
    expected.sort();
    assert_eq!(
        received, expected,
        "every message once, none lost, none twice"
    );
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_persistent_shared_subscriber_leaving_with_a_message_unacknowledged_does_not_stop_the_router()
 {
    // wattbus's broker keeps no sessions (see `forget_sessions`); rumqttd's own default does,
    // and there this client stopped the router.
    watch_panics();
    let config = config();
    let mut rumqttd_config = config.to_rumqttd().unwrap();
    rumqttd_config.router.forget_sessions = false;
    let mut broker = rumqttd::Broker::new(rumqttd_config);
    std::thread::spawn(move || {
        if let Err(e) = broker.start() {
            eprintln!("broker stopped: {e}");
        }
    });
    round_trip(config.listen).await;

    let mut opts = options(config.listen, "persistent", "tools");
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    let (subscriber, mut subscriber_loop) = connected_with(opts).await;
    subscribe(
        &subscriber,
        &mut subscriber_loop,
        &["$share/g/wattbus/test/p"],
    )
    .await;
    let (source, mut source_loop) = connected(config.listen, "tools-source", "tools").await;
    assert!(publish_acked(&source, &mut source_loop, "wattbus/test/p", "1").await);
    assert!(next_publish(&mut subscriber_loop, WAIT).await.is_some());
    // Leave without acknowledging it.
    drop((subscriber, subscriber_loop));
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn a_client_gets_at_most_max_filters_per_client() {
    watch_panics();
    let config = Config {
        max_filters_per_client: 4,
        ..support::config()
    };
    let _broker = start(&config).await;
    let (tools, mut tools_loop) = connected(config.listen, "tools-1", "tools").await;
    for i in 0..4 {
        let codes = subscribe(&tools, &mut tools_loop, &[&format!("wattbus/test/{i}")]).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    }
    // A fifth is refused, with its companion; one already held is not a new one.
    let codes = subscribe(
        &tools,
        &mut tools_loop,
        &["wattbus/test/0", "wattbus/test/4"],
    )
    .await;
    assert_eq!(codes, [SubscribeReasonCode::Failure; 2]);
    let codes = subscribe(&tools, &mut tools_loop, &["wattbus/test/3"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    // Another client has its own four.
    let (other, mut other_loop) = connected(config.listen, "tools-2", "tools").await;
    let codes = subscribe(&other, &mut other_loop, &["wattbus/test/9"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    assert_rumqttd_never_panicked();
}

#[tokio::test]
async fn the_filters_of_a_client_that_left_are_freed_for_the_others() {
    watch_panics();
    // Admins have no per-user connection limit: the hog is one, on two connections.
    let config = Config {
        max_filters: 16,
        max_filters_per_client: 8,
        max_connections_per_user: 1,
        ..support::config()
    };
    let _broker = start(&config).await;
    let (hog, mut hog_loop) = connected(config.listen, "hog", "tools").await;
    let (hog2, mut hog2_loop) = connected(config.listen, "hog-2", "tools").await;
    for i in 0..16 {
        let (client, eventloop) = if i < 8 {
            (&hog, &mut hog_loop)
        } else {
            (&hog2, &mut hog2_loop)
        };
        let codes = subscribe(client, eventloop, &[&format!("wattbus/hog/{i}")]).await;
        assert_eq!(
            codes,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "{i}"
        );
    }
    let (other, mut other_loop) = connected(config.listen, "other", "tools").await;
    let codes = subscribe(&other, &mut other_loop, &["wattbus/other/1"]).await;
    assert_eq!(
        codes,
        [SubscribeReasonCode::Failure],
        "the total is reached"
    );
    // A filter that has a log already costs nothing more.
    let codes = subscribe(&other, &mut other_loop, &["wattbus/hog/0"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // An unsubscribe frees what nobody else holds …
    hog.unsubscribe("wattbus/hog/7").await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let codes = subscribe(&other, &mut other_loop, &["wattbus/other/1"]).await;
        if codes == [SubscribeReasonCode::Success(QoS::AtLeastOnce)] {
            break;
        }
        // (the UNSUBSCRIBE may not have reached the router yet: drive the hog's connection)
        let _ = timeout(Duration::from_millis(50), hog_loop.poll()).await;
        assert!(
            Instant::now() < deadline,
            "the unsubscribed filter was never freed"
        );
    }
    // … and so does leaving: all but the one `other` shares.
    drop((hog, hog_loop, hog2, hog2_loop));
    let deadline = Instant::now() + WAIT;
    let mut i = 2;
    let mut granted = 0;
    while granted < 6 {
        let codes = subscribe(&other, &mut other_loop, &[&format!("wattbus/other/{i}")]).await;
        if codes == [SubscribeReasonCode::Success(QoS::AtLeastOnce)] {
            granted += 1;
            i += 1;
        }
        assert!(
            Instant::now() < deadline,
            "only {granted} of the hog's filters were freed"
        );
    }
    let codes = subscribe(&other, &mut other_loop, &["wattbus/other/99"]).await;
    assert_eq!(
        codes,
        [SubscribeReasonCode::Failure],
        "8 on this connection: 1 shared + 7 own"
    );
    drop((other, other_loop));
    round_trip(config.listen).await;
    assert_rumqttd_never_panicked();
}

/// A retained message is cleared only by a *retained* empty message (MQTT-3.3.1-10): any
/// empty publish cleared it, so any producer could wipe another service's retained status.
#[tokio::test]
async fn an_empty_publish_without_retain_leaves_the_retained_message() {
    watch_panics();
    let config = config();
    let _broker = start(&config).await;
    let status = topic("status/influx-writer");
    let (writer, mut writer_loop) =
        connected(config.listen, "influx-writer", "influx-writer").await;
    let publish_retained = |payload: &'static str| {
        writer.publish(
            status.clone(),
            QoS::AtLeastOnce,
            true,
            payload.as_bytes().to_vec(),
        )
    };
    publish_retained("online").await.unwrap();
    assert!(
        timeout(WAIT, async {
            loop {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) =
                    writer_loop.poll().await
                {
                    return;
                }
            }
        })
        .await
        .is_ok()
    );
    // Another user may not publish to this status at all (it is influx-writer's)...
    let (producer, mut producer_loop) =
        connected(config.listen, "serial-ingest", "serial-ingest").await;
    assert!(!publish_acked(&producer, &mut producer_loop, &status, "").await);
    // ...and its own user's empty publish without retain leaves it.
    let (second, mut second_loop) =
        connected(config.listen, "influx-writer-2", "influx-writer").await;
    assert!(publish_acked(&second, &mut second_loop, &status, "").await);
    let (reader, mut reader_loop) = connected(config.listen, "grafana", "grafana").await;
    subscribe(&reader, &mut reader_loop, &[&status]).await;
    assert_eq!(
        next_publish(&mut reader_loop, WAIT).await,
        Some((status.clone(), b"online".to_vec())),
        "the retained status was wiped by an empty publish without retain"
    );
    assert_rumqttd_never_panicked();
}
