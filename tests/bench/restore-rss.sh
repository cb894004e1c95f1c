#!/bin/bash
# The restore of the full set backup-bench made (docs/BENCHMARKS.md, "Backups of 30 days"):
# wall time and peak RSS (VmHWM, polled every 0.2 s) of `wattbus backup restore`.
# Run from the repository root after target/release/backup-bench.
set -u
conf=/tmp/influx-bench/shipped/influxdb.conf
influxd -config $conf > /tmp/measure-influxd.log 2>&1 &
ipid=$!
port=$(awk '/^\[http\]/{h=1} h && /bind-address/{gsub(/"/,"",$3); split($3,a,":"); print a[2]; exit}' $conf)
for i in $(seq 1 600); do curl -s -o /dev/null -w "%{http_code}" "http://127.0.0.1:$port/ping" | grep -q 204 && break; sleep 1; done
curl -s -XPOST "http://127.0.0.1:$port/query" --data-urlencode "q=DROP DATABASE bench_restored" >/dev/null
curl -s -XPOST "http://127.0.0.1:$port/query" --data-urlencode "q=DROP DATABASE bench_restored2" >/dev/null
set_id=$(ls /tmp/backup-bench/sets/lab | grep full | head -1)
start=$(date +%s.%N)
target/release/wattbus backup restore -c /tmp/backup-bench/service.toml --database bench_restored2 --set "$set_id" > /tmp/measure-restore.log 2>&1 &
rpid=$!
peak=0
while kill -0 $rpid 2>/dev/null; do
  v=$(awk '/VmHWM/{print $2}' /proc/$rpid/status 2>/dev/null)
  [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v
  sleep 0.2
done
wait $rpid; rc=$?
end=$(date +%s.%N)
echo "rc=$rc time=$(echo "$end - $start" | bc) s peak_rss=$((peak/1024)) MB"
tail -1 /tmp/measure-restore.log
kill $ipid; wait $ipid
