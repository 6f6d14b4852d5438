#!/usr/bin/env bash
# Set up what Kiln needs for ARM Linux targets, cached between runs:
#   * cross compilers (aarch64-linux-gnu-g++, arm-linux-gnueabihf-g++) and qemu-user-static (Debian packages);
#   * an emulated aarch64 device: a Debian bookworm arm64 root with Python 3.11 (debootstrap, first stage
#     only, debs unpacked by hand: no binfmt_misc or chroot needed) and a site directory with the aarch64
#     wheels of apache-tvm, apache-tvm-ffi, numpy, cloudpickle, psutil.
# Everything lives under ${KILN_CACHE:-$HOME/.cache/kiln}/arm64 (root/, site/). Idempotent: a second run
# only checks (well under a second). The first run takes about 1-2 minutes and needs network access to
# Debian and PyPI, and root (or sudo) for apt-get.
#
#   scripts/setup_arm.sh            # set up (or check) everything
#   scripts/setup_arm.sh --check    # exit 0 when set up, 1 otherwise; installs nothing
#
# Kiln finds the device through compiler.emulator (same cache path, or KILN_ARM_ROOT / KILN_ARM_SITE).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"

CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
ARM=$CACHE/arm64
ROOT=${KILN_ARM_ROOT:-$ARM/root}
SITE=${KILN_ARM_SITE:-$ARM/site}
MIRROR=${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
TVM_PIN="apache-tvm==0.27.0.post1"
FFI_PIN="apache-tvm-ffi==0.1.14.post1"
SITE_STAMP="$SITE/.kiln-site-$(echo "$TVM_PIN $FFI_PIN numpy cloudpickle psutil v1" | sha256sum | cut -c1-12)"
ROOT_STAMP="$ROOT/.kiln-root-v1"
TOOLS=(aarch64-linux-gnu-g++ arm-linux-gnueabihf-g++ qemu-aarch64-static qemu-arm-static debootstrap file)
PACKAGES=(g++-aarch64-linux-gnu gcc-aarch64-linux-gnu g++-arm-linux-gnueabihf gcc-arm-linux-gnueabihf
          qemu-user-static debootstrap file)

missing_tools() {
  local t out=()
  for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || out+=("$t"); done
  echo "${out[@]:-}"
}

if [ "${1:-}" = "--check" ]; then
  [ -z "$(missing_tools)" ] && [ -e "$ROOT_STAMP" ] && [ -e "$SITE_STAMP" ] && exit 0
  exit 1
fi

log() { echo "setup_arm: $*" >&2; }
t_start=$(date +%s)
mkdir -p "$ARM"

# -- 1. Debian packages ---------------------------------------------------------------------------
if [ -n "$(missing_tools)" ]; then
  log "missing: $(missing_tools)"
  apt_install "${PACKAGES[@]}"
  left=$(missing_tools)
  [ -z "$left" ] || { log "still missing after apt-get install: $left"; exit 1; }
fi

# -- 2. the aarch64 root (Debian arm64 with python3.11) -------------------------------------------
if [ ! -e "$ROOT_STAMP" ]; then
  log "building the arm64 root in $ROOT (debootstrap --foreign, $MIRROR)"
  tmp="$ROOT.partial"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,libpython3.11 \
    "$SUITE" "$tmp" "$MIRROR" >"$ARM.debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $ARM.debootstrap.log"; tail -5 "$ARM.debootstrap.log" >&2; exit 1; }
  # Instead of the second stage (which would need to execute arm64 binaries through binfmt_misc),
  # unpack every downloaded package; Python and the TVM runtime need no maintainer scripts.
  for deb in "$tmp"/var/cache/apt/archives/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$tmp"
  done
  rm -f "$tmp"/var/cache/apt/archives/*.deb
  [ -x "$tmp/usr/bin/python3.11" ] || { log "no usr/bin/python3.11 in the arm64 root"; exit 1; }
  rm -rf "$ROOT"
  mv "$tmp" "$ROOT"
  touch "$ROOT_STAMP"
fi

# -- 3. aarch64 wheels ----------------------------------------------------------------------------
if [ ! -e "$SITE_STAMP" ]; then
  log "installing aarch64 wheels ($TVM_PIN, $FFI_PIN, numpy, cloudpickle, psutil) into $SITE"
  PIP=${KILN_PIP:-}
  if [ -z "$PIP" ]; then
    here=$(cd "$(dirname "$0")/.." && pwd)
    if [ -x "$here/.venv/bin/python" ]; then PIP="$here/.venv/bin/python -m pip"; else PIP="python3 -m pip"; fi
  fi
  tmp="$SITE.partial"
  rm -rf "$tmp"
  $PIP install -q --disable-pip-version-check --target "$tmp" --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --implementation cp --only-binary=:all: \
    "$TVM_PIN" "$FFI_PIN" numpy cloudpickle psutil
  [ -e "$tmp/tvm/lib/libtvm_runtime.so" ] || { log "the aarch64 wheel has no tvm/lib/libtvm_runtime.so"; exit 1; }
  rm -rf "$SITE"
  mv "$tmp" "$SITE"
  touch "$SITE_STAMP"
fi

# -- 4. smoke test: import numpy under emulation (import tvm takes ~9 s, so it is left to the tests) --
if [ ! -e "$ARM/.smoke-ok" ] || [ "$ARM/.smoke-ok" -ot "$SITE_STAMP" ]; then
  PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" -c \
    "import platform, numpy; assert platform.machine() == 'aarch64', platform.machine()" \
    || { log "the emulated python3.11 does not run"; exit 1; }
  touch "$ARM/.smoke-ok"
fi
log "ready in $(( $(date +%s) - t_start )) s: root $ROOT, site $SITE"
