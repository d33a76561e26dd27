#!/usr/bin/env bash
# The speed goals of issues 2/6 and 32 measured afresh on the GPU machine, one part per device call
# (each well inside a call's 10 minutes). Run from the repository root there; results go to $OUT (the
# device tool's return folder), else benchmarks/results/goals/. Name the commit: the copy there has no .git.
#
#   eval "$(bash benchmarks/goals.sh env)"
#       the environment of the GPU machine (no network, nothing pip-installed): `reattention_kernels`
#       through a symlink, the rest through PYTHONPATH; every other part sets it up itself
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh kernels
#       the GPU kernel, CUDA-graph and fused tests, then (only if they pass) bench_kernels.py: rooflines,
#       decode and prefill scoring, scope attention (SmolLM2, Llama-8B and Qwen-1.5B shapes), and the sweeps
#       of split counts, decode scope attention's block shapes and the decode epilogues
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh llama8b
#       Llama-3.1-8B shapes, random weights: 32K (a warm-up that compiles) and 128K prefill and decode,
#       ReAttention (compiled layers, CUDA graphs) and transformers' one-shot SDPA, one process each
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh smollm2 /root/model/SmolLM2-135M-Instruct.Q4_1.gguf
#       the embedded model: 128K twice (the first compiles) and 1M with the preset, decode with the
#       epilogues off and on, over the key-read floor, peak memory; transformers at 128K
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh qwen 128k|1m|1m-hf
#       issue 32, Qwen2.5-Coder-1.5B shapes, random weights (speed does not depend on them), its engine
#       config (scope 32 + 256 x 32 + 8,192): 128k: ReAttention at 32K (compiles) and 128K, decode with
#       the epilogues off and on, then transformers' one-shot SDPA at 32K and 128K; 1m: ReAttention at 1M,
#       decode over the key-read floor, epilogues off and on; 1m-hf: transformers at 1M (may run out of memory)
#
# Each part prints a short table last (the device tool returns the end of the output).
set -euo pipefail
cd "$(dirname "$0")/.."

environment() {
    cat <<EOF
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/reattention_kernels
export PYTHONPATH="$PWD:/tmp/shim:/root/site\${PYTHONPATH:+:\$PYTHONPATH}"
export PYTHONUNBUFFERED=1
EOF
}

part=${1:?"name a part: env, kernels, llama8b, smollm2 GGUF or qwen 128k|1m|1m-hf"}
if [ "$part" = env ]; then
    environment
    exit 0
fi
eval "$(environment)"
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
        if "error" in r:
            print(f"{r['mode']:12} {r['tokens']:>8} tokens  {r['error']}")
            continue
        over = r.get("decode_over_floor")
        print(f"{r['mode']:12} {r.get('epilogues', ''):3} {r['tokens']:>8} tokens  prefill {r['prefill_s']:8.2f} s  decode "
              f"{r['decode_ms_per_token']:7.2f} ms/token" + (f" = {over:.3f}x the key-read floor" if over else "")
              + f"  peak {r['peak_gpu_gib']:.1f} GiB")
PY
}

engine() {  # bench_engine.py with the goal parts' common settings, to $out/engine-<name>-$tag.jsonl
    local name=$1
    shift
    python3 benchmarks/bench_engine.py "$@" --out "$out/engine-$name-$tag.jsonl"
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
    python3 benchmarks/bench_kernels.py --skip-tests --sweep topk-splits attention-decode decode-epilogues \
        --out "$out" --tag "$tag" >/dev/null
    python3 - "$out/kernels-$tag.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] == "sweep_topk_splits":
        print(f"splits {r['model']:18} {r['TQ']:>5} x {r['TK']:>7} {str(r['splits']):>4}: {r.get('graph_ms')} ms "
              f"(same {r['same']})")
    elif r["kind"] == "sweep_scope_decode":
        print(f"scope attention decode {r['model']:18} {str(r['config']):16} {r.get('graph_ms', r.get('error'))} ms")
    elif r["kind"] == "sweep_decode_epilogues":
        parts = "  ".join(f"{p} {r[p + '_off_ms']:.4f} -> {r[p + '_on_ms']:.4f}" for p in ("select", "attention", "layer"))
        print(f"epilogues {r['model']:18} {r['tokens']:>8} keys (ms, off -> on): {parts}  (selection fused "
              f"{r.get('fused_taken')}, equal {r['same_selection']}, attention diff {r['attention_max_diff']:.1e})")
PY
    tail -48 "$out/kernels-$tag.md"
    ;;
llama8b)
    engine llama8b-reattention --model llama8b-random --tokens 32768 131072 --modes reattention --decode 4 --fuse layers
    engine llama8b-hf --model llama8b-random --tokens 32768 131072 --modes hf --decode 4
    table "$out"/engine-llama8b-*-"$tag".jsonl
    ;;
smollm2)
    gguf=${2:?"smollm2 needs the GGUF file's path"}
    m=(--model "$(dirname "$gguf")" --gguf-file "$(basename "$gguf")")
    engine smollm2-reattention "${m[@]}" --tokens 131072 131072 1048576 --modes reattention --graphs on \
        --fuse layers --epilogues off on --decode 32
    engine smollm2-hf "${m[@]}" --tokens 131072 --modes hf --decode 8
    table "$out"/engine-smollm2-*-"$tag".jsonl
    ;;
qwen)
    q=(--model qwen1.5b-random)
    case "${2:?"qwen needs a sub-part: 128k, 1m or 1m-hf"}" in
    128k)
        engine qwen-128k-reattention "${q[@]}" --tokens 32768 131072 --modes reattention --fuse layers \
            --epilogues off on --decode 32
        engine qwen-128k-hf "${q[@]}" --tokens 32768 131072 --modes hf --decode 8
        table "$out"/engine-qwen-128k-*-"$tag".jsonl
        ;;
    1m)
        engine qwen-1m-reattention "${q[@]}" --tokens 1048576 --modes reattention --fuse layers --epilogues off on \
            --decode 32
        table "$out"/engine-qwen-1m-reattention-"$tag".jsonl
        ;;
    1m-hf)
        engine qwen-1m-hf "${q[@]}" --tokens 1048576 --modes hf --decode 4
        table "$out"/engine-qwen-1m-hf-"$tag".jsonl
        ;;
    *)
        echo "unknown qwen sub-part $2: 128k, 1m or 1m-hf" >&2
        exit 2
        ;;
    esac
    ;;
*)
    echo "unknown part $part: env, kernels, llama8b, smollm2 GGUF or qwen 128k|1m|1m-hf" >&2
    exit 2
    ;;
esac
