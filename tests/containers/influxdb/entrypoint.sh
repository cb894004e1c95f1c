#!/bin/sh
# influxdb:1.8's first-start contract on Debian's influxd 1.6.7 (see Dockerfile).
set -eu
export INFLUXDB_META_DIR=/var/lib/influxdb/meta
export INFLUXDB_DATA_DIR=/var/lib/influxdb/data
export INFLUXDB_DATA_WAL_DIR=/var/lib/influxdb/wal
export INFLUXDB_BIND_ADDRESS=127.0.0.1:8088
if [ "${1:-}" = influxd ] && [ ! -f /var/lib/influxdb/meta/meta.db ] && [ -n "${INFLUXDB_ADMIN_USER:-}" ]; then
  INFLUXDB_HTTP_AUTH_ENABLED=false INFLUXDB_HTTP_BIND_ADDRESS=127.0.0.1:8086 influxd &
  pid=$!
  i=0
  until curl -sf http://127.0.0.1:8086/ping >/dev/null; do
    i=$((i + 1)); [ "$i" -lt 100 ] || { echo "influxd did not start" >&2; exit 1; }
    sleep 0.2
  done
  q() { influx -host 127.0.0.1 -execute "$1"; }
  q "CREATE USER \"$INFLUXDB_ADMIN_USER\" WITH PASSWORD '$INFLUXDB_ADMIN_PASSWORD' WITH ALL PRIVILEGES"
  if [ -n "${INFLUXDB_DB:-}" ]; then
    q "CREATE DATABASE \"$INFLUXDB_DB\""
    if [ -n "${INFLUXDB_READ_USER:-}" ]; then
      q "CREATE USER \"$INFLUXDB_READ_USER\" WITH PASSWORD '$INFLUXDB_READ_USER_PASSWORD'"
      q "GRANT READ ON \"$INFLUXDB_DB\" TO \"$INFLUXDB_READ_USER\""
    fi
  fi
  kill "$pid"
  wait "$pid" || true
fi
exec "$@"
