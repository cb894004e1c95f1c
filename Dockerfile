# The wattbus image: one binary, every service. Each container runs `wattbus run <service>`.
#
#   docker build -t wattbus .                     # compiles here (on a Pi 4: ~25 min)
#   docker build -t wattbus \
#     --build-arg BUILD_IMAGE=debian:bookworm-slim \
#     --build-arg WATTBUS_BINARY=dist/aarch64/wattbus .   # a binary built elsewhere (scripts/build-pi.sh)
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
# A path inside the build context to a wattbus binary for the target platform; empty: compile.
ARG WATTBUS_BINARY=
RUN set -eu; \
    if [ -n "${WATTBUS_BINARY}" ]; then \
        test -f "${WATTBUS_BINARY}" || { echo "WATTBUS_BINARY=${WATTBUS_BINARY}: no such file in the build context" >&2; exit 1; }; \
        install -D -m 0755 "${WATTBUS_BINARY}" /out/wattbus; \
    else \
        command -v cargo >/dev/null || { echo "no cargo in ${BUILD_IMAGE:-the build image}: use a Rust image, or pass WATTBUS_BINARY" >&2; exit 1; }; \
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
    install -d -o wattbus -g wattbus -m 0750 /var/lib/wattbus
COPY --from=build /out/wattbus /usr/local/bin/wattbus
COPY compose/wattbus.toml /etc/wattbus/wattbus.toml

USER 10001:10001
WORKDIR /var/lib/wattbus
# Journals, spools, energy counters: everything a service must keep across a restart.
VOLUME ["/var/lib/wattbus"]
# wattbus handles SIGTERM itself as PID 1: it flushes within shutdown_grace_ms (8 s) and exits.
STOPSIGNAL SIGTERM
# Asks the /healthz of whichever service process 1 runs (`wattbus run <service>`).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["wattbus", "health"]
ENTRYPOINT ["wattbus"]
CMD ["--help"]
