#!/usr/bin/env bash
# dynprune developer entry point.
#   ./dev.sh setup   install the CPU build of torch (if missing), deps, build the extension
#   ./dev.sh test    setup, then the test suite and a one-shot run of every benchmark case
#   ./dev.sh demo    setup, then convert ResNet-18 (outputs match, measured speedup),
#                    then the default FL experiment (table in fl-results/, ~6 min)
#   ./dev.sh bench   setup, then the layer benchmarks (table + benchmarks/results/)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # torch first, pinned to the CPU build available locally: an unpinned
    # `torch` (or pip's isolated build env) would pull a multi-GB CUDA build.
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q "torch==${DYNPRUNE_TORCH_VERSION:-2.13.0}"
    fi
    "$PY" -m pip install -q numpy ninja tqdm scikit-learn matplotlib triton pytest pytest-benchmark
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    "$PY" -c "import dynprune; b = dynprune.backends(); print('dynprune backends:', b); \
assert b['cpu'] == 'native', 'native CPU kernels failed to load'"
}

case "${1:-test}" in
    setup) setup ;;
    test)
        setup
        DYNPRUNE_REQUIRE_NATIVE=1 "$PY" -m pytest tests -q "${@:2}"
        # benchmark smoke: every case runs once, nothing is timed or written
        "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable
        ;;
    demo)
        setup
        "$PY" -m dynprune.bench demo
        # Fashion-MNIST from Debian when we can install it; else the FL run says
        # so and uses scikit-learn's bundled digits.
        if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] \
                && command -v apt-get >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
                || echo "could not install dataset-fashion-mnist; the FL demo uses digits"
        fi
        "$PY" -m dynprune.fl --out fl-results --overwrite
        ;;
    bench)
        setup
        "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,iqr \
            --benchmark-json=benchmarks/results/benchmarks_cpu_raw.json "${@:2}"
        ;;
    *) echo "usage: ./dev.sh {setup|test|demo|bench}" >&2; exit 2 ;;
esac
