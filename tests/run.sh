#!/usr/bin/env bash
# The wattbus test command: the one README.md gives and .ci/run calls.
#
# On a fresh Debian machine it installs what the tests need (mosquitto and its clients for
# interop, socat for virtual serial ports, openssl for the TLS test's certificates, InfluxDB
# 1.6.7 and VictoriaMetrics for influx-writer; the tests start those themselves; avr-gcc and the
# Arduino core to compile the serial-ingest sketches; pymodbus for Modbus interop;
# grafana-foundation-sdk for the dashboards' schema; checkov and python-hcl2 for terraform/;
# Azurite for Azure Blob storage, s3s-fs for S3; schemathesis for plug-bridge's API), starts the
# shared servers on free loopback ports, builds the workspace, runs every test, and stops the
# servers again. Repeated runs skip installs that are already done.
#
# The container tests (tests/tests/containers.rs) get a real Docker engine of their own:
# Debian's docker.io and the compose v2 plugin, a private dockerd, and images built here
# (tests/containers/engine.sh).
#
# Environment passed to the tests:
#   MOSQUITTO_TEST_BROKER  host:port:user:password of a mosquitto 2 broker started here, for the
#                          runtime's interop tests and the end-to-end tests (the services' own
#                          tests start wattbus's broker in-process and need no environment).
#   WBTEST_DOCKER_HOST, WBTEST_IMAGE, WBTEST_INFLUXDB_IMAGE
#                          the private Docker engine and the images the container tests run.
#   WBTEST_PI_DIST         the cross-compiled Pi binaries (<dir>/arm64, <dir>/armv7).
#   WBTEST_CHECKOV, WBTEST_TF_PYTHON, WBTEST_AZURITE, WBTEST_S3S, WBTEST_SCHEMATHESIS
#                          checkov, a Python with python-hcl2, Azurite's azurite-blob, s3s-fs,
#                          schemathesis's st.
#   (Not WATTBUS_*: wattbus reads that prefix as configuration, and the binaries the tests
#   start inherit this environment.)
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/wattbus-tests.XXXXXX")
pids=()
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"

