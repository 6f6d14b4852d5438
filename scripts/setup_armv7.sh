#!/usr/bin/env bash
# Build the TVM runtime for 32-bit ARMv7 hard-float boards, cached between runs. PyPI has no armv7 TVM
# wheels, so this cross-compiles (arm-linux-gnueabihf-g++, -j2) the sources that the installed x86 wheels
# ship, the same versions Kiln compiles with:
#   * libtvm_ffi.so      from tvm_ffi/src/ffi (apache-tvm-ffi wheel), all of it but the testing library,
#                        without libbacktrace (errors carry no native backtrace);
#   * libtvm_runtime.so  from tvm/src/runtime (apache-tvm wheel): module loading, tensors, CPU device,
#                        thread pool, memory manager and the Relax VM (what a Kiln .so needs); not RPC,
#                        disco, the contrib/GPU backends (src/runtime/extra), nor the LLM serving state
#                        (paged KV cache, RNN state, attention backends, lm_support: ~45% of the compile
#                        time, unused by Kiln's models). The wheel omits seven headers those sources
#                        include: compiler/runner/tvm_headers/ vendors them (see its NOTICE).
# Linked with -Wl,--no-as-needed (the armhf linker would otherwise drop libtvm_ffi from libtvm_runtime).
# The libraries need glibc >= 2.34 and libstdc++ of GCC >= 12 on the board (Debian 12 / Raspberry Pi OS
# bookworm, 32-bit); they run under `qemu-arm-static -L /usr/arm-linux-gnueabihf` here.
#
# Result: ${KILN_CACHE:-$HOME/.cache/kiln}/armv7/lib/{libtvm_ffi.so,libtvm_runtime.so,kiln-runtime.json};
# `kiln package model.so --target armv7` takes them from there (compiler/package.py). Idempotent: a second
# run only checks (well under a second); the first took 203 s here (2 shared cores, 146 s CPU). A change of the
# installed wheels, this script, the vendored headers or the cross compiler rebuilds.
#
#   scripts/setup_armv7.sh            # build (or check) the runtime
#   scripts/setup_armv7.sh --check    # exit 0 when built for the installed wheels, 1 otherwise
#
# Needs arm-linux-gnueabihf-g++, qemu-arm-static and make (scripts/setup_arm.sh installs the first two;
# missing ones are apt-get installed here). KILN_PYTHON picks the Python whose wheels are used (default:
# .venv/bin/python); KILN_ARMV7_JOBS the parallel compile jobs (default 2).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"

here=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
OUT=$CACHE/armv7
LIB=$OUT/lib
CXX=arm-linux-gnueabihf-g++
QEMU=qemu-arm-static
JOBS=${KILN_ARMV7_JOBS:-2}
PY=${KILN_PYTHON:-$here/.venv/bin/python}
VENDOR=$here/compiler/runner/tvm_headers
RUNNER=$here/compiler/runner/kiln_runner.cc
# LLM serving state: not needed by Kiln modules (see above)
RT_EXCLUDE="paged_kv_cache.cc kv_state.cc rnn_state.cc attn_backend.cc lm_support.cc"

log() { echo "setup_armv7: $*" >&2; }
[ -x "$PY" ] || PY=python3

# -- where the wheels are (no `import tvm`: it takes seconds) and which versions ----------------------
read -r TVM_DIR FFI_DIR TVM_VER FFI_VER < <("$PY" - <<'EOF'
import importlib.metadata as md, importlib.util as iu
dirs = [iu.find_spec(m).submodule_search_locations[0] for m in ("tvm", "tvm_ffi")]
print(*dirs, md.version("apache-tvm"), md.version("apache-tvm-ffi"))
EOF
) || { log "cannot find the apache-tvm / apache-tvm-ffi wheels with $PY: run scripts/setup.sh first"; exit 1; }
[ -d "$TVM_DIR/src/runtime" ] && [ -d "$FFI_DIR/src/ffi" ] \
  || { log "the installed wheels ship no sources ($TVM_DIR/src/runtime, $FFI_DIR/src/ffi)"; exit 1; }

CXX_VER=$(command -v "$CXX" >/dev/null 2>&1 && "$CXX" --version | head -1 || echo none)
KEY=$( { echo "$TVM_VER $FFI_VER $CXX_VER $RT_EXCLUDE"; cat "$0"; find "$VENDOR" -name "*.h" | sort | xargs cat; } \
       | sha256sum | cut -c1-12)
STAMP=$LIB/.kiln-armv7-$KEY

if [ "${1:-}" = "--check" ]; then
  [ -e "$STAMP" ] && [ -e "$LIB/libtvm_runtime.so" ] && [ -e "$LIB/libtvm_ffi.so" ] && exit 0
  exit 1
fi
if [ -e "$STAMP" ]; then
  log "ready: $LIB (apache-tvm $TVM_VER, apache-tvm-ffi $FFI_VER; cached)"
  exit 0
fi

# -- tools ------------------------------------------------------------------------------------------
missing=()
command -v "$CXX" >/dev/null 2>&1 || missing+=(g++-arm-linux-gnueabihf)
command -v "$QEMU" >/dev/null 2>&1 || missing+=(qemu-user-static)
command -v make >/dev/null 2>&1 || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
  CXX_VER=$("$CXX" --version | head -1)
fi

t_start=$(date +%s)
BUILD=$OUT/build-$KEY  # kept if the build is interrupted: the next run resumes it
mkdir -p "$OUT"
find "$OUT" -maxdepth 1 -name 'build-*' ! -name "build-$KEY" -exec rm -rf {} +  # stale keys
mkdir -p "$BUILD"
log "building libtvm_ffi.so and libtvm_runtime.so for armv7 (apache-tvm $TVM_VER, apache-tvm-ffi $FFI_VER," \
    "$CXX_VER, -j$JOBS) in $BUILD"

