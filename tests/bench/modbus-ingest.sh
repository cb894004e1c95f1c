#!/usr/bin/env bash
# modbus-ingest benchmarks against simulated ORNO WE-515 meters (`modbus-sim`,
# tests/src/bin/modbus-sim.rs), with the wattbus broker and `wattbus run modbus-ingest`
# (release), all on loopback with a generated password. Default stream settings (disk journal,
# fsync 1 s, nothing waited for): readings are journalled and published as in production.
#
#   utilisation  one socat PTY pair, the simulator pacing at 9600 8E1, 8 meters polled every
#                500 ms (both blocks): more than the line can carry, so the scheduler is the
#                limit. Utilisation = line time of the answered reads (frame sizes, via
#                modbus_ingest::timing, in the simulator) / wall time; also the service's own
#                `modbus_bus` health `utilisation` (read with `wattbus tail`).
#   tcp-rate     Modbus TCP, one bus of TCP_METERS meters (default 247, every slave id) polled
#                every 100 ms (the shortest interval the config accepts): req/s and CPU. That
#                demand (20 req/s per meter) is the most one bus can be given; TCP_BUSES=n
#                opens n buses (connections) to the same simulator to find the ceiling.
#   steady-tcp   16 meters on one Modbus TCP bus at the profile's defaults (power 1 s, energy
#                60 s): CPU and RSS of modbus-ingest.
#   steady-rtu   16 meters on two paced PTY buses of 8 at 19200 8E1 (16 do not fit on one
#                9600 or one 19200 line: see `modbus-sim --budget`): CPU and RSS.
#
# Each mode: WARMUP_S, then RUNS windows of WINDOW_S seconds; rates from the simulator's
# counters (its own clock), CPU from /proc/<pid>/stat, RSS/peak from /proc/<pid>/status,
# the service's request count from its /metrics.
#
# Usage: tests/bench/modbus-ingest.sh [MODE|all] [WINDOW_S] [RUNS] [WARMUP_S]
#        (defaults: all, 30, 3, 5; TCP_METERS=247; TCP_BUSES=1; SILENCE_MS overrides the utilisation
#        bus's inter-frame silence, to measure what waiting for it costs)
# Needs: socat, curl, python3. Prints Markdown for docs/BENCHMARKS.md on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-all}
window_s=${2:-30}
runs=${3:-3}
warmup_s=${4:-5}
tcp_meters=${TCP_METERS:-247}
tcp_buses=${TCP_BUSES:-1}
work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-bench.XXXXXX")
pids=()
stop_pids() { for p in "$@"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; for p in "$@"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done; }
# Every process goes in `pids` (for the trap), and a case's own in `local_pids` (stopped when
# the case ends); stopping one twice is harmless.
cleanup() { stop_pids "${pids[@]:-}"; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --locked -p wattbus -p wattbus-e2e --bins >&2
bin=target/release
. tests/bench/lib.sh
hz=$(getconf CLK_TCK)
# The simulator's latest counters line (it prints one a second).
sim_last() { tail -n 1 "$1"; }

head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$work/pw"
mq_port=$(free_port)
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
pids+=("$broker_pid")
wait_port "$mq_port"

echo "machine: nproc $(nproc), $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -r); $(date -u +%FT%TZ)"
echo

# The common part of a modbus-ingest config; buses follow.
ingest_head() { # $1 dir, $2 health port
  cat <<CONF
site = "bench"
data_dir = "$1/data"
[log]
level = "warn"
[bus]
host = "127.0.0.1"
port = $mq_port
username = "probe"
password_file = "$work/pw"
[modbus_ingest]
health_listen = "127.0.0.1:$2"
health_interval_ms = 10000
CONF
}
devices() { # $1 count, $2 first slave, $3 name prefix, $4 poll table ("" = profile defaults)
  for i in $(seq 0 $(($1 - 1))); do
    echo "[[modbus_ingest.buses.devices]]"
    echo "name = \"$3-$i\""
    echo "slave = $(($2 + i))"
    echo "profile = \"orno-we-515\""
    if [ -n "$4" ]; then echo "poll = $4"; fi
  done
}

# measure DIR LABEL INGEST_PID "SIM_PIDS" "SIM_OUTS" HEALTH_PORT: RUNS windows; one Markdown
# row per window in DIR/rows, modbus-ingest CPU % per window in DIR/cpu, req/s in DIR/rps,
# utilisation (if the line is known) in DIR/util.
measure() {
  local dir=$1 ingest=$2 sims=$3 outs=$4 hp=$5
  : > "$dir/rows"; : > "$dir/cpu"; : > "$dir/rps"; : > "$dir/util"
  for r in $(seq 1 "$runs"); do
    local load i0 b0 s0=0 m0 to0 sim0=() i1 b1 s1=0 m1 to1 sim1=()
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    i0=$(cpu_ticks "$ingest"); b0=$(cpu_ticks "$broker_pid")
    for p in $sims; do s0=$((s0 + $(cpu_ticks "$p"))); done
    m0=$(metric "$hp" wattbus_modbus_requests_total); to0=$(metric "$hp" wattbus_modbus_timeouts_total)
    for o in $outs; do sim0+=("$(sim_last "$o")"); done
    sleep "$window_s"
    i1=$(cpu_ticks "$ingest"); b1=$(cpu_ticks "$broker_pid")
    for p in $sims; do s1=$((s1 + $(cpu_ticks "$p"))); done
    m1=$(metric "$hp" wattbus_modbus_requests_total); to1=$(metric "$hp" wattbus_modbus_timeouts_total)
    for o in $outs; do sim1+=("$(sim_last "$o")"); done
    local rss hwm
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$ingest/status"); hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$ingest/status")
    SIM0="$(printf '%s\n' "${sim0[@]}")" SIM1="$(printf '%s\n' "${sim1[@]}")" python3 - "$dir" "$r" "$window_s" "$hz" \
      "$((i1 - i0))" "$((b1 - b0))" "$((s1 - s0))" "$((m1 - m0))" "$((to1 - to0))" "$rss" "$hwm" "$load" <<'PY'
import json, os, sys
d, r, win, hz, di, db, ds, dm, dto, rss, hwm, load = sys.argv[1:]
win, hz = float(win), int(hz)
a = [json.loads(l) for l in os.environ["SIM0"].splitlines()]
b = [json.loads(l) for l in os.environ["SIM1"].splitlines()]
# Rates per bus on each simulator's own clock, then summed.
req = sum((y["requests"] - x["requests"]) / (y["t_s"] - x["t_s"]) for x, y in zip(a, b))
exc = sum(y["exceptions"] - x["exceptions"] for x, y in zip(a, b))
per_meter = [(ys["requests"] - xs["requests"]) / (y["t_s"] - x["t_s"])
             for x, y in zip(a, b) for xs, ys in zip(x["slaves"], y["slaves"])]
util = [(y["line_s"] - x["line_s"]) / (y["t_s"] - x["t_s"]) for x, y in zip(a, b) if "line_s" in y]
dreq = sum(y["requests"] - x["requests"] for x, y in zip(a, b))
cycle_ms = [1000 * (y["t_s"] - x["t_s"]) / max(1, y["requests"] - x["requests"]) for x, y in zip(a, b)]
line_ms = [1000 * (y["line_s"] - x["line_s"]) / max(1, y["requests"] - x["requests"]) for x, y in zip(a, b) if "line_s" in y]
cpu = 100 * int(di) / hz / win
cells = [r, f"{req:.1f}", f"{min(per_meter):.3f}–{max(per_meter):.3f}", f"{int(dm) / win:.1f}",
         f"{exc} / {dto}", f"{cpu:.2f}%", f"{int(rss) / 1024:.1f} / {int(hwm) / 1024:.1f} MiB",
         f"{100 * int(ds) / hz / win:.2f}%", f"{100 * int(db) / hz / win:.2f}%"]
if util:
    cells[1:1] = [" + ".join(f"{100 * u:.1f}%" for u in util),
                  " / ".join(f"{c:.2f} vs {l:.2f}" for c, l in zip(cycle_ms, line_ms))]
cells.append(load)
row = "| " + " | ".join(cells) + " |"
with open(f"{d}/rows", "a") as f: print(row, file=f)
with open(f"{d}/cpu", "a") as f: print(f"{cpu:.2f}", file=f)
with open(f"{d}/rps", "a") as f: print(f"{req:.1f}", file=f)
if util:
    with open(f"{d}/util", "a") as f: print(f"{100 * sum(util) / len(util):.2f}", file=f)
print(f"window {r}: {row}", file=sys.stderr)
PY
  done
}

