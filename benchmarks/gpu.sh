#!/usr/bin/env bash
# The GPU run of issue 22, in under 8 minutes on one H100:
#   1. the CUDA tests (tests/test_cuda.py: float64 equality with the CPU oracle, check_mean in float32);
#   2. benchmarks/run.py --device cuda --large, every case and method (but Tracker.step's), float32;
#   3. the same under bf16 autocast, for the methods whose ratios issue 22 targets (a case or method that
#      cannot run under autocast is recorded as failed, with its reason; the run goes on).
# Results: benchmarks/results/cuda-tests.md, cuda-fp32.{json,md}, cuda-bf16.{json,md}.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --dry-run       # the same steps on CPU at tiny sizes (seconds), into a temp dir
#   bash benchmarks/gpu.sh --out DIR       # write the results elsewhere
#
# Environment: PYTHON (default: python). Each step has its own time limit (TESTS_S, FP32_S, BF16_S seconds;
# 100 + 260 + 100 by default, 7.7 minutes in all) so that the whole script ends in time even when a step
# hangs; a step that runs out writes no table, says so in cuda-tests.md / on stderr, and the next step runs.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: $0 [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

TESTS_S=${TESTS_S:-100}
FP32_S=${FP32_S:-260}
BF16_S=${BF16_S:-100}
# the methods of issue 22's targets (plain always runs: it is every ratio's denominator)
BF16_METHODS=(--method torch.func --method floor-hooks --method persample-grads --method persample-stats-fast
              --method persample-observe)

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    OUT=${OUT:-$(mktemp -d)}
    PREFIX=dryrun-cpu
    TEST_SELECT=(-k "mlp or linear")
    SIZES=(--case mlp-b32 --repeats 2 --budget 0.2 --retries 0)
    FP32_METHODS=(--method persample-stats-fast --method persample-observe)
    BF16_METHODS=(--method persample-stats-fast)
else
    DEVICE=cuda
    OUT=${OUT:-benchmarks/results}
    PREFIX=cuda
    TEST_SELECT=()
    # unpaired (plain timed once per case): pairing each sample with one of plain would take up to twice
    # the time per method, past the 8 minutes this run is sized for; a synchronised GPU drifts little
    SIZES=(--large --repeats 10 --budget 1.0 --retries 0 --unpaired)
    # every method but Tracker.step's (persample-step*, added later: the run is sized without them)
    FP32_METHODS=(--method loop --method torch.func --method floor --method persample-grads --method persample-stats
                  --method persample-observe --method opacus --method backpack)
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: CUDA is not available (use --dry-run on a machine without a GPU)" >&2
        exit 1
    fi
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
start=$SECONDS

echo "== 1/3 CUDA tests ($DEVICE)" >&2
tests_log="$OUT/$PREFIX-tests.log"
timeout "$TESTS_S" "$PYTHON" -m pytest -q -p no:cacheprovider -n 0 -rs tests/test_cuda.py "${TEST_SELECT[@]}" \
    >"$tests_log" 2>&1
rc=$?
[ $rc -eq 124 ] && echo "timed out after ${TESTS_S} s" >>"$tests_log"
{
    echo "# CUDA tests ($DEVICE)"
    echo
    "$PYTHON" -c "import torch; print('- torch', torch.__version__, '; device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA: the tests skip)')"
    echo "- pytest exit status: $rc"
    echo
    echo '```'
    tail -n 25 "$tests_log"
    echo '```'
} >"$OUT/$PREFIX-tests.md"
# 5: nothing collected; on CPU every test skips, which is the dry run's expected outcome
if [ $rc -ne 0 ] && ! { [ "$DRY" = 1 ] && [ $rc -eq 5 ]; }; then status=1; fi

echo "== 2/3 benchmarks, float32 ($DEVICE)" >&2
timeout "$FP32_S" "$PYTHON" benchmarks/run.py --device "$DEVICE" "${SIZES[@]}" "${FP32_METHODS[@]}" --no-progress \
    --json "$OUT/$PREFIX-fp32.json" --markdown "$OUT/$PREFIX-fp32.md" || { echo "float32 run failed or timed out" >&2; status=1; }

echo "== 3/3 benchmarks, bf16 autocast ($DEVICE)" >&2
timeout "$BF16_S" "$PYTHON" benchmarks/run.py --device "$DEVICE" "${SIZES[@]}" "${BF16_METHODS[@]}" --autocast bf16 \
    --no-progress --json "$OUT/$PREFIX-bf16.json" --markdown "$OUT/$PREFIX-bf16.md" \
    || { echo "bf16 run failed or timed out" >&2; status=1; }

echo "gpu.sh: $((SECONDS - start)) s; results in $OUT ($PREFIX-*)" >&2
exit $status
