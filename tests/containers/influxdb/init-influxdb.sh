#!/bin/sh
# influxdb:1.8's /init-influxdb.sh contract on Debian's influxd 1.6.7 (see Dockerfile): on the
# first start only (no meta directory yet), with authentication, create the admin user, the
# database INFLUXDB_DB, and the write and read users with their grants. Later starts: nothing.
set -eu
[ -d /var/lib/influxdb/meta ] && exit 0
[ -n "${INFLUXDB_ADMIN_USER:-}" ] || exit 0
INFLUXDB_HTTP_AUTH_ENABLED=false INFLUXDB_HTTP_BIND_ADDRESS=127.0.0.1:8086 influxd &
pid=$!
i=0
until curl -sf http://127.0.0.1:8086/ping >/dev/null; do
  i=$((i + 1)); [ "$i" -lt 150 ] || { echo "influxd did not start" >&2; exit 1; }
  sleep 0.2
done
q() { influx -host 127.0.0.1 -execute "$1"; }
q "CREATE USER \"$INFLUXDB_ADMIN_USER\" WITH PASSWORD '$INFLUXDB_ADMIN_PASSWORD' WITH ALL PRIVILEGES"
if [ -n "${INFLUXDB_DB:-}" ]; then
  q "CREATE DATABASE $INFLUXDB_DB"
  if [ -n "${INFLUXDB_WRITE_USER:-}" ]; then
    q "CREATE USER \"$INFLUXDB_WRITE_USER\" WITH PASSWORD '$INFLUXDB_WRITE_USER_PASSWORD'"
    q "GRANT WRITE ON \"$INFLUXDB_DB\" TO \"$INFLUXDB_WRITE_USER\""
  fi
  if [ -n "${INFLUXDB_READ_USER:-}" ]; then
    q "CREATE USER \"$INFLUXDB_READ_USER\" WITH PASSWORD '$INFLUXDB_READ_USER_PASSWORD'"
    q "GRANT READ ON \"$INFLUXDB_DB\" TO \"$INFLUXDB_READ_USER\""
  fi
fi
kill "$pid"
wait "$pid" || true
