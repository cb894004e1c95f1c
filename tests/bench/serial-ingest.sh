#!/usr/bin/env bash
# serial-ingest at steady state with three streaming ports: three socat PTY pairs, three Prime
# simulators (`serial-sim`: 2000 Hz, 1 channel, 20 samples per line, 115200 baud), the wattbus
# broker and `wattbus run serial-ingest` (release) with three `stream` ports publishing 1 s raw
# frames through its memory journal with `raw_stream.wait_for = []`: nothing consumes the frames
# or is waited for, so this is serial-ingest's own cost (read, parse, checksum, frame, encode,
# publish). With no sink group, nothing is trimmed: the memory journal is capped at 1 MiB so
# the frames it holds (dropping the oldest, with an ERROR) do not grow the RSS measured. After a warm-up, RUNS windows of STEADY_S seconds each: CPU from
# /proc/<pid>/stat (utime+stime), RSS and peak RSS from /proc/<pid>/status, lines/s and
# frames/s from its /metrics.
#
# Usage: tests/bench/serial-ingest.sh [STEADY_S] [RUNS] [WARMUP_S]   (defaults: 60, 3, 10)
# Needs: socat. Prints a Markdown table for docs/BENCHMARKS.md on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
steady_s=${1:-60}
runs=${2:-3}
warmup_s=${3:-10}
ports=3
work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --locked -p wattbus -p wattbus-e2e --bins >&2
bin=target/release
. tests/bench/lib.sh
hz=$(getconf CLK_TCK)

# Three PTY pairs: devN is the device's end (the simulator), hostN the service's.
for i in $(seq 0 $((ports - 1))); do
  socat pty,raw,echo=0,link="$work/dev$i" pty,raw,echo=0,link="$work/host$i" 2>"$work/socat$i.log" &
  pids+=($!)
done
for i in $(seq 0 $((ports - 1))); do
  for _ in $(seq 1 100); do [ -e "$work/dev$i" ] && [ -e "$work/host$i" ] && break; sleep 0.05; done
done

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

hp=$(free_port)
{
  cat <<CONF
site = "bench"
data_dir = "$work/data"
[log]
level = "warn"
[bus]
host = "127.0.0.1"
port = $mq_port
username = "probe"
password_file = "$work/pw"
[serial_ingest]
health_listen = "127.0.0.1:$hp"
[serial_ingest.raw_stream]
journal = "memory"
wait_for = []
max_bytes = 1048576
segment_bytes = 262144
CONF
  for i in $(seq 0 $((ports - 1))); do
    cat <<CONF
[[serial_ingest.ports]]
path = "$work/host$i"
device = "prime-$i"
protocol = "stream"
baud = 115200
sample_rate_hz = 2000.0
frame_ms = 1000
[[serial_ingest.ports.channels]]
name = "ct1"
unit = "adc"
CONF
  done
} > "$work/wattbus.toml"
"$bin/wattbus" run serial-ingest --config "$work/wattbus.toml" 2>"$work/serial.log" &
si_pid=$!
pids+=("$si_pid")
wait_http "$hp" /metrics || { cat "$work/serial.log" >&2; exit 1; }

sim_args=()
for i in $(seq 0 $((ports - 1))); do sim_args+=(--path "$work/dev$i"); done
"$bin/serial-sim" "${sim_args[@]}" --rate-hz 2000 --channels 1 --samples-per-line 20 --baud 115200 \
  >"$work/sim.out" 2>"$work/sim.log" &
sim_pid=$!
pids+=("$sim_pid")
sleep "$warmup_s"

: > "$work/cpu"; : > "$work/rows"
for r in $(seq 1 "$runs"); do
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(cpu_ticks "$si_pid"); b0=$(cpu_ticks "$broker_pid"); s0=$(cpu_ticks "$sim_pid")
  l0=$(metric "$hp" wattbus_serial_lines_total); f0=$(metric "$hp" wattbus_serial_frames_total)
  g0=$(metric "$hp" wattbus_serial_garbled_lines_total); x0=$(metric "$hp" wattbus_serial_lost_lines_total)
  sleep "$steady_s"
  t1=$(cpu_ticks "$si_pid"); b1=$(cpu_ticks "$broker_pid"); s1=$(cpu_ticks "$sim_pid")
  l1=$(metric "$hp" wattbus_serial_lines_total); f1=$(metric "$hp" wattbus_serial_frames_total)
  g1=$(metric "$hp" wattbus_serial_garbled_lines_total); x1=$(metric "$hp" wattbus_serial_lost_lines_total)
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$si_pid/status"); hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$si_pid/status")
  cpu=$(python3 -c "print(f'{100*($t1-$t0)/$hz/$steady_s:.2f}')")
  echo "$cpu" >> "$work/cpu"
  row=$(python3 -c "print(f'| $r | $cpu% | {$rss/1024:.1f} MiB | {$hwm/1024:.1f} MiB | {($l1-$l0)/$steady_s:.1f} | {($f1-$f0)/$steady_s:.2f} | $((g1 - g0)) / $((x1 - x0)) | {100*($b1-$b0)/$hz/$steady_s:.2f}% | {100*($s1-$s0)/$hz/$steady_s:.2f}% | $load |')")
  echo "$row" >> "$work/rows"
  echo "window $r: $row" >&2
done
kill -0 "$si_pid" "$sim_pid" || { echo "serial-ingest or the simulators died" >&2; cat "$work/serial.log" "$work/sim.log" >&2; exit 1; }

echo "$ports stream ports × 2000 Hz × 1 channel, 20 samples per line, 1 s frames; raw_stream memory, wait_for = []; ${steady_s} s windows after ${warmup_s} s warm-up"
echo
echo "| window | serial-ingest CPU (one core = 100%) | RSS | peak RSS | lines/s | frames/s | garbled / lost lines | broker CPU | simulators CPU | load 1 min at start |"
echo "|---|---|---|---|---|---|---|---|---|---|"
cat "$work/rows"
echo
echo "serial-ingest CPU median of $runs: $(median < "$work/cpu")% (windows: $(paste -sd' ' "$work/cpu"))"
