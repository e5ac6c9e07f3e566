#!/usr/bin/env bash
# The CPU benchmarks of this working tree and of an earlier commit, alternated in one run so that both
# see the same machine: generation (1,000 characters), serving 32 replies through the engine, and the
# training step against a bare loop. Each tree's own benchmark files run on its own code.
#
#   bench/compare_with_commit.sh 1432c29        # 3 rounds: old, new, old, new, old, new
#   bench/compare_with_commit.sh 1432c29 5
set -euo pipefail
commit=$1
rounds=${2:-3}
here=$(git rev-parse --show-toplevel)
old=$(mktemp -d)/old
git -C "$here" worktree add --quiet --detach "$old" "$commit"
trap 'git -C "$here" worktree remove --force "$old"' EXIT
lscpu | grep -E "^(Model name|Flags)"
for round in $(seq "$rounds"); do
    for tree in "$old" "$here"; do
        name=$([ "$tree" = "$here" ] && echo "this tree" || echo "$commit")
        echo "=== round $round: $name"
        cd "$tree"
        # PYTHONPATH puts the tree's own package first, ahead of any editable install.
        PYTHONPATH="$tree" python -m pytest -q -p no:cacheprovider bench/test_bench_batching.py -k "32-" -s \
            | grep -E "^32 concurrent|passed|failed|rror" || true
        PYTHONPATH="$tree" python -m pytest -q -p no:cacheprovider bench/test_bench_chat.py -k generation \
            --benchmark-columns=min,median | grep -E "^test_generation|passed|failed|rror" || true
        PYTHONPATH="$tree" python -m pytest -q -p no:cacheprovider bench/test_bench_training.py -s \
            | grep -E "bare loop:|passed|failed|rror" || true
    done
done
