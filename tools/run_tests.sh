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
# launch: the many identical micro-config train steps compile once (a third off the suite's time).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d -t unimage_jax_cache.XXXXXX)}"
python -m pytest -q -p no:cacheprovider --timeout=1500 --tb=short -n 2 --durations=30 tests "$@"  # short tracebacks: no repr of (multi-device) arrays