# Each step with the time since the start, so a slow step shows in CI's log.
log() { printf '==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*" >&2; }

# shellcheck source=tests/containers/engine.sh
. "$root/tests/containers/engine.sh"

cleanup() {
  local status=$?
  engine_stop || true
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT INT TERM

# --- 1. Packages ------------------------------------------------------------------------
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# systemd-analyze verifies the shipped systemd unit in a CLI test.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# prlimit runs the broker out of file descriptors in a CLI test (util-linux, Essential in Debian).
command -v prlimit >/dev/null 2>&1 || need_apt+=(util-linux)
# influx-writer's servers: InfluxDB 1.6.7 (v1 API, InfluxQL) and VictoriaMetrics 1.79 (v2 API).
[ -x /usr/bin/influxd ] || need_apt+=(influxdb)
command -v influx >/dev/null 2>&1 || need_apt+=(influxdb-client)
[ -x /usr/bin/victoria-metrics ] || need_apt+=(victoria-metrics)
# The file-output test reads the CSV files with Python's csv module.
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "Installing ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)

# pymodbus: a Modbus implementation nobody here wrote, as the server in modbus interop tests
# (tests/modbus/we515_server.py). Pinned: the script is written against this version's API.
# grafana-foundation-sdk: Grafana's own types, which grafana/build.py builds the dashboards
# and alert rules with and checks the checked-in files against (tests/tests/grafana.rs).
pymodbus_pins=(pymodbus==3.16.1 pyserial==3.5 "grafana-foundation-sdk==1769699998!10.1.0")
if ! python3 -c 'import pymodbus, serial, sys, importlib.metadata as m; sys.exit(pymodbus.__version__ != "3.16.1" or m.version("grafana-foundation-sdk") != "1769699998!10.1.0")' 2>/dev/null; then
  log "Installing ${pymodbus_pins[*]}"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  # Debian's own python3 refuses user installs into the system (PEP 668); the tests need
  # these packages for that very interpreter, so say so explicitly there.
  python3 -m pip install -q "${pymodbus_pins[@]}" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "${pymodbus_pins[@]}"
fi

# Tools from PyPI and npm, cached under target/test-tools (a new pin reinstalls):
# - checkov and python-hcl2 for terraform/ (tests/tests/terraform.rs), each in its own venv:
#   both install a module named hcl2 (checkov through bc-python-hcl2), and checkov's
#   dependencies would clash with other Python tools on the machine;
# - Azurite, the Azure Blob emulator, for backup-rotator's Azure storage (tests/tests/backup.rs);
# - s3s-fs (crates.io) for its S3 storage;
# - schemathesis, to fuzz plug-bridge's HTTP API from its OpenAPI description (tests/tests/plugs.rs).
tools="$root/target/test-tools"
mkdir -p "$tools"
py_venv() {
  local dir=$1; shift
  [ "$(cat "$dir/.pins" 2>/dev/null)" = "$*" ] && return 0
  log "Installing $* (in $dir)"
  rm -rf "$dir"
  if ! python3 -m venv "$dir" >/dev/null 2>&1; then
    rm -rf "$dir"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
  echo "$*" > "$dir/.pins"
}
py_venv "$tools/checkov" checkov==3.3.30
py_venv "$tools/hcl2" python-hcl2==8.1.4
py_venv "$tools/schemathesis" schemathesis==4.32.5
export WBTEST_CHECKOV="$tools/checkov/bin/checkov" WBTEST_TF_PYTHON="$tools/hcl2/bin/python"
export WBTEST_SCHEMATHESIS="$tools/schemathesis/bin/st"
azurite_pin="azurite@3.35.0"
if [ "$(cat "$tools/azurite/.pin" 2>/dev/null)" != "$azurite_pin" ]; then
  log "Installing $azurite_pin (in $tools/azurite)"
  if ! command -v npm >/dev/null 2>&1; then
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  rm -rf "$tools/azurite"
  npm install --prefix "$tools/azurite" --no-audit --no-fund --loglevel=error "$azurite_pin" >/dev/null
  echo "$azurite_pin" > "$tools/azurite/.pin"
fi
export WBTEST_AZURITE="$tools/azurite/node_modules/.bin/azurite-blob"
# s3s-fs, an S3-compatible server over a directory that checks SigV4 signatures, for
# backup-rotator's S3 storage. 0.14.1 builds with Rust 1.92 and later (0.17 needs 1.96).
s3s_pin="s3s-fs@0.14.1"
if [ "$(cat "$tools/s3s/.pin" 2>/dev/null)" != "$s3s_pin" ]; then
  log "Installing $s3s_pin (in $tools/s3s; compiles for about two minutes)"
  rm -rf "$tools/s3s"
  cargo install --quiet --locked --features binary --root "$tools/s3s" "$s3s_pin"
  echo "$s3s_pin" > "$tools/s3s/.pin"
fi
export WBTEST_S3S="$tools/s3s/bin/s3s-fs"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "$name did not start listening on $port"; return 1
}

# --- 2. Shared servers --------------------------------------------------------------------
log "Starting mosquitto (independent broker for interop tests)"
mq_port=$(free_port)
mq_pass="mq-$RANDOM$RANDOM"
mosquitto_passwd -b -c "$work/mosquitto.passwd" wattbus "$mq_pass"
chmod 0644 "$work/mosquitto.passwd"
cat > "$work/mosquitto.conf" <<CONF
listener $mq_port 127.0.0.1
allow_anonymous false
password_file $work/mosquitto.passwd
persistence false
log_dest file $work/mosquitto.log
user $(id -un)
CONF
"$mosquitto_bin" -c "$work/mosquitto.conf" >/dev/null 2>&1 &
pids+=($!)
wait_port "$mq_port" mosquitto
export MOSQUITTO_TEST_BROKER="127.0.0.1:$mq_port:wattbus:$mq_pass"

# --- 3. Build and test --------------------------------------------------------------------
# End-to-end tests run the `wattbus` and `probe` binaries as real processes (to kill -9 them),
# so the binaries are built first.
# Line tables only, not full debug info: panics and backtraces keep their file and line, and
# the many test binaries compile and link markedly faster (this command's time is mostly
# compiling: the host, two Pi targets, the tests).
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
# No incremental compilation caches: this command builds once, and on a fresh machine they
# only cost time and disk (they were over a third of target/, and a CI run once ran out of
# disk while compiling).
export CARGO_INCREMENTAL=0
log "Building"
cargo build --workspace --bins --locked
engine_start

# The Raspberry Pi binaries (tests/tests/pi.rs runs them under qemu-user): the cross
# toolchains, then compose/build-pi.sh, unoptimised for time.
need_apt=()
for p in gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross qemu-user-static file; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  log "Installing ${need_apt[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  rustup target list --installed | grep -qx "$t" || {
    log "Adding the Rust target $t"
    rustup target add "$t" || { log "rustup cannot add $t here: the Pi binaries cannot be built"; exit 1; }
  }
done
# The demo starts its broker as a child process: under qemu-user that exec of an ARM binary
# needs the kernel to know ARM binaries go to qemu (binfmt_misc, as qemu-user-static's
# systemd-binfmt would set up on a systemd machine).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  $sudo_cmd mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
for a in aarch64 arm; do
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$a" ] \
    || $sudo_cmd sh -c "cat /usr/lib/binfmt.d/qemu-$a.conf > /proc/sys/fs/binfmt_misc/register"
done
log "Cross-compiling the Pi binaries (compose/build-pi.sh arm64 armv7, unoptimised)"
WATTBUS_PROFILE=dev ./compose/build-pi.sh arm64 armv7 >/dev/null
export WBTEST_PI_DIST="$root/dist"
log "Testing"
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
log "Compiling the Arduino sketches (serial-ingest/sketches) for the Uno"
./services/serial-ingest/sketches/check.sh
log "Testing the broker's optional TLS listener (cargo feature tls)"
cargo test -p broker --features tls --locked -- --test-threads=2
log "Done"
