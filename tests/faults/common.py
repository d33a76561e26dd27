"""What the fault scenarios share: a tiny engine, a corpus, and processes that start in a fork.

Scenarios need many fresh processes (a prefill to kill, then a process that answers from the
folder it left). A new interpreter costs seconds importing torch and transformers; a
``forkserver`` process imports them once and forks each child from that clean state (no torch
threads started, no engine, no cache in memory), so a child is a fresh process in every way
that matters here and starts in a fraction of a second.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from multiprocessing.context import BaseContext
from pathlib import Path

# Preloaded by the fork server: everything a child imports anyway.
_PRELOAD = ["tests.faults.preload"]

# A small scope and small pages: many pages, many writes, a fraction of a second per prefill.
CONFIG = {"sink_size": 4, "block_size": 4, "top_k": 2, "max_blocks": 4, "local_window": 32, "prefill_chunk_size": 16}
PAGE = 16
QUESTION = "Which word comes up most often?"


def corpus(chars: int, seed: int) -> str:
    """Seeded text of ``chars`` characters (one byte, one token, for the byte tokenizer)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north", "paper", "lamp"]
    out = ""
    while len(out) < chars:
        out += rng.choice(words) + rng.choice([" ", " ", ", ", ". "])
    return out[:chars]


def tiny_engine(cache_dir: str | Path | None, *, offload=None, cache: bool = True, **cache_kw):
    """The tiny Llama (seed 0) with the byte tokenizer; its prefix cache in ``cache_dir``."""
    from reattention_core import CacheConfig, ReAttentionConfig, ReAttentionEngine
    from tests.helpers import ByteTokenizer, tiny_model

    config = ReAttentionConfig(**CONFIG)
    settings = CacheConfig(**{"page_size": PAGE, "dir": cache_dir, **cache_kw}) if cache else False
    return ReAttentionEngine(
        tiny_model("llama"), ByteTokenizer(), config, cache=settings, offload=offload, model_name="tiny-llama"
    )


def process_context() -> BaseContext:
    """A multiprocessing context whose children fork from a server that preloaded torch and the package."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def child_setup() -> None:
    """First lines of every child: one torch thread (the machine is shared), no tokenizer threads.

    Progress bars get a thread lock: tqdm's default is a multiprocessing lock (a named semaphore),
    which a child killed with SIGKILL could never unregister.
    """
    import threading

    import torch
    from tqdm import tqdm

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())


def page_files(folder: Path) -> list[Path]:
    """The cache's page files under ``folder`` (named like pages, in real namespace folders)."""
    from reattention_core.cache.directory import namespace_folders
    from reattention_core.cache.page_file import page_name_parts

    return sorted(p for ns in namespace_folders(folder) for p in ns.iterdir() if page_name_parts(p.name))


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/.tmp-*"))


def start(ctx: BaseContext, target, *args, duplex: bool = False):
    """Start ``target(conn, *args)`` in a child; returns the process and the parent's end of the pipe."""
    mine, theirs = ctx.Pipe(duplex=duplex)
    proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
    proc.start()
    theirs.close()
    return proc, mine


def call(ctx: BaseContext, target, *args, timeout: float = 120.0):
    """Run ``target(conn, *args)`` in a child and return the one object it sends."""
    proc, conn = start(ctx, target, *args)
    try:
        return receive(proc, conn, timeout)
    finally:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()


def receive(proc, conn, timeout: float = 120.0):
    """The next object a child sends; a clear error if it dies or says nothing in time."""
    if not conn.poll(timeout):
        raise TimeoutError(f"child {proc.name} sent nothing within {timeout:.0f}s")
    try:
        return conn.recv()
    except EOFError:
        proc.join(10)
        raise RuntimeError(f"child {proc.name} died (exit code {proc.exitcode}); its traceback is on stderr") from None


_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _byte_chars() -> list[str]:
    """The printable character byte-level BPE uses for each byte 0..255 (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_checkpoint(folder: Path) -> Path:
    """The tiny Llama (seed 0) as a Hugging Face folder `ReAttentionEngine.from_pretrained` loads.

    Its tokenizer is a fast byte-level one built here (no merges: one token per byte, ids
    ``byte + 3`` after ``<pad>``, ``<s>``, ``</s>``), with a chat template, so ``reattention
    serve --model FOLDER`` runs it without downloading anything.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import tiny_model

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(_byte_chars())}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = _CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
