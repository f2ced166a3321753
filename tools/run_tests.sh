#!/usr/bin/env bash
# Fresh machine -> set-up -> the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
UNIMAGE_EXTRAS=${UNIMAGE_EXTRAS-tpu} . tools/setup_env.sh  # tpu: libtpu for the ahead-of-time TPU compile tests
# Headless Chromium + its driver for the storyboard browser test (Debian packages).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && \
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  fi
fi
export JAX_PLATFORMS=cpu
# One persistent compilation cache for this run, shared by both workers and the tools the tests
# launch: the many identical micro-config train steps compile once.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d -t unimage_jax_cache.XXXXXX)}"
PYTEST=(python -m pytest -q -p no:cacheprovider --timeout=1500 --tb=short)  # short: no repr of multi-device arrays
if [ "$#" -gt 0 ]; then exec "${PYTEST[@]}" "$@"; fi
# Most tests are compile-bound: they run with XLA:CPU's LLVM backend at optimisation level 0 (a
# third less time; results within the tests' tolerances). The one execution-bound test, 500
# training steps of the overfit director, keeps the default level and runs beside them.
EXEC_BOUND=tests/test_overfit_director.py
log=$(mktemp -t unimage_overfit.XXXXXX.log)
"${PYTEST[@]}" "$EXEC_BOUND" > "$log" 2>&1 &
exec_pid=$!
rc=0
XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
  "${PYTEST[@]}" -n 2 --dist worksteal --durations=30 --ignore="$EXEC_BOUND" tests || rc=$?
exec_rc=0; wait "$exec_pid" || exec_rc=$?
echo "--- $EXEC_BOUND (default XLA optimisation, run beside the rest):"; cat "$log"
if [ "$rc" -ne 0 ] || [ "$exec_rc" -ne 0 ]; then exit 1; fi