# The runtime sources include their headers by relative paths (../support/utils.h): stage them next to
# the vendored src/support, as in TVM's tree.
rm -rf "$BUILD/src"
mkdir -p "$BUILD/src/runtime"
(cd "$TVM_DIR/src/runtime" && cp -rp --parents ./*.cc ./*.h memory vm "$BUILD/src/runtime/")
rm -rf "$BUILD/src/runtime/vm/cuda" "$BUILD/src/runtime/vm/hexagon"
for f in $RT_EXCLUDE; do rm -f "$BUILD/src/runtime/vm/$f"; done
cp -rp "$VENDOR/src/support" "$BUILD/src/"

FFI_SRCS=$(cd "$FFI_DIR/src/ffi" && find . -name '*.cc' ! -path './testing/*' ! -name backtrace_win.cc \
           | sed 's|^\./||' | sort | tr '\n' ' ')
RT_SRCS=$(cd "$BUILD/src/runtime" && find . -name '*.cc' | sed 's|^\./||' | sort | tr '\n' ' ')

cat >"$BUILD/Makefile" <<'EOF'
# Generated by scripts/setup_armv7.sh: make -C BUILD CXX=... FFI=... TVM=... VENDOR=... FFI_SRCS=... RT_SRCS=...
COMMON := -std=c++17 -O2 -fPIC -DNDEBUG -Wno-psabi -DTVM_FFI_CMAKE_LITTLE_ENDIAN=1 \
          -I$(FFI)/include -I$(FFI)/3rdparty/dlpack/include
FFI_FLAGS := $(COMMON) -fvisibility=hidden -fvisibility-inlines-hidden \
             -DTVM_FFI_USE_LIBBACKTRACE=0 -DTVM_FFI_BACKTRACE_ON_SEGFAULT=1
RT_FLAGS := $(COMMON) -DTVM_RUNTIME_EXPORTS -I$(TVM)/include -I$(VENDOR)/include -I$(VENDOR)/3rdparty/compiler-rt
FFI_OBJS := $(patsubst %.cc,obj/ffi/%.o,$(FFI_SRCS))
RT_OBJS := $(patsubst %.cc,obj/runtime/%.o,$(RT_SRCS))

all: lib/libtvm_ffi.so lib/libtvm_runtime.so

obj/ffi/%.o: $(FFI)/src/ffi/%.cc
	@mkdir -p $(dir $@)
	@echo "  CXX ffi/$*.cc"
	@$(CXX) $(FFI_FLAGS) -c $< -o $@

obj/runtime/%.o: src/runtime/%.cc
	@mkdir -p $(dir $@)
	@echo "  CXX runtime/$*.cc"
	@$(CXX) $(RT_FLAGS) -c $< -o $@

lib/libtvm_ffi.so: $(FFI_OBJS)
	@mkdir -p lib
	$(CXX) -shared -Wl,-soname,libtvm_ffi.so -Wl,--no-as-needed -Wl,--exclude-libs,ALL -Wl,--no-undefined \
	  $^ -lpthread -ldl -o $@

lib/libtvm_runtime.so: $(RT_OBJS) lib/libtvm_ffi.so
	$(CXX) -shared -Wl,-soname,libtvm_runtime.so -Wl,--no-as-needed -Wl,--no-undefined \
	  $(RT_OBJS) -Llib -ltvm_ffi -lpthread -ldl -o $@
EOF

if ! make -C "$BUILD" -j"$JOBS" CXX="$CXX" FFI="$FFI_DIR" TVM="$TVM_DIR" VENDOR="$VENDOR" \
     FFI_SRCS="$FFI_SRCS" RT_SRCS="$RT_SRCS" >"$BUILD/build.log" 2>&1; then
  log "the build failed; the end of $BUILD/build.log:"
  tail -30 "$BUILD/build.log" >&2
  exit 1
fi

# -- smoke test: the runner links against both libraries and starts under QEMU ------------------------
"$CXX" -std=c++17 -O2 -Wno-psabi -I"$FFI_DIR/include" "$RUNNER" -o "$BUILD/kiln_runner" -L"$BUILD/lib" \
  -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib'
set +e
smoke=$(cd "$BUILD" && "$QEMU" -L /usr/arm-linux-gnueabihf ./kiln_runner 2>&1)
rc=$?
set -e
if [ "$rc" != 2 ] || [[ "$smoke" != *usage* ]]; then
  log "the armv7 runner does not start under $QEMU (exit $rc): $smoke"
  exit 1
fi

# -- install ------------------------------------------------------------------------------------------
tmp=$LIB.partial
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$BUILD/lib/libtvm_ffi.so" "$BUILD/lib/libtvm_runtime.so" "$tmp/"
secs=$(( $(date +%s) - t_start ))
cat >"$tmp/kiln-runtime.json" <<EOF
{"arch": "armv7", "apache-tvm": "$TVM_VER", "apache-tvm-ffi": "$FFI_VER", "compiler": "$CXX_VER",
 "excluded": "$RT_EXCLUDE", "build_seconds": $secs, "jobs": $JOBS}
EOF
touch "$tmp/.kiln-armv7-$KEY"
rm -rf "$LIB"
mv "$tmp" "$LIB"
rm -rf "$BUILD"
size() { echo "$(( $(stat -c %s "$1") / 1000 )) kB"; }
log "built in $secs s: $LIB/libtvm_runtime.so ($(size "$LIB/libtvm_runtime.so")), $LIB/libtvm_ffi.so" \
    "($(size "$LIB/libtvm_ffi.so"))"
