#!/usr/bin/env bash
# The GPU path proven in one command, on one GPU, within 8 minutes: the `gpu` test set, training images/s
# (trial_speed.py: ResNet-18 at 32 px in every mode it has, ResNet-50 at 224 px in the GPU's precision, bf16 on
# Ampere and later), a whole study's wall time split (overhead.py), the ensemble's forward pass, and a 2-worker
# `run` sharing the GPU (limits add up to 465 s). Every figure goes to OUTDIR/results.txt, everything printed to OUTDIR/log.txt.
#
#     bench/gpu_check.sh OUTDIR [WHEELS]
#
# WHEELS (default .whl, from bench/gpu_wheels.py): what the machine's Python lacks, installed without the
# index; hpsearch itself with --no-deps, so the machine's own torch and torchvision stay. Each step runs under
# `timeout`: a hung step costs its own limit, never the others' time. Exit 1 when any step failed.
set -u
out=${1:?usage: bench/gpu_check.sh OUTDIR [WHEELS]}
cd "$(dirname "$0")/.."
wheels=${2:-.whl}
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
results=$out/results.txt
log=$out/log.txt
work=$(mktemp -d -t hpsearch-gpu-check-XXXXXX)  # databases, artifacts, caches: nothing of it comes back
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HPSEARCH_CACHE_DIR=$work/cache
failed=()

# step NAME LIMIT_S FILTER COMMAND...: FILTER picks the lines kept in results.txt (all for the benchmarks).
step() {
    local name=$1 limit=$2 filter=$3 start rc
    shift 3
    echo "== $name (limit ${limit} s, loadavg $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$results" >>"$log"
    start=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$work/step.log" 2>&1
    rc=$?
    cat "$work/step.log" >>"$log"
    eval "$filter" <"$work/step.log" >>"$results"
    echo "-- $name: exit $rc after $(($(date +%s) - start)) s$([ "$rc" = 124 ] && echo ' (timed out)')" \
        | tee -a "$results" >>"$log"
    [ "$rc" = 0 ] || failed+=("$name")
}

{
    echo "gpu_check $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, '\
'{torch.cuda.device_count()} GPU(s)")'
} | tee -a "$results" >>"$log"

install() {
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl || return
    fi
    # Optional: PYTHONPATH already points at src/ (an old setuptools without bdist_wheel cannot install it).
    "$py" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || echo "note: no editable install; hpsearch runs from src/ (PYTHONPATH)"
    "$py" -c 'import optuna, pydantic, sqlalchemy, hpsearch; print("optuna", optuna.__version__, "pydantic", pydantic.VERSION)'
}
export -f install
export py wheels
step install 45 cat bash -c install

gpu_tests=$(grep -rl 'mark\.gpu' tests --include='test_*.py' | sort)
# -n 0 --dist no: one process, in order (the GPU tests start workers of their own).
step gpu-tests 180 'tail -n 25' "$py" -m pytest $gpu_tests -m gpu -q -n 0 --dist no -p no:cacheprovider -rA
step trial-speed-resnet18-32px 45 cat "$py" bench/trial_speed.py --device cuda
# Enough images for ours' one epoch of --steps x --batch-size; the tutorials' pipeline is left out at 224 px.
step trial-speed-resnet50-224px 45 cat "$py" bench/trial_speed.py --device cuda --arch resnet50 --image-size 224 \
    --batch-size 128 --images 1100 --skip naive,naive-bf16,compiled
step overhead 40 cat "$py" bench/overhead.py --device cuda --n-trials 3
step ensemble-infer 35 cat "$py" bench/ensemble_infer.py --rounds 4 --seconds 0.5
step run-2-workers-1-gpu 60 "grep -E 'finished|worker|error|FAIL'" "$py" -m hpsearch run studies/digits.toml \
    --workers 2 --workers-per-gpu 2 --gpus 0 --device cuda --n-trials 6 --storage "sqlite:///$work/run.db" \
    --artifacts "$work/run-artifacts"
step run-status 15 "grep -E 'GPU|cuda'" "$py" -m hpsearch status studies/digits.toml --storage "sqlite:///$work/run.db"

rm -rf "$work"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$results"
    exit 1
fi
echo "all steps passed" | tee -a "$results"
