#!/usr/bin/env bash
# Compile the sketches for the Arduino Uno (ATmega328P, 16 MHz), as the Arduino IDE would,
# with Debian's avr-gcc and Arduino AVR core: catches a sketch that no longer builds without
# an IDE or arduino-cli (neither is packaged in a way CI can use offline). Each sketch is built
# in every SENSORS/CHANNELS variant and must fit the Uno's flash and RAM.
#
# Usage: services/serial-ingest/sketches/check.sh     (installs its packages with apt-get
# when missing; run as root or with sudo). Exits non-zero on any compile error or warning in a
# sketch.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
core_root=/usr/share/arduino/hardware/arduino/avr

if ! command -v avr-gcc >/dev/null || [ ! -f "$core_root/cores/arduino/Arduino.h" ]; then
  echo "Installing gcc-avr, avr-libc, binutils-avr and arduino-core-avr ..."
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    gcc-avr avr-libc binutils-avr arduino-core-avr >/dev/null
fi

core="$core_root/cores/arduino"
variant="$core_root/variants/standard"
# The Uno's limits from boards.txt (flash minus the bootloader).
max_flash=32256
max_ram=2048

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

common=(-mmcu=atmega328p -DF_CPU=16000000L -DARDUINO=10819 -DARDUINO_AVR_UNO
  -DARDUINO_ARCH_AVR -Os -ffunction-sections -fdata-sections -I"$core" -I"$variant")

# Debian's avr-gcc is 5.4, whose <float.h> defines DECIMAL_DIG for C99 only; the core's
# WString.cpp (built by the IDE with avr-gcc 7) expects it in C++11 too. Same value.
cxx_core_fix=(-DDECIMAL_DIG=__DECIMAL_DIG__)

# The core, once: its own warnings are the core's business (the IDE builds it with -w too).
mkdir -p "$build/core"
for f in "$core"/*.c; do
  avr-gcc "${common[@]}" -w -std=gnu11 -c "$f" -o "$build/core/$(basename "$f").o"
done
for f in "$core"/*.cpp; do
  avr-g++ "${common[@]}" "${cxx_core_fix[@]}" -w -std=gnu++11 -fpermissive -fno-exceptions -fno-threadsafe-statics \
    -c "$f" -o "$build/core/$(basename "$f").o"
done
for f in "$core"/*.S; do
  avr-gcc "${common[@]}" -x assembler-with-cpp -c "$f" -o "$build/core/$(basename "$f").o"
done
avr-gcc-ar rcs "$build/core.a" "$build"/core/*.o

# sketch name, then one -D per variant
compile() {
  local sketch="$1" define="$2"
  local out="$build/$sketch-${define//[^A-Za-z0-9]/_}"
  # What the IDE does to an .ino: include Arduino.h first. The sketches define every
  # function before its use, so no generated prototypes are needed.
  { echo '#include <Arduino.h>'; echo "#line 1 \"$sketch.ino\""; cat "$here/$sketch/$sketch.ino"; } >"$out.cpp"
  avr-g++ "${common[@]}" -D"$define" -std=gnu++11 -fno-exceptions -fno-threadsafe-statics \
    -Wall -Wextra -Werror -c "$out.cpp" -o "$out.o"
  avr-gcc -mmcu=atmega328p -Os -Wl,--gc-sections "$out.o" "$build/core.a" -lm -o "$out.elf"
  avr-objcopy -O ihex -R .eeprom "$out.elf" "$out.hex"
  # text + data go to flash; data + bss are RAM.
  read -r text data bss _ < <(avr-size -A "$out.elf" | awk '
    $1==".text"{t=$2} $1==".data"{d=$2} $1==".bss"{b=$2} END{print t+0, d+0, b+0}')
  local flash=$((text + data)) ram=$((data + bss))
  echo "$sketch ($define): flash $flash/$max_flash bytes, static RAM $ram/$max_ram bytes"
  if [ "$flash" -gt "$max_flash" ] || [ "$ram" -gt $((max_ram * 3 / 4)) ]; then
    echo "$sketch ($define): too big for an Uno (RAM above 75% leaves the stack too little)" >&2
    return 1
  fi
}

compile powmon SENSORS=1
compile powmon SENSORS=3
compile prime CHANNELS=1
compile prime CHANNELS=2
compile prime CHANNELS=3
echo "All sketches compile for the Uno."
