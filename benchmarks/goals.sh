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
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh eval-sweep /root/qwen2.5-coder-1.5b/model.gguf
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh eval-niah /root/qwen2.5-coder-1.5b/model.gguf
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh eval-ruler-qa /root/qwen2.5-coder-1.5b/model.gguf
#       issue 1/4's evaluation of a capable reader (Qwen2.5-Coder, carried with ../shared/tools/capable-model.sh):
#       eval-sweep: corpus QA at 4K in full attention (can the model pass the task in its window?), then three
#       ReAttention scopes, SmolLM2's, a middle one and the paper's sizing for a 32K window, on the same 64K needles
#       (niah_single_2, niah_multikey_2); it writes the best scope (most needles, then the smallest) to
#       $RESULTS/chosen-scope for the next parts.
#       eval-niah: RULER's NIAH on Paul Graham's essays at 32K-128K (20 needles a length) with the chosen scope,
#       full attention at 32K and 64K, YaRN x4 at 64K and 128K.
#       eval-ruler-qa: RULER multi-key / multi-value / vt / cwe at 64K and 128K against full attention at 16K,
#       corpus QA at 32K and 128K (reattention, rag, full-truncated, yarn).
#       Results accumulate in $RESULTS (default /root/results; a rerun resumes) and are copied to $OUT.
#
# Each part prints a short table last (the device tool returns the end of the output).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
part=${1:?"name a part: kernels, llama8b or smollm2 GGUF"}
out=${OUT:-benchmarks/results/goals}
mkdir -p "$out"
export REATTENTION_COMMIT=${REATTENTION_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo cpu)-$REATTENTION_COMMIT
python3 -c "import torch, transformers as t; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU',
torch.__version__, t.__version__)"
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
eval-sweep|eval-niah|eval-ruler-qa)
    gguf=${2:?"$part needs the GGUF file's path"}
    res=${RESULTS:-/root/results}
    mkdir -p "$res"
    E=(python3 -m reattention_core.cli eval)
    M=(--model "$(dirname "$gguf")" --gguf-file "$(basename "$gguf")" --no-progress --seed 0)
    budget=${EVAL_SECONDS:-560}  # stop between cells before the device call's 600 s limit; a rerun resumes
    # a dry run elsewhere: EVAL_LENGTHS="2K 2K 4K 1K" EVAL_LIMIT=1 (sweep, 32K, 64K/128K, 16K stand-ins; cells per run)
    read -r L_SWEEP L_SHORT L_LONG L_FULL <<<"${EVAL_LENGTHS:-64K 32K 128K 16K}"
    [ -n "${EVAL_LIMIT:-}" ] && M+=(--limit "$EVAL_LIMIT")
    start=$SECONDS
    left() { echo $(( budget - (SECONDS - start) )); }
    run() {
        local t; t=$(left)
        [ "$t" -gt 20 ] || { echo "skipped (time): $*"; return 0; }
        timeout --signal=TERM "$t" "${E[@]}" "$@" "${M[@]}" >/dev/null || echo "stopped or failed ($?): $*"
    }
    scopes=("sink_size=128 top_k=4 max_blocks=32 block_size=32 local_window=256 prefill_chunk_size=256"
            "sink_size=128 top_k=4 max_blocks=64 block_size=32 local_window=1024 prefill_chunk_size=512"
            "sink_size=32 top_k=4 max_blocks=256 block_size=32 local_window=8192 prefill_chunk_size=512")
    case "$part" in
    eval-sweep)
        run qa --sizes 4K --questions 12 --modes full-truncated --out "$res/qa-4k-full.jsonl"
        for s in "${scopes[@]}"; do
            # shellcheck disable=SC2086
            run ruler --tasks niah_single_2 niah_multikey_2 --lengths "$L_SWEEP" --depths 5 --samples 2 --jitter 0.02 \
                --modes reattention --set $s --out "$res/sweep-64k.jsonl"
        done
        python3 - "$res" <<'PY'
import json, sys
from collections import defaultdict
res = sys.argv[1]
rows = [json.loads(l) for l in open(f"{res}/sweep-64k.jsonl")]
hits, n, scope = defaultdict(int), defaultdict(int), {}
for r in rows:
    c = r["config"]
    hits[r["overrides"]] += r["hit"]; n[r["overrides"]] += 1
    scope[r["overrides"]] = c["sink_size"] + c["max_blocks"] * c["block_size"] + c["local_window"]
for k in sorted(hits, key=lambda k: (-hits[k], scope[k])):
    print(f"sweep 64K  {hits[k]:2d}/{n[k]:2d}  scope {scope[k]:6d}  {k}")
best = min(hits, key=lambda k: (-hits[k] / n[k], scope[k]))
open(f"{res}/chosen-scope", "w").write(" ".join(best.split(",")))
print("chosen:", best)
PY
        ;;
    eval-niah)
        # shellcheck disable=SC2046
        set -- $(cat "$res/chosen-scope")
        N=(ruler --tasks niah_single_2 --depths 10 --samples 2 --jitter 0.02 --out "$res/niah-essays.jsonl")
        run "${N[@]}" --lengths "$L_SHORT" "$L_SWEEP" "$L_LONG" --modes reattention --set "$@"
        run "${N[@]}" --lengths "$L_SHORT" "$L_SWEEP" --modes full
        run "${N[@]}" --lengths "$L_SWEEP" "$L_LONG" --modes yarn
        ;;
    eval-ruler-qa)
        # shellcheck disable=SC2046
        set -- $(cat "$res/chosen-scope")
        R=(ruler --depths 5 --samples 2 --jitter 0.02 --out "$res/ruler.jsonl")
        run "${R[@]}" --tasks niah_multikey_1 niah_multivalue --lengths "$L_SWEEP" "$L_LONG" --modes reattention \
            --set "$@"
        run "${R[@]}" --tasks niah_multikey_1 niah_multivalue --lengths "$L_FULL" --modes full
        run qa --sizes "$L_SHORT" "$L_LONG" --questions 12 --modes reattention rag full-truncated yarn --set "$@" \
            --out "$res/qa.jsonl"
        run "${R[@]}" --tasks vt cwe --lengths "$L_SWEEP" --modes reattention --set "$@"
        run "${R[@]}" --tasks vt cwe --lengths "$L_FULL" --modes full
        ;;
    esac
    cp "$res"/* "$out"/ 2>/dev/null || true
    python3 -m reattention_core.cli eval report "$res"/*.jsonl
    ;;
*)
    echo "unknown part $part: kernels, llama8b, smollm2 GGUF or eval-sweep|eval-niah|eval-ruler-qa GGUF" >&2
    exit 2
    ;;
esac
