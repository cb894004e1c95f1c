#!/usr/bin/env bash
# What the wattbus containers cost, with the demo profile running at its default rates:
# resident memory of each container's process and their sum, CPU of all of them together,
# bytes they cause to be written to disk per second, and the image's size.
#
#   DOCKER_HOST=unix:///… WATTBUS_IMAGE=wattbus:bench INFLUXDB_IMAGE=… \
#     tests/bench/containers.sh [seconds, default 120]
#
# Reads /proc of each container's process 1 from the host (so it runs as root, beside the
# engine): VmRSS, Pss (smaps_rollup), utime+stime, and write_bytes of /proc/<pid>/io (what reached the block
# layer: journals, spools, registers; not page-cache churn). Grafana is left out, as in the
# tests (tests/containers/compose.ci.yml).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
seconds=${1:-120}
work=$(mktemp -d)
project="wattbus-bench-$$"
trap 'cd "$work/compose" && docker compose -f docker-compose.yml -f ci.yml -p "$project" down -v -t 2 >/dev/null 2>&1; rm -rf "$work"' EXIT
mkdir -p "$work/compose"
cp "$root"/compose/{docker-compose.yml,wattbus.toml,demo.toml,make-secrets.sh} "$work/compose/"
cp "$root/tests/containers/compose.ci.yml" "$work/compose/ci.yml"
ln -s "$root/grafana" "$work/grafana"
cd "$work/compose"
./make-secrets.sh >/dev/null
export COMPOSE_PROFILES=demo MQTT_PUBLISH=127.0.0.1:0 INFLUX_PUBLISH=0 GRAFANA_PUBLISH=0
dc() { docker compose -f docker-compose.yml -f ci.yml -p "$project" "$@"; }
dc up -d --wait >/dev/null 2>&1
services=(broker influx-writer rms-processor modbus-ingest serial-ingest simulator
  demo-modbus-ingest demo-serial-ingest)
sleep 30   # past start-up: sessions made, journals opened, first batches written
declare -A pid cpu0 io0
hz=$(getconf CLK_TCK)
# name, RSS and PSS in kB, CPU ticks, bytes written: one row of MB, MB, % of one core, B/s.
row() {
  awk -v n="$1" -v r="$2" -v p="$3" -v c="$4" -v w="$5" -v hz="$hz" -v s="$seconds" \
    'BEGIN { printf "%-20s %9.1f %9.1f %9.2f %12.0f\n", n, r / 1024, p / 1024, 100 * c / hz / s, w / s }'
}
for s in "${services[@]}"; do
  pid[$s]=$(docker inspect -f '{{.State.Pid}}' "$(dc ps -q "$s")")
  cpu0[$s]=$(awk '{print $14 + $15}' "/proc/${pid[$s]}/stat")
  io0[$s]=$(awk '/^write_bytes/ {print $2}' "/proc/${pid[$s]}/io")
done
sleep "$seconds"
printf '%-20s %9s %9s %9s %12s\n' container "RSS (MB)" "PSS (MB)" "CPU (%)" "disk (B/s)"
total_rss=0; total_pss=0; total_cpu=0; total_io=0
for s in "${services[@]}"; do
  p=${pid[$s]}
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status")
  # Proportional: the binary's pages are one file in one image layer, shared by every
  # container, and counted here once in all rather than once per container.
  pss=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup")
  cpu=$(awk '{print $14 + $15}' "/proc/$p/stat")
  io=$(awk '/^write_bytes/ {print $2}' "/proc/$p/io")
  dcpu=$((cpu - cpu0[$s])); dio=$((io - io0[$s]))
  row "$s" "$rss" "$pss" "$dcpu" "$dio"
  total_rss=$((total_rss + rss)); total_pss=$((total_pss + pss))
  total_cpu=$((total_cpu + dcpu)); total_io=$((total_io + dio))
done
row "all wattbus" "$total_rss" "$total_pss" "$total_cpu" "$total_io"
printf 'image %s: %s MB\n' "${WATTBUS_IMAGE}" \
  "$(docker image inspect -f '{{.Size}}' "$WATTBUS_IMAGE" | awk '{printf "%.1f", $1/1e6}')"
