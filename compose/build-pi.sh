#!/bin/sh
# Release binaries of wattbus for Raspberry Pis, cross-compiled on a Debian/Ubuntu machine:
#   dist/arm64/wattbus   aarch64-unknown-linux-gnu       64-bit Raspberry Pi OS (Pi 3, 4, 5)
#   dist/armv7/wattbus   armv7-unknown-linux-gnueabihf   32-bit Raspberry Pi OS (Pi 2, 3, 4)
#   dist/amd64/wattbus   x86_64-unknown-linux-gnu        a PC or server (with `amd64`)
#
#   compose/build-pi.sh                 # arm64 and armv7
#   compose/build-pi.sh arm64 amd64     # just these
#
# Once, before: rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#   and: apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
#          libc6-dev-arm64-cross libc6-dev-armhf-cross
# Try one without a Pi: qemu-aarch64-static -L /usr/aarch64-linux-gnu dist/arm64/wattbus --version
# An image from one: docker build --build-arg WATTBUS_BINARY=dist/arm64/wattbus ... (docs/docker.md)
#
# WATTBUS_PROFILE=dev builds unoptimised binaries quickly (what the tests smoke-run).
set -eu
cd "$(dirname "$0")/.."
profile="${WATTBUS_PROFILE:-release}"
[ "$profile" = dev ] && out_dir=debug || out_dir="$profile"
archs="${*:-arm64 armv7}"
for arch in $archs; do
  case "$arch" in
    arm64) target=aarch64-unknown-linux-gnu; cc=aarch64-linux-gnu-gcc ;;
    armv7) target=armv7-unknown-linux-gnueabihf; cc=arm-linux-gnueabihf-gcc ;;
    amd64) target=x86_64-unknown-linux-gnu; cc=gcc ;;
    *) echo "unknown architecture $arch (arm64, armv7 or amd64)" >&2; exit 64 ;;
  esac
  command -v "$cc" >/dev/null || { echo "$cc is missing (the header of $0 says what to install)" >&2; exit 1; }
  upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
  echo "==> $arch ($target, $profile)"
  env "CARGO_TARGET_${upper}_LINKER=$cc" "CC_$(echo "$target" | tr '-' '_')=$cc" \
    cargo build --locked -p wattbus --target "$target" --profile "$profile"
  install -D -m 0755 "target/$target/$out_dir/wattbus" "dist/$arch/wattbus"
  ls -l "dist/$arch/wattbus"
done
