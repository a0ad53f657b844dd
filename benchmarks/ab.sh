#!/usr/bin/env bash
# A/B of the per-call cost between two source trees, alternating runs so that drift on a shared machine
# hits both alike; each side's table is the median over its runs of each run's ratio to plain
# (benchmarks/median.py). Each side runs its own benchmarks/run.py (which puts its own checkout's persample
# first on sys.path); the cases and the timing code are the same unless a side changed them.
#
#   bash benchmarks/ab.sh OLD_TREE NEW_TREE [ROUNDS] [run.py options...]
#   bash benchmarks/ab.sh /tmp/old-7e77827 . 6 --case mlp --method persample-stats-fast --method persample-observe
#
# (make OLD_TREE with `git worktree add --detach /tmp/old-7e77827 7e77827`). Writes
# benchmarks/results/ab-{old,new}-runN.json and ab-{old,new}-median.md; defaults: 6 rounds, the MLP cases,
# the fast engine and observe, 15 repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
rounds=${3:-6}
shift $(( $# < 3 ? $# : 3 ))
options=("$@")
[ ${#options[@]} -eq 0 ] && options=(--case mlp --method persample-stats-fast --method persample-observe --repeats 15)
out=benchmarks/results
for i in $(seq 1 "$rounds"); do
    for side in old new; do
        tree=$old
        [ "$side" = new ] && tree=$new
        echo "round $i/$rounds: $side ($tree), load $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo ?)" >&2
        "$PYTHON" "$tree/benchmarks/run.py" "${options[@]}" --no-progress --retries 0 \
            --json "$out/ab-$side-run$i.json" >/dev/null
    done
done
for side in old new; do
    files=()
    for i in $(seq 1 "$rounds"); do files+=("$out/ab-$side-run$i.json"); done
    "$PYTHON" benchmarks/median.py "${files[@]}" --markdown "$out/ab-$side-median.md"
done
