# The wattbus image: one binary, every service. Each container runs `wattbus run <service>`.
#
#   docker build -t wattbus .                     # compiles inside (slow on a Pi: see below)
#   docker build -t wattbus \
#     --build-arg BUILD_IMAGE=debian:bookworm-slim \
#     --build-arg WATTBUS_BINARY=dist .          # binaries built elsewhere (compose/build-pi.sh)
#
# Multi-arch with buildx, and why the runtime image looks the way it does: docs/docker.md.
# Only the classic builder's features are used (no heredocs, COPY --chmod or RUN --mount), so
# Debian's own docker.io builds it as well as BuildKit does.

ARG BUILD_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build: compile, or take the binary given --------------------------------------------
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
# A wattbus binary built elsewhere, as a path in the build context: a file, or a directory
# laid out as compose/build-pi.sh makes it (<dir>/arm64, armv7, amd64), from which the
# target platform's is taken. Empty: compile.
ARG WATTBUS_BINARY=
# Set by BuildKit (buildx --platform); the classic builder builds for the machine it runs on.
# (No defaults: a default, even an empty one, would hide BuildKit's value.)
ARG TARGETARCH
ARG TARGETVARIANT
RUN set -eu; \
    bin="${WATTBUS_BINARY}"; \
    if [ -n "$bin" ] && [ -d "$bin" ]; then \
        arch="${TARGETARCH:-}${TARGETVARIANT:-}"; \
        if [ -z "$arch" ]; then \
            arch=$(dpkg --print-architecture); \
            [ "$arch" = armhf ] && arch=armv7; \
        fi; \
        bin="$bin/$arch/wattbus"; \
    fi; \
    if [ -n "$bin" ]; then \
        test -f "$bin" || { echo "WATTBUS_BINARY: no $bin in the build context" >&2; exit 1; }; \
        install -D -m 0755 "$bin" /out/wattbus; \
    else \
        command -v cargo >/dev/null || { echo "no cargo in this build image: use a Rust image as BUILD_IMAGE, or pass WATTBUS_BINARY" >&2; exit 1; }; \
        cargo build --release --locked -p wattbus; \
        install -D -m 0755 target/release/wattbus /out/wattbus; \
    fi; \
    /out/wattbus --version

# --- runtime: no compiler, no shell tools beyond Debian's base, no curl -------------------
FROM ${RUNTIME_IMAGE}
# ca-certificates: TLS to InfluxDB Cloud, Azure and HTTPS endpoints is verified against them.
# The user is in dialout, so serial devices (root:dialout 0660 on the host) open without root.
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates=20230311*; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    groupadd --system --gid 10001 wattbus; \
    useradd --system --uid 10001 --gid wattbus --groups dialout \
        --home-dir /var/lib/wattbus --no-create-home --shell /usr/sbin/nologin wattbus; \
    install -d -o wattbus -g wattbus -m 0750 /var/lib/wattbus /var/lib/wattbus/backups
COPY --from=build /out/wattbus /usr/local/bin/wattbus
COPY compose/wattbus.toml /etc/wattbus/wattbus.toml

# By name, not uid:gid: only then does Docker add the user's other groups (dialout). The
# name resolves in this image (created above as uid 10001), which is all Docker needs.
# hadolint ignore=DL3066
USER wattbus
WORKDIR /var/lib/wattbus
# Journals, spools, energy counters: everything a service must keep across a restart.
VOLUME ["/var/lib/wattbus"]
# wattbus handles SIGTERM itself as PID 1: it flushes within shutdown_grace_ms (8 s) and exits.
STOPSIGNAL SIGTERM
# Asks the /healthz of whichever service process 1 runs (`wattbus run <service>`).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["wattbus", "health"]
ENTRYPOINT ["wattbus"]
CMD ["--help"]
