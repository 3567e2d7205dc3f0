#!/usr/bin/env bash
# root_hf on one CUDA GPU (root_hf issues 16, 21 and 22); the part limits add up to under 13 minutes:
#   1. environment (GPU, torch, transformers),
#   2. tests/gpu (bf16 Newton-Schulz vs float64, ROOT steps on CUDA vs CPU float64, a tiny bf16 Trainer run),
#   3. benchmarks/step_time.py --device cuda: bf16 / fp32 NS error vs the float64 polar factor on the benchmark
#      shapes, ROOT vs torch.optim.Muon (and the optional peers) step time (torch.cuda.synchronize, medians),
#      torch.cuda.max_memory_allocated rise of a steady step per optimizer, first-step overhead,
#   4. tests/optim/test_gram.py -m gpu and benchmarks/gram.py --device cuda: standard vs Gram Newton-Schulz per shape
#      (accuracy, time; issue 22),
#   5. (issue 21) the steady step under torch.cuda.set_sync_debug_mode("error"), and a CUDA step-time table (whole
#      steps, the AdamW branch vs torch.optim.AdamW(foreach=True), the step outside Newton-Schulz).
# Each part has its own time limit; a failing part is reported and the next one runs. Results go to $OUT when it is
# set (the device tool's output folder), else to benchmarks/results/gpu/.
# Usage: bash benchmarks/gpu_check.sh            (from anywhere; it cds to the repository root)
# Optional peers (Emerging-Optimizers, heavyball): put their wheels in ./.whl (gitignored) to have them installed.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
RESULTS="${OUT:-$PWD/benchmarks/results/gpu}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
failed=0
t0=$(date +%s)

part() {  # part NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log, never abort
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "=== $name (limit ${limit} s) ==="
    timeout --kill-after=15 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    tail -n 80 "$RESULTS/$name.log"
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED (rc $rc)"
    fi
    [ "$verdict" = ok ] || failed=1
    echo "$name: $verdict in $(($(date +%s) - start)) s" | tee -a "$SUMMARY"
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

part env 40 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY - <<'PY'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')
import importlib.metadata as md
for name in ('transformers', 'accelerate', 'peft', 'heavyball', 'emerging-optimizers'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'absent')
import root_hf
print('root_hf', root_hf.__version__, root_hf.__file__)
PY"

part tests_gpu 140 "$PY" -m pytest tests/gpu -q -rA -p no:cacheprovider -o addopts="--import-mode=importlib" \
    --junitxml="$RESULTS/tests_gpu.xml"

part step_time_cuda 150 "$PY" benchmarks/step_time.py --device cuda --threads 8 --rounds 10 \
    --sections peers,ns-dtype,temp-memory,first-step --save "$RESULTS/step_time_cuda.json"

# Both Newton-Schulz forms on CUDA (issue 22): standard vs Gram time, FLOP ratio and error per shape, bf16 and fp32,
# and what ns_method="auto" picks there (the rule's CUDA thresholds come from this table).
part gram_tests_cuda 60 "$PY" -m pytest tests/optim/test_gram.py -m gpu -q -rA -p no:cacheprovider \
    -o addopts="--import-mode=importlib"
part gram_cuda 150 "$PY" benchmarks/gram.py --device cuda --threads 8 --rounds 10 --dtypes bf16 fp32 \
    --save "$RESULTS/gram_cuda.json"

# issue 21: the steady step under torch.cuda.set_sync_debug_mode("error") (also in tests_gpu above, run alone here so
# that its verdict is its own), then a CUDA step-time table: ROOT / torch.optim.Muon / AdamW whole steps, the AdamW
# branch against torch.optim.AdamW(foreach=True) and the step outside Newton-Schulz ("before" needs git: skipped
# where the working tree came without it).
part sync_debug 90 "$PY" -m pytest tests/gpu -q -rA -p no:cacheprovider -o addopts="--import-mode=importlib" \
    -k "sync_debug or nonfinite_cuda or batch_cap"

part step_time_cuda_issue21 120 "$PY" benchmarks/step_time.py --device cuda --threads 8 --rounds 10 --steps 10 \
    --sections main,adamw-foreach,elementwise --save "$RESULTS/step_time_cuda_issue21.json"

echo "total $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
exit "$failed"
