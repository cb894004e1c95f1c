#!/usr/bin/env bash
# influx-writer throughput and footprint against a real InfluxDB 1.6.7, side by side in one run:
#   1. ceiling  — pre-built 5,000-line batches POSTed straight to /write by a tiny Python client;
#   2. wattbus  — probe publishes N readings over MQTT (journaled, QoS 1), influx-writer writes
#                 them; the clock stops when InfluxDB has accepted the last one and its
#                 acknowledgement reached the producer (gzip off and on);
#   3. paho     — the original projects' pipeline: a paho-mqtt script POSTing each message.
# Then the writer's CPU, RSS and disk writes at a steady 10 meters × 1 Hz, for 60 s each: to
# InfluxDB, to files only, and spooling while InfluxDB is down.
#
# Usage: tests/bench/influx-writer.sh [COUNT] [RUNS] [PAHO_COUNT] [STEADY_S]
#        (defaults: 100000, 3, 5000, 60)
# Needs: influxdb (apt), python3 with pip (paho-mqtt is installed into the work dir).
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-100000}
runs=${2:-3}
py_count=${3:-5000}
steady_s=${4:-60}
work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --locked -p wattbus -p wattbus-e2e >&2
bin=target/release
. tests/bench/lib.sh
wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
ticks_s() { python3 -c "print(f'{$1/$(getconf CLK_TCK):.2f}')"; }
pass="bench-pass"
python3 -m pip install -q --disable-pip-version-check --target "$work/pylib" paho-mqtt >&2

# InfluxDB 1.6.7
ix_port=$(free_port)
mkdir -p "$work/influx"
cat > "$work/influx/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$(free_port)"
[meta]
  dir = "$work/influx/meta"
[data]
  dir = "$work/influx/data"
  wal-dir = "$work/influx/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$ix_port"
  log-enabled = false
[logging]
  level = "warn"
CONF
influxd -config "$work/influx/influxdb.conf" 2>"$work/influx.log" &
influx_pid=$!
pids+=($influx_pid)
wait_port "$ix_port"
sleep 1
influxql() { curl_py "POST" "/query?q=$(python3 -c 'import urllib.parse,sys; print(urllib.parse.quote(sys.argv[1]))' "$1")"; }
curl_py() { python3 - "$ix_port" "$1" "$2" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1])); c.request(sys.argv[2], sys.argv[3]); r = c.getresponse(); r.read()
assert r.status < 300, r.status
PY
}

# The wattbus broker
mq_port=$(free_port)
printf '%s\n' "$pass" > "$work/pw"
cat > "$work/broker.toml" <<CONF
[log]
level = "warn,rumqttd=off"
[broker]
listen = "127.0.0.1:$mq_port"
listen_v5 = "127.0.0.1:$(free_port)"
health_listen = "127.0.0.1:$(free_port)"
[[broker.users]]
username = "probe"
password_file = "$work/pw"
role = "admin"
CONF
"$bin/wattbus" run broker --config "$work/broker.toml" 2>"$work/broker.log" &
broker_pid=$!
pids+=($broker_pid)
wait_port "$mq_port"

service_config() { # dir, extra toml
  cat > "$1/wattbus.toml" <<CONF
site = "lab"
data_dir = "$1"
[log]
level = "warn"
[bus]
host = "127.0.0.1"
port = $mq_port
username = "probe"
password_file = "$work/pw"
[simulator]
health_listen = "127.0.0.1:$(free_port)"
$2
CONF
}

ceiling() { # db
  python3 - "$ix_port" "$1" "$count" <<'PY'
import http.client, sys, time
port, db, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
base = 1764000000000
bodies = []
for start in range(0, n, 5000):
    bodies.append("".join(
        f"probe,channel=ch,device=probe-dev,quality=good,site=lab reading_n={float(i)} {base + i}\n"
        for i in range(start, min(n, start + 5000))).encode())
c = http.client.HTTPConnection("127.0.0.1", port)
t = time.perf_counter()
for b in bodies:
    c.request("POST", f"/write?db={db}&precision=ms", body=b)
    r = c.getresponse(); r.read()
    assert r.status == 204, r.status
print(f"{n / (time.perf_counter() - t):.0f}")
PY
}

wattbus_run() { # db gzip
  local dir="$work/w-$1"
  mkdir -p "$dir"
  service_config "$dir" "[influx_writer]
health_listen = \"127.0.0.1:$(free_port)\"
[influx_writer.influx]
url = \"http://127.0.0.1:$ix_port\"
api = \"v1\"
database = \"$1\"
gzip = $2"
  "$bin/wattbus" run influx-writer --config "$dir/wattbus.toml" 2>"$dir/writer.log" &
  local wpid=$!
  sleep 1
  local out w0 b0 i0
  w0=$(cpu_ticks "$wpid"); b0=$(cpu_ticks "$broker_pid"); i0=$(cpu_ticks "$influx_pid")
  out=$(RUST_LOG=warn "$bin/probe" --port "$mq_port" --password "$pass" --site lab --data-dir "$dir/p" \
    produce --count "$count" --wait-for influx-writer --ack-timeout-ms 10000 2>"$dir/p.log")
  echo "  $1: CPU-s writer $(ticks_s $(( $(cpu_ticks "$wpid") - w0 ))), broker $(ticks_s $(( $(cpu_ticks "$broker_pid") - b0 ))), influxd $(ticks_s $(( $(cpu_ticks "$influx_pid") - i0 ))); $(echo "$out" | tail -1)" >&2
  kill "$wpid"; wait "$wpid" 2>/dev/null || true
  python3 -c 'import json,sys; print(json.loads(sys.argv[1].splitlines()[-1])["rate"])' "$out"
}

