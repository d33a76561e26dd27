#!/usr/bin/env bash
# Issue 2/6's goals, measured afresh on the GPU machine in three device calls, each well inside the
# 10-minute limit of one call. Run from the repository root there; results go to $OUT (the device
# tool's return folder), else benchmarks/results/goals/. Name the commit, since the copy there has no .git:
#
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh kernels
#       the GPU kernel, CUDA-graph and fused tests, then (only if they pass) the device's copy bandwidth
#       and bf16 matmul rate, decode-scoring GB/s, prefill-scoring TFLOP/s and scope attention, with a sweep of
#       decode scope attention's block shapes (bench_kernels.py), the package's prefill scoring at the engine's chunk shapes
#       (probe_topk_splits.py with the default split count), and a decode step's split kernels with
#       their merges (and selection) in their last programs or in kernels of their own
#       (probe_decode_epilogues.py)
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh llama8b
#       Llama-3.1-8B shapes with random weights: 32K (a warm-up that compiles) and 128K prefill and decode,
#       ReAttention (compiled layers, CUDA graphs) and transformers' one-shot SDPA, one process each
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh smollm2 /root/model/SmolLM2-135M-Instruct.Q4_1.gguf
#       the embedded model (carried with ../shared/tools/device-model.sh): 128K twice (the first compiles)
#       and 1M with the preset, each with the decode step's merges and selection in kernels of their own
#       and in the split kernels' last programs (--epilogues off on), decode ms/token over the key-read
#       floor, peak memory; transformers at 128K
#
# Each part prints a short table last (the device tool returns the end of the output).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
part=${1:?"name a part: kernels, llama8b or smollm2 GGUF"}
out=${OUT:-benchmarks/results/goals}
mkdir -p "$out"
export REATTENTION_COMMIT=${REATTENTION_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")-$REATTENTION_COMMIT
python3 -c "import torch, triton, transformers as t; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, t.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true

table() {  # the goal columns of bench_engine.py's rows
    python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        over = r.get("decode_over_floor")
        print(f"{r['mode']:12} {r.get('epilogues', ''):3} {r['tokens']:>8} tokens  prefill {r['prefill_s']:8.2f} s  decode "
              f"{r['decode_ms_per_token']:7.2f} ms/token" + (f" = {over:.3f}x the key-read floor" if over else "")
              + f"  peak {r['peak_gpu_gib']:.1f} GiB")
PY
}

case "$part" in
kernels)
    # bench_kernels.py would run tests/kernels again before timing: it is told they just ran
    if ! python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_cuda_graph.py tests/test_fused.py -n 8 \
        >"$out/gpu-tests-$tag.log" 2>&1; then
        tail -30 "$out/gpu-tests-$tag.log"
        echo "GPU tests failed: nothing timed"
        exit 1
    fi
    tail -3 "$out/gpu-tests-$tag.log"
    python3 benchmarks/bench_kernels.py --skip-tests --sweep attention-decode --out "$out" --tag "$tag"
    python3 - "$out/kernels-$tag.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "sweep_scope_decode":
        print(f"scope attention decode {r['model']:12} {str(r['config']):16} {r.get('graph_ms', r.get('error'))} ms")
PY
    python3 benchmarks/probe_topk_splits.py --splits 0 --out "$out/probe-topk-splits-$tag.jsonl" | tail -8
    python3 benchmarks/probe_decode_epilogues.py --out "$out/probe-decode-epilogues-$tag.jsonl" >/dev/null
    python3 - "$out/probe-decode-epilogues-$tag.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    parts = "  ".join(f"{p} {r[p + '_off_ms']:.4f} -> {r[p + '_on_ms']:.4f}" for p in ("select", "attention", "layer"))
    print(f"epilogues {r['model']:12} {r['tokens']:>8} keys (ms, off -> on): {parts}  "
          f"(selection fused {r['fused_taken']}, equal {r['same_selection']}, attention diff {r['attention_max_diff']:.1e})")
PY
    tail -40 "$out/kernels-$tag.md"
    ;;
llama8b)
    for mode in reattention hf; do
        extra=()
        [ "$mode" = reattention ] && extra=(--fuse layers)
        python3 benchmarks/bench_engine.py --model llama8b-random --tokens 32768 131072 --modes "$mode" --decode 4 \
            "${extra[@]}" --out "$out/engine-llama8b-$mode-$tag.jsonl"
    done
    table "$out"/engine-llama8b-*-"$tag".jsonl
    ;;
smollm2)
    gguf=${2:?"smollm2 needs the GGUF file's path"}
    m=(--model "$(dirname "$gguf")" --gguf-file "$(basename "$gguf")")
    python3 benchmarks/bench_engine.py "${m[@]}" --tokens 131072 131072 1048576 --modes reattention --graphs on \
        --fuse layers --epilogues off on --decode 32 --out "$out/engine-smollm2-reattention-$tag.jsonl"
    python3 benchmarks/bench_engine.py "${m[@]}" --tokens 131072 --modes hf --decode 8 \
        --out "$out/engine-smollm2-hf-$tag.jsonl"
    table "$out"/engine-smollm2-*-"$tag".jsonl
    ;;
*)
    echo "unknown part $part: kernels, llama8b or smollm2 GGUF" >&2
    exit 2
    ;;
esac
