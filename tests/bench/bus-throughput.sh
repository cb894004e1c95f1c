#!/usr/bin/env bash
# Bus throughput, end to end: a journaled producer publishes N measurements at QoS 1 as fast as
# it can, a consumer stores each one (append + fsync per batch) and acknowledges it, and the
# producer stops its clock when every reading is acknowledged and its journal is empty.
# Run side by side through the wattbus broker (rumqttd) and mosquitto on this machine.
#
# Usage: tests/bench/bus-throughput.sh [COUNT] [RUNS]     (defaults: 50000, 3)
# Needs: mosquitto (tests/run.sh installs it). Prints a Markdown table for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-50000}
runs=${2:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cargo build --release --locked -p wattbus -p wattbus-e2e >&2
bin=target/release
. tests/bench/lib.sh
pass="bench-pass"

# wattbus broker
wb_port=$(free_port)
printf '%s\n' "$pass" > "$work/pw"
cat > "$work/broker.toml" <<CONF
[log]
level = "warn,rumqttd=off"
[broker]
listen = "127.0.0.1:$wb_port"
listen_v5 = "127.0.0.1:$(free_port)"
health_listen = "127.0.0.1:$(free_port)"
[[broker.users]]
username = "probe"
password_file = "$work/pw"
role = "admin"
CONF
"$bin/wattbus" run broker --config "$work/broker.toml" 2>"$work/broker.log" &
pids+=($!)
wait_port "$wb_port"

# mosquitto, same credentials, no persistence (like rumqttd): once with its defaults, once with
# the per-client queue limit lifted (its default, max_queued_messages 1000, drops QoS 1 messages
# for a subscriber that falls behind; our producers then replay them after the ack timeout).
mosquitto_passwd -b -c "$work/mq.passwd" probe "$pass"
chmod 0644 "$work/mq.passwd"
start_mosquitto() { # port extra-config-line
  printf 'listener %s 127.0.0.1\nallow_anonymous false\npassword_file %s\npersistence false\nlog_dest none\nuser %s\n%s\n' \
    "$1" "$work/mq.passwd" "$(id -un)" "$2" > "$work/mq-$1.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$work/mq-$1.conf" &
  pids+=($!)
  wait_port "$1"
}
mq_port=$(free_port); start_mosquitto "$mq_port" ""
mq_unl_port=$(free_port); start_mosquitto "$mq_unl_port" "max_queued_messages 0"

run_one() { # broker_port count journal_flags
  local port=$1 count=$2 dir="$work/run-$RANDOM"
  mkdir -p "$dir"
  RUST_LOG=warn "$bin/probe" --port "$port" --password "$pass" --data-dir "$dir/c" consume --store "$dir/store.txt" >"$dir/c.out" 2>"$dir/c.log" &
  local cpid=$!
  for _ in $(seq 1 300); do grep -q subscribed "$dir/c.out" 2>/dev/null && break; sleep 0.1; done
  local out
  out=$(RUST_LOG=warn "$bin/probe" --port "$port" --password "$pass" --data-dir "$dir/p" produce --count "$count" --ack-timeout-ms 30000 "${@:3}" 2>"$dir/p.log")
  kill "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null || true
  local stored; stored=$(wc -l < "$dir/store.txt")
  [ "$stored" -eq "$count" ] || { echo "stored $stored of $count" >&2; exit 1; }
  python3 -c 'import json,sys; print(json.loads(sys.argv[1].splitlines()[-1])["rate"])' "$out"
  rm -rf "$dir"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "| broker | producer journal | msgs/s, median of $runs | each run |"
echo "|---|---|---|---|"
for broker in wattbus "mosquitto (max_queued_messages 0)" "mosquitto (defaults)"; do
  case $broker in
    wattbus) port=$wb_port ;;
    "mosquitto (defaults)") port=$mq_port ;;
    *) port=$mq_unl_port ;;
  esac
  for mode in "disk, fsync 1 s" "disk, fsync every record" "memory"; do
    case $mode in
      "disk, fsync 1 s") flags=(--fsync-interval-ms 1000) ;;
      "disk, fsync every record") flags=(--fsync-interval-ms 0) ;;
      memory) flags=(--memory) ;;
    esac
    # An fsync per record is slow by design; a tenth of the messages gives the same rate.
    n=$count; [ "$mode" = "disk, fsync every record" ] && n=$((count / 10))
    rates=()
    for _ in $(seq 1 "$runs"); do rates+=("$(run_one "$port" "$n" "${flags[@]}")"); done
    med=$(printf '%s\n' "${rates[@]}" | median)
    echo "| $broker | $mode | $med | ${rates[*]} ($n msgs) |"
  done
done
