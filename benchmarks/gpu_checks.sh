#!/usr/bin/env bash
# On a CUDA machine: the GPU tests (tests/test_cuda.py), then the benchmark
# (`optorch bench --device cuda`, impls foreach, compiled, graphed and graphed-foreach),
# each under a time limit, with logs in OUT. Exits non-zero when either fails, and with 2
# at once (one line) where there is no CUDA device.
#
#   benchmarks/gpu_checks.sh OUT [TEST_SECONDS] [BENCH_SECONDS] [OPTIMIZERS] [SETS]
#
# Needs python3 with torch (CUDA), pytest, pytest-xdist, optree, and the test extras
# (lion-pytorch, schedulefree); runs optorch from src/. Numbers go to docs/benchmarks.md.
set -u
out=${1:?usage: gpu_checks.sh OUT [TEST_SECONDS] [BENCH_SECONDS] [OPTIMIZERS] [SETS]}
test_seconds=${2:-300}
bench_seconds=${3:-300}
optimizers=${4:-all}
sets=${5:-gpt,small}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_checks.sh: no CUDA device (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
fi
mkdir -p "$out"
status=0

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, '| CUDA', \
torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
    nproc
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

start=$(date +%s)
if [ "$test_seconds" -gt 0 ]; then
    timeout "$test_seconds" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider \
        -n 8 --dist load -r fE > "$out/cuda_tests.txt" 2>&1
    code=$?
    echo "tests: exit $code after $(( $(date +%s) - start )) s"
    grep -E "passed|failed|error|skipped" "$out/cuda_tests.txt" | tail -n 3
    [ "$code" -eq 0 ] || status=1
fi

start=$(date +%s)
if [ "$bench_seconds" -gt 0 ]; then
    timeout "$bench_seconds" python3 -m optorch bench --device cuda --optimizers "$optimizers" \
        --sets "$sets" --impls foreach,compiled,graphed,graphed-foreach --steps 20 --warmup 3 --out "$out/bench" \
        > "$out/bench.txt" 2>&1
    code=$?
    echo "bench: exit $code after $(( $(date +%s) - start )) s"
    [ "$code" -eq 0 ] || { tail -n 3 "$out/bench.txt"; status=1; }
    rm -f "$out/bench/bench.png" "$out/bench/bench.csv"
fi
exit "$status"
