#!/bin/sh
# Make the secrets docker-compose.yml reads: one random password per broker user, InfluxDB's
# writer (influx_password), admin and reader, Grafana's admin, and plug-bridge's API token. Existing files are kept, so running it again (after
# an upgrade adds a service) only adds what is missing.
#
# secrets/ is 0700: nobody else on this machine can read into it. The files in it are 0644
# because Docker (without Swarm) bind-mounts them into the containers as they are, and the
# services run as their own users there (wattbus 10001, InfluxDB, Grafana 472).
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 0700 secrets
made=""
for name in broker_modbus_ingest broker_serial_ingest broker_simulator broker_rms_processor \
            broker_influx_writer broker_backup_rotator broker_plug_bridge broker_azure_bridge \
            broker_node_health \
            broker_homeassistant broker_reader \
            influx_password influx_admin_password influx_grafana_password \
            grafana_admin_password plug_api_token; do
  file="secrets/$name"
  [ -s "$file" ] && continue
  # 24 random bytes, as 32 characters that need no quoting anywhere.
  head -c 24 /dev/urandom | base64 | tr '+/' '-_' > "$file.tmp"
  chmod 0644 "$file.tmp"
  mv "$file.tmp" "$file"
  made="$made $name"
done
# Not random: the IoT Hub device's connection string is the user's to paste in (azure-bridge,
# `--profile azure`). An empty file until then: compose needs it to exist, and azure-bridge
# refuses an empty one by name.
if [ ! -e secrets/azure_connection_string ]; then
  : > secrets/azure_connection_string
  chmod 0644 secrets/azure_connection_string
  made="$made azure_connection_string(empty:fill_it_in)"
fi
if [ -n "$made" ]; then
  echo "made:$made (in $(pwd)/secrets)"
else
  echo "all secrets exist (in $(pwd)/secrets)"
fi