paho_run() { # db
  local dir="$work/p-$1"
  mkdir -p "$dir"
  PYTHONPATH="$work/pylib" python3 tests/bench/paho_to_influx.py "$mq_port" probe "$pass" "$ix_port" "$1" "$py_count" >"$dir/py.out" 2>"$dir/py.log" &
  local ppid=$!
  for _ in $(seq 1 100); do grep -q subscribed "$dir/py.out" && break; sleep 0.1; done
  local out
  out=$(RUST_LOG=warn "$bin/probe" --port "$mq_port" --password "$pass" --site lab --data-dir "$dir/p" \
    produce --count "$py_count" --wait-for "" 2>"$dir/p.log")
  wait "$ppid"
  python3 - "$out" "$dir/py.out" "$py_count" <<'PY'
import json, sys
start = json.loads(sys.argv[1].splitlines()[0])["start"]
res = [json.loads(l) for l in open(sys.argv[2]) if "t_done" in l][0]
if res["written"] != int(sys.argv[3]):
    print(f"paho: only {res['written']} of {sys.argv[3]} readings arrived", file=sys.stderr)
print(f"{res['written'] / (res['t_done'] - start):.0f}")
PY
}

: > "$work/ceiling"; : > "$work/wb"; : > "$work/wbgz"; : > "$work/paho"
for r in $(seq 1 "$runs"); do
  for db in c$r w$r g$r p$r; do influxql "CREATE DATABASE $db"; done
  ceiling "c$r" >> "$work/ceiling"
  wattbus_run "w$r" false >> "$work/wb"
  wattbus_run "g$r" true >> "$work/wbgz"
  paho_run "p$r" >> "$work/paho"
  echo "run $r: ceiling $(tail -1 "$work/ceiling"), wattbus $(tail -1 "$work/wb"), wattbus+gzip $(tail -1 "$work/wbgz"), paho $(tail -1 "$work/paho") points/s" >&2
done
c=$(median < "$work/ceiling"); w=$(median < "$work/wb"); g=$(median < "$work/wbgz"); p=$(median < "$work/paho")
echo
echo "| pipeline ($count points; paho $py_count) | points/s, median of $runs | runs | vs ceiling |"
echo "|---|---|---|---|"
echo "| ceiling: 5,000-line batches POSTed directly | $c | $(paste -sd' ' "$work/ceiling") | 100% |"
echo "| wattbus influx-writer, gzip off | $w | $(paste -sd' ' "$work/wb") | $(python3 -c "print(f'{100*$w/$c:.0f}%')") |"
echo "| wattbus influx-writer, gzip on (default) | $g | $(paste -sd' ' "$work/wbgz") | $(python3 -c "print(f'{100*$g/$c:.0f}%')") |"
echo "| paho-mqtt script, one POST per message | $p | $(paste -sd' ' "$work/paho") | $(python3 -c "print(f'{100*$p/$c:.1f}%')") |"
echo
echo "wattbus (gzip off) / paho: $(python3 -c "print(f'{$w/$p:.0f}x')")"

# --- Steady state: 10 meters at 1 Hz -----------------------------------------------------------
steady() { # name, writer toml extra
  local dir="$work/s-$1"
  mkdir -p "$dir"
  service_config "$dir" "devices = 10
interval_ms = 1000
[simulator.stream]
wait_for = [\"influx-writer\"]
[influx_writer]
health_listen = \"127.0.0.1:$(free_port)\"
$2"
  "$bin/wattbus" run influx-writer --config "$dir/wattbus.toml" 2>"$dir/writer.log" &
  local wpid=$!
  "$bin/wattbus" run simulator --config "$dir/wattbus.toml" 2>"$dir/sim.log" &
  local spid=$!
  sleep 5
  local hz t0 t1 io0 io1
  hz=$(getconf CLK_TCK)
  t0=$(awk '{print $14+$15}' "/proc/$wpid/stat"); io0=$(awk '/^write_bytes/ {print $2}' "/proc/$wpid/io")
  sleep "$steady_s"
  t1=$(awk '{print $14+$15}' "/proc/$wpid/stat"); io1=$(awk '/^write_bytes/ {print $2}' "/proc/$wpid/io")
  local rss hwm
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$wpid/status"); hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$wpid/status")
  kill "$spid" "$wpid"; wait "$spid" "$wpid" 2>/dev/null || true
  python3 -c "print(f'| $1 | {100*($t1-$t0)/$hz/$steady_s:.2f}% | {$rss/1024:.1f} MiB | {$hwm/1024:.1f} MiB | {($io1-$io0)/$steady_s:.0f} B/s |')"
}
influxql "CREATE DATABASE steady"
dead_port=$(free_port)
echo
echo "| writer, 10 meters × 1 Hz, ${steady_s} s | CPU (one core = 100%) | RSS | peak RSS | disk writes |"
echo "|---|---|---|---|---|"
steady "to InfluxDB (v1, gzip)" "[influx_writer.influx]
url = \"http://127.0.0.1:$ix_port\"
api = \"v1\"
database = \"steady\""
steady "files only (CSV)" ""
steady "InfluxDB down: spooling" "[influx_writer.influx]
url = \"http://127.0.0.1:$dead_port\"
api = \"v1\"
database = \"steady\"
retry_max_ms = 5000"