header() { # $1: with line columns?
  local line=""
  [ "$1" = yes ] && line=" line utilisation (per bus) | ms per request: cycle vs line time |"
  echo "| window |$line req/s (simulator) | req/s per meter (min–max) | req/s (modbus-ingest /metrics) | exceptions / timeouts | modbus-ingest CPU (one core = 100%) | modbus-ingest RSS / peak | simulator CPU | broker CPU | load 1/5/15 min at start |"
  if [ "$1" = yes ]; then echo "|---|---|---|---|---|---|---|---|---|---|---|---|"; else echo "|---|---|---|---|---|---|---|---|---|---|"; fi
}

# run_case NAME PTY_PAIRS "SIM ARGS per bus (;-separated, @HOSTn/@DEVn/@PORTn substituted)" BUSES_FN
run_case() {
  local name=$1 ptys=$2 sim_specs=$3 buses_fn=$4
  local dir="$work/$name" local_pids=() sims="" outs="" i=0
  mkdir -p "$dir"
  for i in $(seq 0 $((ptys - 1))); do
    socat pty,raw,echo=0,link="$dir/dev$i" pty,raw,echo=0,link="$dir/host$i" 2>"$dir/socat$i.log" &
    local_pids+=($!); pids+=($!)
  done
  for i in $(seq 0 $((ptys - 1))); do
    for _ in $(seq 1 100); do [ -e "$dir/dev$i" ] && [ -e "$dir/host$i" ] && break; sleep 0.05; done
  done
  i=0
  local ports=()
  IFS=';' read -ra specs <<<"$sim_specs"
  for spec in "${specs[@]}"; do
    local port; port=$(free_port); ports+=("$port")
    spec=${spec//@DEV/$dir/dev}; spec=${spec//@PORT/$port}
    # shellcheck disable=SC2086
    "$bin/modbus-sim" $spec >"$dir/sim$i.out" 2>"$dir/sim$i.log" &
    local_pids+=($!); pids+=($!); sims+=" $!"; outs+=" $dir/sim$i.out"
    i=$((i + 1))
  done
  local hp; hp=$(free_port)
  { ingest_head "$dir" "$hp"; "$buses_fn" "$dir" "${ports[@]}"; } > "$dir/wattbus.toml"
  for o in $outs; do for _ in $(seq 1 100); do [ -s "$o" ] && break; sleep 0.1; done; done
  "$bin/wattbus" run modbus-ingest --config "$dir/wattbus.toml" 2>"$dir/ingest.log" &
  local ingest=$!
  local_pids+=("$ingest"); pids+=("$ingest")
  wait_http "$hp" /metrics || { cat "$dir/ingest.log" >&2; exit 1; }
  "$bin/wattbus" tail --raw "wattbus/v1/bench/meas/+/health" --config "$dir/wattbus.toml" \
    >"$dir/health.out" 2>"$dir/tail.log" &
  local_pids+=($!); pids+=($!)
  sleep "$warmup_s"
  measure "$dir" "$ingest" "$sims" "$outs" "$hp"
  kill -0 "$ingest" $sims || { echo "$name: modbus-ingest or a simulator died" >&2; cat "$dir/ingest.log" "$dir"/sim*.log >&2; exit 1; }
  # The service first, so it does not see its line go away; then the rest.
  stop_pids "$ingest"
  stop_pids "${local_pids[@]}"
  local keep=() p q
  for p in "${pids[@]}"; do
    for q in "${local_pids[@]}"; do [ "$p" = "$q" ] && continue 2; done
    keep+=("$p")
  done
  pids=("${keep[@]}")
  grep -c . "$dir/ingest.log" >/dev/null && { echo "$name: modbus-ingest logged:" >&2; head -5 "$dir/ingest.log" >&2; } || true
}

health_summary() { # $1 dir: the service's own modbus_bus utilisation, every health message
  python3 - "$1/health.out" <<'PY'
import json, sys
u = []
for line in open(sys.argv[1]):
    topic, _, payload = line.partition(" ")
    m = json.loads(payload)
    if m.get("measurement") == "modbus_bus" and "utilisation" in m["fields"]:
        u.append((topic.split("/")[4], m["fields"]["utilisation"], m["fields"].get("latency_ms")))
# The first interval includes start-up (opening the port, the first polls): skipped.
u = u[1:] if len(u) > 1 else u
if u:
    print("service's own modbus_bus health, every 10 s interval after the first: utilisation "
          + ", ".join(f"{100 * x:.1f}%" for _, x, _ in u)
          + "; latency_ms " + ", ".join(f"{l:.1f}" for _, _, l in u if l is not None))
else:
    print("no modbus_bus health message read")
PY
}

buses_util() { # one paced RTU bus, 8 meters, 500 ms for both classes
  cat <<CONF
[[modbus_ingest.buses]]
name = "line"
transport = "rtu"
path = "$1/host0"
baud = 9600
parity = "even"
CONF
  if [ -n "${SILENCE_MS:-}" ]; then echo "silence_ms = $SILENCE_MS"; fi
  devices 8 1 m '{ fast = 500, slow = 500 }'
}
buses_tcp_rate() { # TCP_BUSES connections to the same simulator, each polling every meter
  for b in $(seq 0 $((tcp_buses - 1))); do
    cat <<CONF
[[modbus_ingest.buses]]
name = "gw$b"
transport = "tcp"
host = "127.0.0.1"
port = $2
CONF
    devices "$tcp_meters" 1 "g$b" '{ fast = 100, slow = 100 }'
  done
}
buses_steady_tcp() {
  cat <<CONF
[[modbus_ingest.buses]]
name = "gw"
transport = "tcp"
host = "127.0.0.1"
port = $2
CONF
  devices 16 1 m ""
}
buses_steady_rtu() {
  for b in 0 1; do
    cat <<CONF
[[modbus_ingest.buses]]
name = "line$b"
transport = "rtu"
path = "$1/host$b"
baud = 19200
parity = "even"
CONF
    devices 8 1 "b$b" ""
  done
}

if [ "$mode" = all ] || [ "$mode" = utilisation ]; then
  run_case util 1 "--rtu @DEV0 --pace --baud 9600 --framing 8E1 --meters 8" buses_util
  echo "### utilisation: 8 WE-515 at 500 ms on one RTU line paced at 9600 8E1 (${window_s} s windows after ${warmup_s} s)"
  echo
  header yes
  cat "$work/util/rows"
  echo
  echo "line utilisation median of $runs: $(median < "$work/util/util")% (windows: $(paste -sd' ' "$work/util/util")); demand: $("$bin/modbus-sim" --budget --meters 8 --baud 9600 --framing 8E1 --fast-ms 500 --slow-ms 500)"
  health_summary "$work/util"
  echo
fi
if [ "$mode" = all ] || [ "$mode" = tcp-rate ]; then
  run_case tcp "0" "--tcp 127.0.0.1:@PORT --meters $tcp_meters" buses_tcp_rate
  echo "### tcp-rate: $tcp_meters WE-515 at 100 ms on each of $tcp_buses Modbus TCP bus(es) to one simulator (${window_s} s windows after ${warmup_s} s)"
  echo
  header no
  cat "$work/tcp/rows"
  echo
  echo "req/s median of $runs: $(median < "$work/tcp/rps") (windows: $(paste -sd' ' "$work/tcp/rps")); demand $((tcp_buses * tcp_meters * 20)) req/s"
  health_summary "$work/tcp"
  echo
fi
if [ "$mode" = all ] || [ "$mode" = steady-tcp ]; then
  run_case stcp 0 "--tcp 127.0.0.1:@PORT --meters 16" buses_steady_tcp
  echo "### steady-tcp: 16 WE-515 on one Modbus TCP bus, power 1 s, energy 60 s (${window_s} s windows after ${warmup_s} s)"
  echo
  header no
  cat "$work/stcp/rows"
  echo
  echo "modbus-ingest CPU median of $runs: $(median < "$work/stcp/cpu")% (windows: $(paste -sd' ' "$work/stcp/cpu"))"
  echo
fi
if [ "$mode" = all ] || [ "$mode" = steady-rtu ]; then
  echo "budget: $("$bin/modbus-sim" --budget --meters 16 --baud 9600 --framing 8E1) $("$bin/modbus-sim" --budget --meters 16 --baud 19200 --framing 8E1) $("$bin/modbus-sim" --budget --meters 8 --baud 19200 --framing 8E1)"
  run_case srtu 2 "--rtu @DEV0 --pace --baud 19200 --framing 8E1 --meters 8;--rtu @DEV1 --pace --baud 19200 --framing 8E1 --meters 8" buses_steady_rtu
  echo "### steady-rtu: 16 WE-515 on two RTU lines of 8, paced at 19200 8E1, power 1 s, energy 60 s (${window_s} s windows after ${warmup_s} s)"
  echo
  header yes
  cat "$work/srtu/rows"
  echo
  echo "modbus-ingest CPU median of $runs: $(median < "$work/srtu/cpu")% (windows: $(paste -sd' ' "$work/srtu/cpu"))"
  health_summary "$work/srtu"
  echo
fi
