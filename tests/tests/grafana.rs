//! Grafana as wattbus ships it, checked without Grafana (it cannot run here): every query of
//! every dashboard panel and alert rule, with Grafana's macros and the dashboards' variables
//! substituted the way Grafana does, runs against a real InfluxDB 1.6.7 that the demo filled
//! through the real pipeline (simulated devices → services → broker → influx-writer), after
//! `wattbus influx setup` and one run of its continuous query. A query that returns no value
//! fails. The alert rules' expressions are then evaluated on readings written for the purpose
//! (an overload, a warm fridge, a silent collector, a stopped service) to show each fires for
//! what it names and only that. The files' shape is checked against Grafana's own types by
//! `grafana/build.py --check` (the foundation SDK).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use wattbus_e2e::servers::{Influxd, demo_into, http, influx_setup, run_continuous_queries};
use wattbus_e2e::{Proc, wait_until};

const DATASOURCE_UID: &str = "wattbus-influxdb";
/// The Plugs dashboard's switch (Business Forms) and the data source it goes through.
const FORM_PANEL: &str = "volkovlabs-form-panel";
const PLUG_API_UID: &str = "wattbus-plug-bridge";

fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(grafana_dir().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read_json(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn alert_rules() -> Vec<Value> {
    let file = read_json(&grafana_dir().join("provisioning/alerting/wattbus-rules.json"));
    file["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// Grafana's formatting of a multi-value variable inside an InfluxQL regex: each value with
/// the regex's special characters escaped, joined as `(a|b)` (what "All" selects).
fn regex_values(values: &[String]) -> String {
    let esc = |v: &str| {
        let mut o = String::new();
        for c in v.chars() {
            if "\\^$.|?*+()[]{}/".contains(c) {
                o.push('\\');
            }
            o.push(c);
        }
        o
    };
    format!(
        "({})",
        values.iter().map(|v| esc(v)).collect::<Vec<_>>().join("|")
    )
}

/// `query` as Grafana sends it: `$timeFilter` over `window`, `$__interval`, and the variables.
fn render(query: &str, vars: &BTreeMap<String, String>, interval_ms: u64, window: &str) -> String {
    let interval = if interval_ms.is_multiple_of(60_000) {
        format!("{}m", interval_ms / 60_000)
    } else {
        format!("{}s", interval_ms / 1000)
    };
    let mut q = query
        .replace(
            "$timeFilter",
            &format!("time >= now() - {window} AND time <= now()"),
        )
        .replace("$__interval_ms", &interval_ms.to_string())
        .replace("$__interval", &interval);
    // Longest names first, so `$price_t1` is not taken for `$price`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        q = q.replace(&format!("${name}"), &vars[name]);
    }
    let left = q
        .match_indices('$')
        .any(|(i, _)| q[i + 1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'));
    assert!(!left, "a macro or variable was left in {q:?}");
    q
}

/// Every series of an InfluxQL answer: (tags, rows of (time ms, values)).
type Series = Vec<(BTreeMap<String, String>, Vec<(i64, Vec<Option<f64>>)>)>;

fn series(answer: &Value, q: &str) -> Series {
    let result = &answer["results"][0];
    assert!(result.get("error").is_none(), "{q}: {}", result["error"]);
    let mut out = Vec::new();
    for s in result["series"].as_array().into_iter().flatten() {
        let tags = s["tags"]
            .as_object()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let rows = s["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let r = r.as_array().unwrap();
                (
                    r[0].as_i64().unwrap_or(0),
                    r[1..].iter().map(Value::as_f64).collect(),
                )
            })
            .collect();
        out.push((tags, rows));
    }
    out
}

fn values(s: &Series) -> usize {
    s.iter()
        .flat_map(|(_, rows)| rows)
        .filter(|(_, v)| v.iter().any(Option::is_some))
        .count()
}

/// The values of `variable` (its InfluxQL `SHOW TAG VALUES`, or a text box's default).
fn variable_values(
    influx: &Influxd,
    db: &str,
    var: &Value,
    vars: &BTreeMap<String, String>,
) -> (String, String) {
    let name = var["name"].as_str().unwrap().to_string();
    match var["type"].as_str().unwrap() {
        "textbox" => (name, var["query"].as_str().unwrap().to_string()),
        "query" => {
            assert_eq!(var["datasource"]["uid"], DATASOURCE_UID, "variable {name}");
            let q = render(var["query"].as_str().unwrap(), vars, 1000, "1h");
            let answer = influx.query(db, &q);
            let mut found = BTreeSet::new();
            for s in answer["results"][0]["series"]
                .as_array()
                .into_iter()
                .flatten()
            {
                for r in s["values"].as_array().unwrap() {
                    found.insert(r[1].as_str().unwrap().to_string());
                }
            }
            assert!(!found.is_empty(), "variable {name} has no values: {q}");
            (name, regex_values(&found.into_iter().collect::<Vec<_>>()))
        }
        other => panic!("variable {name} of type {other}: the test does not know it"),
    }
}

/// Line protocol with second timestamps into `db` (which may carry `&rp=…`).
fn write(influx: &Influxd, db: &str, lines: &str) {
    let (status, text) = http(
        "POST",
        influx.port,
        &format!("/write?db={db}&precision=s"),
        lines.as_bytes(),
    );
    assert_eq!(status, 204, "{text}");
}

fn now_s() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Readings in the shape plug-bridge (issue 15) will publish and backup-rotator publishes
/// (the demo runs neither), and what node-health publishes only on a machine that has it (a
/// thermal zone, a Raspberry Pi's firmware flags), for their panels and alerts: the only data
/// here not from the demo.
fn placeholder_readings(influx: &Influxd, db: &str) {
    let now = now_s();
    let mut lines = String::new();
    for i in 0..600 {
        let t = now - 600 + i;
        lines.push_str(&format!(
            "plug,site=demo,device=kettle-plug,channel=relay,quality=good power_w={},energy_wh={},relay_on={},temperature_c=31 {t}\n",
            if i % 120 < 60 { 2000 } else { 0 },
            1000 + i,
            i32::from(i % 120 < 60),
        ));
        if i % 10 == 0 {
            lines.push_str(&format!(
                "backup,site=demo,device=backup-rotator,channel=status,quality=good age_s={},last_run_ok=1,failures=0,last_bytes=1048576,last_points=86400,last_duration_s=4.5,full_sets=3,incremental_sets=40,stored_bytes=9000000 {t}\n",
                (i % 3600) + 60
            ));
            lines.push_str(&format!(
                "node_health,site=demo,device=pi-demo,channel=temperature,quality=good cpu_temperature_c={} {t}\n",
                50 + i % 7
            ));
            lines.push_str(&format!(
                "node_health,site=demo,device=pi-demo,channel=throttling,quality=good under_voltage_now=0,arm_freq_capped_now=0,throttled_now=0,soft_temp_limit_now=0,under_voltage_occurred=0,arm_freq_capped_occurred=0,throttled_occurred=0,soft_temp_limit_occurred=0,throttled_flags=0 {t}\n"
            ));
        }
    }
    write(influx, db, &lines);
}

struct Filled {
    influx: Influxd,
    /// Still running, so every window up to "now" holds readings (alert queries look back
    /// as little as a minute).
    demo: Proc,
    dir: tempfile::TempDir,
}

const DB: &str = "wattbus";

/// InfluxDB after `wattbus influx setup` and the demo, with the continuous query run once
/// over what the demo stored (what InfluxDB does every minute).
fn filled() -> Filled {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    influx_setup(&influx, DB);
    let mut demo = demo_into(&influx, DB, &dir.path().join("demo.log"));
    // Until every kind of reading has a few points: statuses (10 s), the meters' energy
    // registers (10 s), the fridge monitor (2 s), CT power and the Modbus lines' health.
    let enough = |q: &str, at_least: usize| {
        let s = series(&influx.query(DB, q), q);
        !s.is_empty()
            && s.iter().all(|(_, rows)| {
                rows.iter()
                    .all(|(_, v)| v[0].unwrap_or(0.0) >= at_least as f64)
            })
    };
    // Statuses over 130 s or more: at least two 1-minute buckets hold some, which the
    // aggregates' increase panels need.
    let ready = wait_until(Duration::from_secs(300), || {
        enough(
            r#"SELECT count("up") FROM "service" WHERE "device" = 'rms-processor'"#,
            14,
        ) && enough(
            r#"SELECT count("up") FROM "service" WHERE "device" = 'influx-writer'"#,
            14,
        ) && enough(
            r#"SELECT count("energy_wh") FROM "energy" GROUP BY "device""#,
            8,
        ) && enough(
            r#"SELECT count("temperature_c") FROM "temperature" GROUP BY "channel""#,
            20,
        ) && enough(
            r#"SELECT count("power_w") FROM "power" WHERE "power_basis" != '' GROUP BY "device""#,
            40,
        ) && enough(
            r#"SELECT count("energy_wh") FROM "plug" GROUP BY "device""#,
            20,
        ) && enough(r#"SELECT count("mem_total_bytes") FROM "node_health""#, 8)
            && enough(r#"SELECT count("latency_ms") FROM "modbus_bus""#, 4)
            && enough(
                r#"SELECT count("timeouts") FROM "modbus_device" GROUP BY "device""#,
                4,
            )
    });
    if !ready {
        demo.terminate(Duration::from_secs(20));
        panic!(
            "the demo did not fill InfluxDB; see {}",
            dir.path().join("demo.log").display()
        );
    }
    // The demo's three plugs, of the three kinds (HTTP myStrom and Shelly, Tasmota over
    // MQTT), each through plug-bridge.
    let q = r#"SELECT last("energy_wh") FROM "plug" GROUP BY "device""#;
    let plugs: BTreeSet<String> = influx.query(DB, q)["results"][0]["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tags"]["device"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        plugs,
        ["fridge-plug", "lamp-plug", "washer-plug"]
            .map(String::from)
            .into()
    );
    placeholder_readings(&influx, DB);
    // The continuous query's own SELECT … INTO, over everything stored so far.
    let cqs = run_continuous_queries(&influx, DB);
    assert!(
        cqs.iter().any(|q| q == "wattbus_1m_v2"),
        "influx setup created the continuous query: {cqs:?}"
    );
    Filled { influx, demo, dir }
}

#[test]
fn every_panel_and_alert_query_returns_the_readings_the_demo_stored() {
    let Filled {
        influx,
        mut demo,
        dir,
    } = filled();
    let influx = &influx;
    let mut checked = 0;
    for (file, d) in dashboards() {
        // Variables in order (a later one may use an earlier one, as `$site` in `device`).
        let mut vars = BTreeMap::new();
        for var in d["templating"]["list"].as_array().unwrap() {
            let (name, value) = variable_values(influx, DB, var, &vars);
            vars.insert(name, value);
        }
        for panel in d["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap_or_default();
            let Some(targets) = panel["targets"].as_array() else {
                continue;
            };
            // The plug switch reads plug-bridge, not InfluxDB (the test below).
            if panel["type"] == FORM_PANEL {
                continue;
            }
            let what = format!("{file}: {title:?}");
            assert_eq!(panel["datasource"]["uid"], DATASOURCE_UID, "{what}");
            let queries: Vec<&str> = targets
                .iter()
                .map(|t| {
                    assert_eq!(t["datasource"]["uid"], DATASOURCE_UID, "{what}");
                    assert_eq!(t["rawQuery"], true, "{what}");
                    t["query"].as_str().unwrap()
                })
                .collect();
            assert!(!queries.is_empty(), "{what} has no query");
            let switched = queries.iter().any(|q| q.contains("$__interval_ms"));
            if switched {
                // Raw readings below a minute, the 1-minute aggregates from a minute: at each
                // resolution every target of that kind answers with values, and no other.
                for interval_ms in [1000, 60_000] {
                    for q in &queries {
                        let aggregates = q.contains("\"minutes\".");
                        let q = render(q, &vars, interval_ms, "1h");
                        let s = series(&influx.query(DB, &q), &q);
                        if aggregates == (interval_ms >= 60_000) {
                            assert!(
                                values(&s) > 0,
                                "{what} at {interval_ms} ms: no value from {q}"
                            );
                            if interval_ms == 1000 {
                                continuous(&what, panel, &s, &q);
                            }
                        } else {
                            assert_eq!(
                                values(&s),
                                0,
                                "{what} at {interval_ms} ms: {q} answered too"
                            );
                        }
                        checked += 1;
                    }
                }
            } else {
                for q in &queries {
                    let q = render(q, &vars, 1000, "1h");
                    let s = series(&influx.query(DB, &q), &q);
                    // A panel of several targets (one per tariff price, meters and other
                    // devices) needs each of them to answer.
                    assert!(values(&s) > 0, "{what}: no value from {q}");
                    checked += 1;
                }
            }
        }
    }
    for rule in alert_rules() {
        let title = rule["title"].as_str().unwrap();
        for q in rule["data"].as_array().unwrap() {
            if q["datasourceUid"] == "__expr__" {
                continue;
            }
            assert_eq!(q["datasourceUid"], DATASOURCE_UID, "{title}");
            let window = format!("{}s", q["relativeTimeRange"]["from"].as_i64().unwrap());
            let query = render(
                q["model"]["query"].as_str().unwrap(),
                &BTreeMap::new(),
                1000,
                &window,
            );
            let s = series(&influx.query(DB, &query), &query);
            assert!(values(&s) > 0, "alert {title:?}: no value from {query}");
            let labels: BTreeSet<_> = s.iter().map(|(tags, _)| tags).collect();
            assert_eq!(
                labels.len(),
                s.len(),
                "alert {title:?}: two series with one label set (Grafana refuses): {query}"
            );
            checked += 1;
        }
    }
    assert!(checked > 60, "only {checked} queries were checked");
    demo.terminate(Duration::from_secs(20));
    drop(dir);
}

/// At 1 s resolution a line is continuous where readings exist: no silence between two
/// values longer than the panel bridges (`spanNulls`).
fn continuous(what: &str, panel: &Value, s: &Series, q: &str) {
    let span = panel["fieldConfig"]["defaults"]["custom"]["spanNulls"].as_i64();
    let Some(span) = span else {
        return;
    };
    for (tags, rows) in s {
        let times: Vec<i64> = rows
            .iter()
            .filter(|(_, v)| v.iter().any(Option::is_some))
            .map(|(t, _)| *t)
            .collect();
        let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        // A null run of length `gap - 1 s` is bridged when it is shorter than `span`.
        assert!(
            gap - 1000 < span,
            "{what} {tags:?}: a {gap} ms gap between readings at 1 s, bridged only up to {span} ms ({q})"
        );
    }
}

#[test]
fn dashboards_have_stable_unique_uids_and_use_only_the_provisioned_data_source() {
    let mut uids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{file} has no uid"));
        assert!(
            uid.starts_with("wattbus-") && uid.len() <= 40,
            "{file}: uid {uid}"
        );
        assert!(uids.insert(uid.to_string()), "{file}: uid {uid} twice");
        assert!(
            titles.insert(d["title"].as_str().unwrap().to_string()),
            "{file}: title twice"
        );
        let names: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"site"), "{file} has no site variable");
        // The switch panel makes its own requests (through plug-bridge's data source: the
        // test in plugs.rs); its query is the "-- Grafana --" data source's empty one.
        let mut d = d.clone();
        if let Some(panels) = d["panels"].as_array_mut() {
            for p in panels.iter().filter(|p| p["type"] == FORM_PANEL) {
                assert_eq!(p["datasource"]["uid"], "grafana", "{file}");
                assert!(p.to_string().contains(PLUG_API_UID), "{file}");
            }
            panels.retain(|p| p["type"] != FORM_PANEL);
        }
        let json = d.to_string();
        // Every data source reference is the provisioned one (1.8 and 2.x share the uid).
        for (i, _) in json.match_indices("\"uid\":") {
            let rest = &json[i + 6..];
            let v = rest.split('"').nth(1).unwrap();
            assert!(v == DATASOURCE_UID || v == uid, "{file}: uid {v}");
        }
    }
    assert_eq!(
        uids,
        [
            "wattbus-ct",
            "wattbus-health",
            "wattbus-meter",
            "wattbus-overview",
            "wattbus-plugs",
            "wattbus-temperatures"
        ]
        .map(String::from)
        .into(),
    );
    let mut rule_uids = BTreeSet::new();
    for rule in alert_rules() {
        assert!(
            rule_uids.insert(rule["uid"].as_str().unwrap().to_string()),
            "alert uid twice"
        );
    }
    for source in [
        "provisioning/datasources/influxdb.yaml",
        "influxdb2/datasources/influxdb.yaml",
    ] {
        let text = std::fs::read_to_string(grafana_dir().join(source)).unwrap();
        assert!(text.contains(&format!("uid: {DATASOURCE_UID}")), "{source}");
    }
    let compose =
        std::fs::read_to_string(grafana_dir().join("../compose/docker-compose.yml")).unwrap();
    assert!(compose.contains("../grafana/dashboards:/etc/grafana/dashboards:ro"));
    let provider =
        std::fs::read_to_string(grafana_dir().join("provisioning/dashboards/wattbus.yaml"))
            .unwrap();
    assert!(provider.contains("path: /etc/grafana/dashboards"));
}

/// The files are what `grafana/build.py` builds, and Grafana's own types (the
/// grafana-foundation-sdk models) keep every key of them: a misspelt option or one Grafana
/// does not have fails here.
#[test]
fn dashboard_and_alert_files_fit_grafanas_schema() {
    let out = Command::new("python3")
        .arg(grafana_dir().join("build.py"))
        .arg("--check")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "grafana/build.py --check failed (tests/run.sh installs grafana-foundation-sdk):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The label sets for which `rule`'s condition holds on what `influx` holds: its queries run
/// as Grafana runs them, reduced to their last value, and its math evaluated (the subset of
/// Grafana's expressions the rules use: `$X op number` joined by `||`, the operands joined by
/// label set).
fn firing(influx: &Influxd, db: &str, rule: &Value) -> BTreeSet<BTreeMap<String, String>> {
    let mut reduced: BTreeMap<String, BTreeMap<BTreeMap<String, String>, f64>> = BTreeMap::new();
    let mut raw: BTreeMap<String, Series> = BTreeMap::new();
    let mut condition_values = BTreeMap::new();
    for q in rule["data"].as_array().unwrap() {
        let r = q["refId"].as_str().unwrap().to_string();
        let m = &q["model"];
        if q["datasourceUid"] != "__expr__" {
            let window = format!("{}s", q["relativeTimeRange"]["from"].as_i64().unwrap());
            let query = render(
                m["query"].as_str().unwrap(),
                &BTreeMap::new(),
                1000,
                &window,
            );
            let s = series(&influx.query(db, &query), &query);
            let mut seen = BTreeSet::new();
            for (tags, _) in &s {
                assert!(
                    seen.insert(tags.clone()),
                    "{query}: two series labelled {tags:?}, which Grafana refuses"
                );
            }
            raw.insert(r, s);
            continue;
        }
        match m["type"].as_str().unwrap() {
            "reduce" => {
                assert_eq!(m["reducer"], "last");
                let of = &raw[m["expression"].as_str().unwrap()];
                let last = of
                    .iter()
                    .filter_map(|(tags, rows)| {
                        rows.iter()
                            .rev()
                            .find_map(|(_, v)| v[0])
                            .map(|v| (tags.clone(), v))
                    })
                    .collect();
                reduced.insert(r, last);
            }
            "math" => {
                let expr = m["expression"].as_str().unwrap();
                let parts: Vec<(&str, &str, f64)> = expr
                    .split("||")
                    .map(|part| {
                        let mut it = part.split_whitespace();
                        let var = it.next().unwrap().trim_start_matches('$');
                        let op = it.next().unwrap();
                        (var, op, it.next().unwrap().parse::<f64>().unwrap())
                    })
                    .collect();
                // A label set missing from one operand has no result.
                let labels: Vec<&BTreeMap<String, String>> = reduced[parts[0].0]
                    .keys()
                    .filter(|l| {
                        parts
                            .iter()
                            .all(|(var, _, _)| reduced[*var].contains_key(*l))
                    })
                    .collect();
                let mut out: BTreeMap<BTreeMap<String, String>, bool> = BTreeMap::new();
                for l in labels {
                    let holds = parts.iter().any(|(var, op, num)| {
                        let v = reduced[*var][l];
                        match *op {
                            ">" => v > *num,
                            "<" => v < *num,
                            "==" => (v - num).abs() < f64::EPSILON,
                            other => panic!("operator {other} in {expr}"),
                        }
                    });
                    out.insert(l.clone(), holds);
                }
                condition_values.insert(r, out);
            }
            other => panic!("expression type {other}"),
        }
    }
    condition_values[rule["condition"].as_str().unwrap()]
        .iter()
        .filter(|(_, fires)| **fires)
        .map(|(tags, _)| tags.clone())
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    std::iter::once(("site", "s"))
        .chain(pairs.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn each_alert_rule_fires_for_what_it_names_and_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    let db = "alerts";
    influx.create_database(db);
    let now = now_s();
    let mut lines = String::new();
    let mut line = |l: String| {
        lines.push_str(&l);
        lines.push('\n');
    };
    // Ten minutes of 1 Hz power on phase l1: `oven` over the default 3680 W, `heat-pump` at
    // 5 kW (under its own 6 kW), `house` under, and the house's `total` channel over (a
    // three-phase total is no breaker's load: not judged); the last two minutes of `shed` are
    // silent. Beside them, a PowMon's kettle over the limit, and a silent PowMon; and a
    // device of the same name at another site.
    for i in 0..600 {
        let t = now - 600 + i;
        for (device, channel, w) in [
            ("oven", "l1", 4000),
            ("heat-pump", "l1", 5000),
            ("house", "l1", 900),
            ("house", "total", 9000),
        ] {
            line(format!(
                "power,site=s,device={device},channel={channel},quality=good power_w={w},current_a={} {t}",
                w / 230
            ));
        }
        line(format!(
            "power,site=cabin,device=oven,channel=l1,quality=good power_w=100,current_a=0.4 {t}"
        ));
        // Solar export on a phase: negative power, as meters and CT channels report it.
        line(format!(
            "power,site=s,device=solar,channel=l1,quality=good power_w=-5000,current_a=21.7 {t}"
        ));
        line(format!(
            "current,site=s,device=powmon,channel=kettle,quality=out_of_range power_w=4100,current_a=17.8 {t}"
        ));
        if i < 480 {
            line(format!(
                "power,site=s,device=shed,channel=l1,quality=good power_w=50,current_a=0.2 {t}"
            ));
            line(format!(
                "current,site=s,device=powmon-2,channel=fridge,quality=good power_w=90,current_a=0.4 {t}"
            ));
        }
    }
    // Twenty minutes of temperatures every 10 s: one fridge warm throughout (beyond its
    // probe's range for the last five minutes: quality out_of_range), one that was warm and
    // recovered 5 minutes ago, a good freezer and a thawing one; a silent probe.
    for i in 0..120 {
        let t = now - 1200 + i * 10;
        let recovered = if t < now - 300 { 12.0 } else { 5.0 };
        let (warm, quality) = if t < now - 300 {
            (10.5, "good")
        } else {
            (21.0, "out_of_range")
        };
        line(format!(
            "temperature,site=s,device=kitchen,channel=fridge,quality={quality} temperature_c={warm} {t}"
        ));
        for (device, channel, c) in [
            ("garage", "fridge", recovered),
            ("kitchen", "freezer", -19.0),
            ("garage", "freezer", -8.0),
        ] {
            line(format!(
                "temperature,site=s,device={device},channel={channel},quality=good temperature_c={c} {t}"
            ));
        }
        if t < now - 240 {
            line(format!(
                "temperature,site=s,device=cellar,channel=fridge,quality=good temperature_c=4 {t}"
            ));
        }
    }
    // Statuses every 10 s: one running, one that went offline a minute ago, one silent for
    // five minutes; and one whose last status is stamped in the future (a clock ahead) after
    // it went offline, which must not count.
    for i in 0..60 {
        let t = now - 600 + i * 10;
        line(format!(
            "service,site=s,device=influx-writer,channel=status,service=influx-writer,quality=good up=1 {t}"
        ));
        let up = i32::from(t < now - 60);
        line(format!(
            "service,site=s,device=rms-processor,channel=status,service=rms-processor,quality=good up={up} {t}"
        ));
        line(format!(
            "service,site=s,device=modbus-ingest,channel=status,service=modbus-ingest,quality=good up={up} {t}"
        ));
        if t < now - 300 {
            line(format!(
                "service,site=s,device=serial-ingest,channel=status,service=serial-ingest,quality=good up=1 {t}"
            ));
        }
    }
    line(format!(
        "service,site=s,device=modbus-ingest,channel=status,service=modbus-ingest,quality=good up=1 {}",
        now + 3600
    ));
    // Nodes every 10 s for ten minutes (node-health): `pi-hot` at 85 °C throughout, with an
    // under-voltage seen five minutes ago; `pi-warm` hot only for the last two minutes (a
    // build, not a fan that died); `pi-full` with its disk 95 % full; `pi-cool` fine; and
    // `vm` with no thermal zone and no firmware flags (fields left out, not zero).
    for i in 0..60 {
        let t = now - 600 + i * 10;
        let warm = if t >= now - 120 { 85 } else { 55 };
        let dip = i32::from(t == now - 300);
        for (device, c, uv, disk) in [
            ("pi-hot", 85, dip, 40),
            ("pi-warm", warm, 0, 40),
            ("pi-full", 50, 0, 95),
            ("pi-cool", 50, 0, 60),
        ] {
            line(format!(
                "node_health,site=s,device={device},channel=temperature,quality=good cpu_temperature_c={c} {t}"
            ));
            line(format!(
                "node_health,site=s,device={device},channel=throttling,quality=good under_voltage_now={uv},under_voltage_occurred={uv},throttled_flags={} {t}",
                uv * 0x50005
            ));
            line(format!(
                "node_health,site=s,device={device},channel=disk,quality=good disk_used_pct={disk},disk_available_bytes=1e9 {t}"
            ));
        }
        line(format!(
            "node_health,site=s,device=vm,channel=disk,quality=good disk_used_pct=30,disk_available_bytes=1e10 {t}"
        ));
    }
    // Backups: one 3 h old, one 20 minutes old.
    line(format!(
        "backup,site=s,device=backup-rotator,channel=status,quality=good age_s=10800 {}",
        now - 60
    ));
    line(format!(
        "backup,site=s,device=backup-rotator-2,channel=status,quality=good age_s=1200 {}",
        now - 60
    ));
    write(&influx, db, &lines);

    let rules: BTreeMap<String, Value> = alert_rules()
        .into_iter()
        .map(|r| (r["uid"].as_str().unwrap().to_string(), r))
        .collect();
    let fires = |uid: &str| firing(&influx, db, &rules[uid]);
    let one = |pairs: &[(&str, &str)]| BTreeSet::from([labels(pairs)]);
    assert_eq!(
        fires("wattbus-overload"),
        BTreeSet::from([
            labels(&[("device", "oven"), ("channel", "l1")]),
            labels(&[("device", "solar"), ("channel", "l1")]),
        ])
    );
    assert_eq!(fires("wattbus-overload-heat-pump"), BTreeSet::new());
    assert_eq!(
        fires("wattbus-overload-sensors"),
        one(&[("device", "powmon"), ("channel", "kettle")])
    );
    assert_eq!(fires("wattbus-stale-power"), one(&[("device", "shed")]));
    assert_eq!(
        fires("wattbus-stale-current"),
        one(&[("device", "powmon-2")])
    );
    assert_eq!(
        fires("wattbus-stale-temperature"),
        one(&[("device", "cellar")])
    );
    assert_eq!(
        fires("wattbus-fridge"),
        one(&[("device", "kitchen"), ("channel", "fridge")])
    );
    assert_eq!(
        fires("wattbus-freezer"),
        one(&[("device", "garage"), ("channel", "freezer")])
    );
    assert_eq!(
        fires("wattbus-service-down"),
        BTreeSet::from([
            labels(&[("device", "modbus-ingest")]),
            labels(&[("device", "rms-processor")]),
            labels(&[("device", "serial-ingest")]),
        ])
    );
    assert_eq!(
        fires("wattbus-backup-age"),
        one(&[("device", "backup-rotator")])
    );
    assert_eq!(fires("wattbus-node-hot"), one(&[("device", "pi-hot")]));
    assert_eq!(
        fires("wattbus-node-under-voltage"),
        one(&[("device", "pi-hot")])
    );
    assert_eq!(
        fires("wattbus-node-disk-full"),
        one(&[("device", "pi-full")])
    );
    // No backup status at all (backup-rotator never ran, or stopped for 3 h) is itself an
    // alert; for every other rule, no data is not (a site without fridges, plugs, …).
    influx.create_database("nothing");
    assert!(firing(&influx, "nothing", &rules["wattbus-backup-age"]).is_empty());
    for (uid, rule) in &rules {
        let want = if uid == "wattbus-backup-age" {
            "Alerting"
        } else {
            "OK"
        };
        assert_eq!(rule["noDataState"], want, "{uid}");
    }
    assert_eq!(
        rules.len(),
        13,
        "a rule without a case here: {:?}",
        rules.keys()
    );
}

/// Energy over a range from the meters' counters, as the Overview asks for it: what a counter
/// grew by, minute after minute. A counter reset halfway (`wattbus energy reset`, a meter
/// replaced under the same name) must not count its whole earlier total.
#[test]
fn energy_in_a_range_is_what_the_counter_grew_by_even_across_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let influx = Influxd::start(dir.path());
    let db = "energy";
    influx.create_database(db);
    influx.query(
        db,
        "CREATE RETENTION POLICY \"minutes\" ON \"energy\" DURATION INF REPLICATION 1",
    );
    let now = now_s() / 60 * 60;
    let mut lines = String::new();
    // Sixty minutes, 60 Wh each; at minute 30 the counter restarts from 0.
    for m in 0..60 {
        let t = now - 3600 + m * 60;
        let wh = if m < 30 {
            5_000_000 + m * 60
        } else {
            (m - 30) * 60
        };
        lines.push_str(&format!(
            "energy,site=s,device=house,channel=total,quality=good max_energy_wh={wh},min_energy_wh={wh} {t}\n"
        ));
    }
    write(&influx, &format!("{db}&rp=minutes"), &lines);
    let (_, overview) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "overview.json")
        .unwrap();
    let panel = overview["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Energy today")
        .unwrap();
    let query = panel["targets"][0]["query"].as_str().unwrap();
    let vars = BTreeMap::from([
        ("site".to_string(), "(s)".to_string()),
        ("device".to_string(), "(house)".to_string()),
    ]);
    let q = render(query, &vars, 60_000, "2h");
    let s = series(&influx.query(db, &q), &q);
    assert_eq!(s.len(), 1, "{q}: {s:?}");
    let kwh = s[0].1[0].1[0].unwrap();
    // 58 increases of 60 Wh: the minute of the reset itself is lost (a step back), not the
    // 5 MWh before it.
    assert!(
        (kwh - 58.0 * 60.0 / 1000.0).abs() < 1e-9,
        "{kwh} kWh from {q}"
    );
}
