#!/usr/bin/env bash
# What `wattbus demo` costs a machine that only runs it: CPU (% of one core) and resident memory
# of the demo and its broker child, sampled every minute for MINUTES minutes (default 10) with
# the default devices (2 meters, the serial devices on virtual ports, files as the sink).
#
#   cargo build --release && tests/bench/demo-idle.sh [MINUTES]
#
# Prints one line per minute (CPU % over that minute, RSS of each process) and a summary: CPU
# over everything after the first minute (start-up excluded) and RSS growth from minute 1 to the
# end. docs/BENCHMARKS.md ("Demo at idle") has the figures and the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh

minutes=${1:-10}
bin=${WATTBUS_BIN:-target/release/wattbus}
[ -x "$bin" ] || { echo "build first: cargo build --release ($bin missing)" >&2; exit 1; }
command -v socat >/dev/null || { echo "socat is needed for the serial devices" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-demo-idle.XXXXXX")
demo=""
cleanup() {
  [ -n "$demo" ] && kill -INT "$demo" 2>/dev/null && wait "$demo" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$bin" demo --data-dir "$work/data" --readings-dir "$work/readings" >"$work/out.log" 2>&1 &
demo=$!
# Wait for the first readings file to have rows: everything is up.
for _ in $(seq 1 300); do
  if [ "$(cat "$work"/readings/*.csv 2>/dev/null | wc -l)" -gt 10 ]; then break; fi
  sleep 0.1
done
[ "$(cat "$work"/readings/*.csv 2>/dev/null | wc -l)" -gt 10 ] || { cat "$work/out.log" >&2; echo "the demo wrote no readings" >&2; exit 1; }

tck=$(getconf CLK_TCK)
pids() { echo "$demo" $(pgrep -P "$demo" || true); }
ticks() { local s=0; for p in $(pids); do s=$((s + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done; echo "$s"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
broker_pid() { pgrep -P "$demo" | head -1; }

printf '%-6s %8s %14s %14s %10s\n' minute cpu_pct demo_rss_kib broker_rss_kib readings
t0=$(ticks); s0=$(date +%s.%N)
first_demo=""; first_broker=""; ticks1=""; s1=""
for m in $(seq 1 "$minutes"); do
  sleep 60
  kill -0 "$demo" 2>/dev/null || { cat "$work/out.log" >&2; echo "the demo exited" >&2; exit 1; }
  t=$(ticks); s=$(date +%s.%N)
  cpu=$(awk -v a="$t0" -v b="$t" -v x="$s0" -v y="$s" -v k="$tck" 'BEGIN {printf "%.2f", (b-a)/k/(y-x)*100}')
  d=$(rss_kib "$demo"); b=$(rss_kib "$(broker_pid)")
  rows=$(cat "$work"/readings/*.csv | wc -l)
  printf '%-6s %8s %14s %14s %10s\n' "$m" "$cpu" "$d" "$b" "$rows"
  if [ "$m" = 1 ]; then first_demo=$d; first_broker=$b; ticks1=$t; s1=$s; fi
  t0=$t; s0=$s
done
last_demo=$d; last_broker=$b
if [ "$minutes" -gt 1 ]; then
  awk -v a="$ticks1" -v b="$t0" -v x="$s1" -v y="$s0" -v k="$tck" \
    'BEGIN {printf "cpu after minute 1: %.2f%% of one core\n", (b-a)/k/(y-x)*100}'
fi
echo "rss minute 1 -> $minutes: demo $first_demo -> $last_demo KiB, broker $first_broker -> $last_broker KiB"
errors=$(grep -cE " (ERROR|WARN) " "$work/out.log" || true)
echo "ERROR/WARN lines in the demo output: $errors"
