#!/usr/bin/env bash
# A GPU session in one command, under 8 minutes on an H200: the GPU table (float32 under both TF32
# settings, the measured path choice, generation through the decode graph), the chat-turn benchmark,
# then the tests that need a GPU, and with a text file a half-minute `python train.py` on it (the GPU default's
# path end to end). Made for the lent GPU machine, which has no network and no web stack:
# the package goes in with --no-deps over the image's torch and triton.
#
#     bash bench/gpu_session.sh OUT_DIR [TEXT_FILE]
#
# Each part runs under its own time limit, so one that hangs or runs long leaves the others their time;
# its exit status is logged. Everything lands in OUT_DIR: the tables (gpu_table.md), the benchmark's
# JSON, each part's log, the path choice's cache, and bench/RESULTS.md with the tables appended.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: bash bench/gpu_session.sh OUT_DIR [TEXT_FILE]}")
text=${2:-}
mkdir -p "$out"
export NANOCHAT_CACHE_DIR="$out/cache"  # a fresh path choice: every key measured in this session
GPU_TESTS=(tests/test_lstm_vs_torch.py tests/test_gru_vs_torch.py tests/test_persistent_tiles.py
           tests/test_path_choice.py tests/test_dot_precision.py tests/test_device_decode.py
           tests/test_lstm_module.py tests/test_generation.py tests/test_determinism.py)

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in NAME.log
    local name=$1 seconds=$2 started=$SECONDS
    shift 2
    timeout --kill-after=10 "$seconds" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - started)) s (limit $seconds s)" | tee -a "$out/parts.log"
}

part install 60 python -m pip install --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
part gpu_table 230 python bench/gpu_table.py --write "$out/gpu_table.md"
part chat_benchmark 50 python -m pytest -q bench/test_bench_chat.py --benchmark-json="$out/chat_benchmark.json"
part gpu_tests 120 python -m pytest -q -p no:randomly "${GPU_TESTS[@]}"
[ -n "$text" ] && part train 60 python train.py --data "$text" --max-minutes 0.5 --out "$out/train"
{ echo; cat "$out/gpu_table.md"; } >> bench/RESULTS.md 2>/dev/null
cp bench/RESULTS.md "$out/RESULTS.md"
cat "$out/parts.log"
