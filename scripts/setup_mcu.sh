#!/usr/bin/env bash
# Install what Kiln's microcontroller path needs to build and emulate a Cortex-M library:
# arm-none-eabi-gcc (with newlib: libc, libm) and qemu-system-arm.
# Idempotent: when everything is present it only checks. Usage: scripts/setup_mcu.sh
# Needs root (or sudo) and Debian/Ubuntu's apt; elsewhere install the same tools by hand.
set -euo pipefail
need=()
command -v arm-none-eabi-gcc >/dev/null 2>&1 || need+=(gcc-arm-none-eabi)
# newlib (libc, libm and nosys.specs) ships in libnewlib-arm-none-eabi
if ! command -v arm-none-eabi-gcc >/dev/null 2>&1 || [ -z "$(arm-none-eabi-gcc -print-file-name=nosys.specs | grep /)" ]; then
  need+=(libnewlib-arm-none-eabi)
fi
command -v qemu-system-arm >/dev/null 2>&1 || need+=(qemu-system-arm)
if [ ${#need[@]} -eq 0 ]; then
  echo "mcu toolchain ready: $(arm-none-eabi-gcc -dumpversion) / $(qemu-system-arm --version | head -1)"
  exit 0
fi
source "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"
apt_install "${need[@]}"
echo "mcu toolchain ready: $(arm-none-eabi-gcc -dumpversion) / $(qemu-system-arm --version | head -1)"
