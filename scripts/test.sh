#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run Kiln's test suite. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m "not slow"      # the quick set
#   scripts/test.sh                    # everything (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# ARM: cross toolchains and the emulated aarch64 device (cached; KILN_SKIP_ARM_SETUP=1 skips it, and the
# `emulator` tests then skip with a reason)
[ -n "${KILN_SKIP_ARM_SETUP:-}" ] || scripts/setup_arm.sh
# ARMv7: the TVM runtime cross-compiled for armv7 (about 3.5 minutes once, cached; KILN_SKIP_ARM_SETUP=1 skips
# it too, and the `armv7` tests then skip with a reason)
[ -n "${KILN_SKIP_ARM_SETUP:-}" ] || scripts/setup_armv7.sh
# Microcontrollers: arm-none-eabi-gcc, newlib and qemu-system-arm (KILN_SKIP_MCU_SETUP=1 skips it, and the
# `mcu` tests then skip with a reason)
[ -n "${KILN_SKIP_MCU_SETUP:-}" ] || scripts/setup_mcu.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
