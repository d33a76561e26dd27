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
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh eval-sweep /root/qwen2.5-coder-1.5b/model.gguf
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh eval-niah /root/qwen2.5-coder-1.5b/model.gguf
#   REATTENTION_COMMIT=abc1234 bash benchmarks/goals.sh eval-ruler-qa /root/qwen2.5-coder-1.5b/model.gguf
#       issue 1/4's evaluation of a capable reader (Qwen2.5-Coder, carried with ../shared/tools/capable-model.sh):
#       eval-sweep: corpus QA at 4K in full attention (can the model pass the task in its window?), then three
#       ReAttention scopes, SmolLM2's, a middle one and the paper's sizing for a 32K window, on the same 64K needles
#       (niah_single_2, niah_multikey_2); it writes the best scope (most needles, then the smallest) to
#       $RESULTS/chosen-scope for the next parts.
#       eval-niah: RULER's NIAH on Paul Graham's essays at 32K-128K (20 needles a length) with the chosen scope,
#       full attention at 32K and 64K, YaRN x4 at 64K and 128K, then the scope alone at 256K, 512K and 1M
#       (EVAL_NIAH_LONG; about 35 s a needle at 512K on an H100: reruns resume).
#       eval-ruler-qa: RULER multi-key / multi-value / vt / cwe at 64K and 128K against full attention at 16K,
#       corpus QA at 32K and 128K (reattention, rag, full-truncated, yarn).
#       Results accumulate in $RESULTS (default /root/results; a rerun resumes) and are copied to $OUT.
#       The GPU machine lacks the evaluation's pure-Python dependencies: carry their wheels (gguf, needlehaystack,
#       wonderwords, rank-bm25, langchain-core and its dependencies, downloaded for cp312 with `pip download`)
#       in one call and install them into torch's interpreter: `python3 -m pip install --no-index --no-deps
#       WHEELS/*.whl` (a bare `pip` there belongs to another Python).
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

part=${1:?"name a part: env, kernels, llama8b, smollm2 GGUF, qwen 128k|1m|1m-hf or eval-sweep|eval-niah|eval-ruler-qa GGUF"}
if [ "$part" = env ]; then
    environment
    exit 0
fi
eval "$(environment)"
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
            run ruler --tasks niah_single_2 niah_multikey_2 --lengths "$L_SWEEP" --depths 5 \
                --samples "${SWEEP_SAMPLES:-2}" --jitter 0.02 --modes reattention --set $s --out "$res/sweep-64k.jsonl"
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
        # shellcheck disable=SC2086
        run "${N[@]}" --lengths ${EVAL_NIAH_LONG:-256K 512K 1M} --modes reattention --set "$@"
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
    echo "unknown part $part: env, kernels, llama8b, smollm2 GGUF, qwen 128k|1m|1m-hf or eval-sweep|eval-niah|eval-ruler-qa GGUF" >&2
    exit 2
    ;;
esac
