#!/bin/sh
# influxdb:1.8's /entrypoint.sh contract (see Dockerfile): `influxd` is initialised on its
# first start, anything else runs as given.
set -eu
if [ "${1:-}" = influxd ]; then
  /init-influxdb.sh
fi
exec "$@"
