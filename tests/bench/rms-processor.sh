#!/usr/bin/env bash
# rms-processor through the broker, end to end: `rms-bench` publishes raw frames (3 channels ×
# 2000 samples at 2 kHz = one 1 s window, DEVICES devices round robin) through a memory-journal
# Producer that waits for the `rms-processor` group, as serial-ingest does; `wattbus run
# rms-processor` (release) turns them into measurements and acknowledges them at its
# checkpoints. The clock stops when every measurement has arrived and the producer's journal is
# empty. A fresh processor (fresh data dir) per run; one broker for all runs.
#
# Usage: tests/bench/rms-processor.sh [FRAMES_PER_DEVICE] [RUNS] [DEVICES]   (defaults: 500, 3, 4)
# Env:   CHECKPOINT_MS (processor's checkpoint_interval_ms, default: its own, 2000),
#        WINDOW (most frames in flight, default 32),
#        SEGMENT_COUNT (broker's segment_count: its buffer per subscription is this many MiB,
#        default 4; a window beyond ~60 frames of ~60 kB needs more, or the broker drops).
# Prints one line per run on stderr and a Markdown table for docs/BENCHMARKS.md on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
frames=${1:-500}
runs=${2:-3}
devices=${3:-4}
window=${WINDOW:-32}
work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --locked -p wattbus -p wattbus-e2e --bins >&2
bin=target/release
. tests/bench/lib.sh
hz=$(getconf CLK_TCK)
json() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
metric() { curl -fs "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 ~ "^"m {s+=$2} END {print s+0}'; }

# A password nobody else knows, for this run only.
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$work/pw"
mq_port=$(free_port)
cat > "$work/broker.toml" <<CONF
[log]
level = "warn,rumqttd=off"
[broker]
listen = "127.0.0.1:$mq_port"
listen_v5 = "127.0.0.1:$(free_port)"
health_listen = "127.0.0.1:$(free_port)"
segment_count = ${SEGMENT_COUNT:-4}
[[broker.users]]
username = "probe"
password_file = "$work/pw"
role = "admin"
CONF
"$bin/wattbus" run broker --config "$work/broker.toml" 2>"$work/broker.log" &
broker_pid=$!
pids+=("$broker_pid")
wait_port "$mq_port"

: > "$work/rates"; : > "$work/rows"
for r in $(seq 1 "$runs"); do
  dir="$work/run-$r"
  mkdir -p "$dir"
  hp=$(free_port)
  {
    cat <<CONF
site = "bench"
data_dir = "$dir"
[log]
level = "warn"
[bus]
host = "127.0.0.1"
port = $mq_port
username = "probe"
password_file = "$work/pw"
[rms_processor]
health_listen = "127.0.0.1:$hp"
CONF
    [ -n "${CHECKPOINT_MS:-}" ] && echo "checkpoint_interval_ms = $CHECKPOINT_MS"
  } > "$dir/wattbus.toml"
  "$bin/wattbus" run rms-processor --config "$dir/wattbus.toml" 2>"$dir/rms.log" &
  rms_pid=$!
  pids+=("$rms_pid")
  wait_http "$hp" /healthz || { cat "$dir/rms.log" >&2; exit 1; }
  load=$(cut -d' ' -f1 /proc/loadavg)
  b0=$(cpu_ticks "$broker_pid"); p0=$(cpu_ticks "$rms_pid")
  out=$("$bin/rms-bench" --port "$mq_port" --password-file "$work/pw" --data-dir "$dir/bench" \
    --devices "$devices" --frames "$frames" --window "$window" 2>"$dir/bench.log") \
    || { cat "$dir/bench.log" "$dir/rms.log" >&2; exit 1; }
  b1=$(cpu_ticks "$broker_pid"); p1=$(cpu_ticks "$rms_pid")
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$rms_pid/status"); hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$rms_pid/status")
  dup=$(metric "$hp" wattbus_rms_duplicate_samples_total); gaps=$(metric "$hp" wattbus_rms_gaps_total)
  kill "$rms_pid"; wait "$rms_pid" 2>/dev/null || true
  rate=$(json "$out" rate)
  echo "$rate" >> "$work/rates"
  row=$(python3 - "$out" "$((b1 - b0))" "$((p1 - p0))" "$hz" "$rss" "$hwm" "$dup" "$gaps" "$load" <<'PY'
import json, sys
o = json.loads(sys.argv[1]); b, p, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rss, hwm, dup, gaps, load = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8], sys.argv[9]
print(f"| {o['rate']:,} | {o['instant_rate']:,} | {o['processed_rate']:,} | {o['secs']:.2f} | "
      f"{p/hz:.2f} | {b/hz:.2f} | {o['bench_cpu_s']:.2f} | {rss/1024:.1f} / {hwm/1024:.1f} MiB | "
      f"{dup} / {gaps} | {load} |".replace(",", " "))
PY
)
  echo "$row" >> "$work/rows"
  echo "run $r: $out rms_cpu_s=$(python3 -c "print($((p1 - p0))/$hz)") broker_cpu_s=$(python3 -c "print($((b1 - b0))/$hz)") rss_kib=$rss hwm_kib=$hwm duplicates=$dup gaps=$gaps load=$load" >&2
done

echo "Frames: $devices devices × $frames frames × 3 channels × 2000 samples at 2 kHz (+1 warm-up frame per device); window $window frames; broker segment_count ${SEGMENT_COUNT:-4}; checkpoint_interval_ms ${CHECKPOINT_MS:-2000 (default)}"
echo
echo "| samples/s (all channels) | sample instants/s | samples/s until last measurement | secs | rms-processor CPU-s | broker CPU-s | rms-bench CPU-s | processor RSS / peak | duplicate samples / gaps | load 1 min at start |"
echo "|---|---|---|---|---|---|---|---|---|---|"
cat "$work/rows"
echo
echo "median of $runs: $(median < "$work/rates") samples/s (runs: $(paste -sd' ' "$work/rates"))"
