"""Compile the scoring, selection and scope attention kernels for sm_90 without a GPU.

Run as a script by ``tests/kernels/test_compile.py``.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy and skips the compiler's checks, so a
kernel can pass every CPU test and still fail to compile (for instance a loop-carried value whose
shape changes). Triton's NVIDIA backend compiles to a cubin on any machine, so this catches that.
Prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from reattention_kernels.triton_ops import attention, select
from reattention_kernels.triton_ops.topk import plan, rescore, scan

TARGET = GPUTarget("cuda", 90, 32)
PTRS = ("q", "k", "o", "ws_v", "ws_i", "shift")


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SELECT_CONSTS = ("HRP", "BC", "SBLOCK", "SKP", "BS", "BSP")


# (KV heads, GQA group) of the models whose shapes are compiled: the embedded SmolLM2-135M (also the
# default of every variant), Qwen2.5-Coder-1.5B and Qwen2.5-0.5B
HEADS = {"smollm2": (3, 3), "qwen1.5b": (2, 6), "qwen0.5b": (2, 7)}


def scan_src(
    dtype: str, d: int, top_k: int, split: bool, two_phase: bool, subtiles: int = 1, tma: bool = False, rows: int = 64,
    selects: bool = False, model: str = "smollm2",
) -> tuple[ASTSource, int, int]:  # fmt: skip
    """The scan kernel's source, num_warps and num_stages, as `plan.block_config` picks them for ``rows``;
    with ``selects``, the decode epilogue that merges the splits and selects (a decode step of ``model``,
    32-token blocks, as `plan.fused_selection` sets its constants)."""
    fp = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    h, g = HEADS[model]
    bm, bn, warps, stages = plan.block_config(rows, DTYPES[dtype], d, two_phase)
    sig = {name: "*fp32" for name in PTRS}
    sig.update(q=fp, k=fp, o="*i64", ws_i="*i32", shift="*i64")
    # the descriptor argument: a tensor descriptor with TMA, else the key pointer again
    sig = {"q": fp, "k": fp, "k_desc": f"tensordesc<{dtype}[1, {bn}, 1, {d}]>" if tma else fp, **sig}
    sig.update(counter="*i32", sel="*i64", n_sel="*i64")
    ints = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh")
    ints += ("stride_ob", "stride_ot", "stride_oh", "TK", "R", "NSPLIT", "keys_per_split", "SK", "SW", "s_offset")
    sig.update({name: "i32" for name in ints})
    consts = {
        "H": h, "G": g, "D": d, "TOPK": top_k, "KP": triton.next_power_of_2(top_k), "BM": bm, "BN": bn,
        "SPLIT": split, "IEEE": dtype == "fp32", "SHIFT": True, "TWO_PHASE": two_phase, "S": subtiles, "TMA": tma,
    }  # fmt: skip
    # the selecting epilogue's constants for one query token (H x G rows of top_k hits, blocks of 32: the
    # embedded preset's 32 blocks, the Qwen models' 256 clipped to the hits); without it, the kernel's defaults
    kk = min(32 if model == "smollm2" else 256, h * g * top_k)
    preset = {"HRP": triton.next_power_of_2(h * g), "BC": 256, "SBLOCK": 1024, "SKP": triton.next_power_of_2(kk),
              "BS": 32, "BSP": 32}  # fmt: skip
    sel = preset if selects else dict.fromkeys(SELECT_CONSTS, 1)
    consts.update(SELECT=selects, **sel)
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=scan.score_topk_fwd_kernel_scan, signature=sig, constexprs=consts), warps, stages


def rescore_src(dtype: str, d: int, top_k: int) -> ASTSource:
    fp = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    sig = {"q": fp, "k": fp, "ws_v": "*fp32", "ws_i": "*i32", "o": "*i64", "shift": "*i64"}
    ints = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh")
    ints += ("stride_ob", "stride_ot", "stride_oh", "TK", "R", "NSPLIT")
    sig.update({name: "i32" for name in ints})
    # block shapes as `plan.block_config` and `plan.rescore_config` pick them
    bn = plan.block_config(64, DTYPES[dtype], d, True)[1]
    br, sc, dc, _ = plan.rescore_config(16, bn, d)
    consts = {
        "H": 3, "G": 3, "D": d, "DC": dc, "TOPK": top_k, "KP": triton.next_power_of_2(top_k), "BR": br, "BC": 64,
        "BN": bn, "SC": sc, "SHIFT": True,
    }  # fmt: skip
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=rescore.score_topk_fwd_kernel_rescore, signature=sig, constexprs=consts)


def tiles(top_k: int) -> ASTSource:
    sig = {"ws_v": "*fp32", "ws_i": "*i32", "keys": "*i32", "counts": "*i32", "ranks": "*i32"}
    sig.update({"R": "i32", "NSPLIT": "i32", "NT1": "i32"})
    consts = {"TOPK": top_k, "KP": triton.next_power_of_2(top_k), "BR": 16, "BC": 64}
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=rescore.score_topk_fwd_kernel_tiles, signature=sig, constexprs=consts)


def place() -> ASTSource:
    sig = {"keys": "*i32", "ranks": "*i32", "ends": "*i32", "sorted_keys": "*i32", "perm": "*i64", "NPAIR": "i32"}
    sig["BP"] = "constexpr"
    return ASTSource(fn=rescore.score_topk_fwd_kernel_place, signature=sig, constexprs={"BP": 1024})


def rescore_tiles(dtype: str, d: int, top_k: int, sub: int, model: str = "smollm2") -> ASTSource:
    fp = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    sig = {"q": fp, "k": fp, "keys": "*i32", "perm": "*i64", "ws_v": "*fp32", "ws_i": "*i32", "shift": "*i64"}
    ints = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "TK", "R", "NPAIR", "NT1")
    sig.update({name: "i32" for name in ints})
    h, g = HEADS[model]
    consts = {
        "H": h, "G": g, "D": d, "TOPK": top_k, "KP": triton.next_power_of_2(top_k), "W": plan.tile_rescore_config()[0],
        "SUB": sub, "KB": max(sub, 16), "IEEE": dtype == "fp32", "SHIFT": True,
    }  # fmt: skip
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=rescore.score_topk_fwd_kernel_rescore_tiles, signature=sig, constexprs=consts)


def tile_top(from_hits: bool, block: int, kp: int) -> ASTSource:
    sig = {"src": "*i64", "counts": "*i32", "dst": "*i64", "shift": "*i64"}
    sig.update({name: "i32" for name in ("stride_sb", "N", "M", "MC")})
    consts = {"FROM_HITS": from_hits, "BLOCK": block, "KP": kp, "SHIFT": True}
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=select._tile_top, signature=sig, constexprs=consts)


def blocks(kp: int, bs: int) -> ASTSource:
    sig = {"top": "*i64", "sel": "*i64", "n_sel": "*i64", "shift": "*i64"}
    sig.update({name: "i32" for name in ("M", "MC", "K", "W", "offset")})
    consts = {"BLOCK": 1024, "KP": kp, "BS": bs, "BSP": bs, "SHIFT": True}
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=select._blocks, signature=sig, constexprs=consts)


def select_small(np_: int) -> ASTSource:
    sig = {"hits": "*i64", "sel": "*i64", "n_sel": "*i64", "shift": "*i64"}
    sig.update({name: "i32" for name in ("stride_hb", "N", "M", "K", "W", "offset")})
    consts = {"NP": np_, "BLOCK": 1024, "KP": 32, "BS": 32, "BSP": 32, "SHIFT": True}
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=select._select_small, signature=sig, constexprs=consts)


def scope(
    dtype: str, d: int, merge: bool, split: bool = True, rows: int = 3, config: tuple | None = None,
    model: str = "smollm2",
) -> tuple[ASTSource, int, int]:  # fmt: skip
    """The scope attention kernel for ``rows`` rows per KV head (3: the embedded model's decode step),
    split or not, with or without the merge in its last program, and its num_warps and num_stages, as
    `attention._config` picks them (``config``: the block shape a device with more shared memory gets)."""
    fp = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    h, g = HEADS[model]
    bm, bn, warps, stages = config or attention._config(rows, DTYPES[dtype], d)
    sig = {"q": fp, "k": fp, "v": fp, "sel_idx": "*i64", "n_sel": "*i64", "cos_t": fp, "sin_t": fp, "o": fp}
    sig.update(lse="*fp32", ws_o="*fp32", ws_lse="*fp32", shift="*i64", counts="*i32")
    ints = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt")
    ints += ("stride_vh", "stride_sb", "stride_ss", "stride_ob", "stride_ot", "stride_oh", "TQ", "T", "sink_len")
    ints += ("local_start", "R", "NSPLIT", "pos_per_split")
    sig.update({name: "i32" for name in ints})
    sig["scale_log2"] = "fp32"
    consts = {
        "H": h, "G": g, "D": d, "BM": bm, "BN": bn, "SPLIT": split, "RETURN_LSE": False, "IEEE": dtype == "fp32",
        "SHIFT": True, "MERGE": merge, "BS": 32,
    }  # fmt: skip
    sig.update({name: "constexpr" for name in consts})
    return ASTSource(fn=attention.scope_attention_fwd_kernel, signature=sig, constexprs=consts), warps, stages


def _scan_name(dtype: str, d: int, top_k: int, split: bool, two_phase: bool, subtiles: int = 1, tma: bool = False,
               rows: int = 64, selects: bool = False, model: str = "smollm2") -> tuple:  # fmt: skip
    """A readable name of a `scan_src` variant (its arguments, in words; other models than the default named)."""
    name = ["scan", dtype, f"D{d}", f"top-{top_k}", "two-phase" if two_phase else "one-pass"]
    name += ["split" if split else "unsplit", f"rows-{rows}"]
    name += [f"subtiles-{subtiles}"] * (subtiles > 1) + ["tma"] * tma + ["selects"] * selects
    return tuple(name) + (model,) * (model != "smollm2")


def variants() -> list[tuple[tuple, ASTSource, int, int]]:
    """Every variant compiled here: ``(name, source, num_warps, num_stages)``; the scan and the scope
    attention with the stages their configs pick, the others with 3."""
    scans = [
        ("bf16", 64, 4, True, True),
        ("bf16", 64, 4, False, True),
        ("bf16", 128, 8, True, False),
        ("fp32", 64, 4, True, True),
        ("bf16", 128, 4, True, True, 2),  # phase 1 ranking sub-tiles: the reshaped row maxima
        ("bf16", 64, 8, True, True, 4),
        ("bf16", 128, 4, True, True, 1, True),  # phase 1's key tiles through a TMA descriptor
        ("bf16", 64, 4, True, True, 2, True),
        ("bf16", 64, 4, True, False, 1, False, 3),  # decode at head dim 64: 16 x 256 tiles
        ("bf16", 64, 4, True, False, 1, False, 3, True),  # ... selecting in its last program
        ("fp32", 128, 8, True, False, 1, False, 8, True),
        # Qwen2.5-Coder-1.5B (2 KV heads, groups of 6, D 128) and Qwen2.5-0.5B (2, 7, D 64), top-4: a decode
        # step selecting in its last program or not, and phase 1 of a 512-token prefill chunk
        ("bf16", 128, 4, True, False, 1, False, 6, True, "qwen1.5b"),
        ("bf16", 128, 4, True, False, 1, False, 6, False, "qwen1.5b"),
        ("bf16", 128, 4, True, True, 1, True, 3072, False, "qwen1.5b"),
        ("bf16", 64, 4, True, False, 1, False, 7, True, "qwen0.5b"),
        ("bf16", 64, 4, True, True, 1, True, 3584, False, "qwen0.5b"),
    ]
    sources = [(_scan_name(*v), *scan_src(*v)) for v in scans]
    sources += [
        (("rescore", *v), rescore_src(*v), plan.rescore_config(16, 64, v[1])[3])
        for v in (("bf16", 64, 4), ("bf16", 128, 8), ("fp32", 64, 4))
    ]
    sources += [(("tiles", 4), tiles(4), 4), (("place",), place(), 4)]
    sources += [
        (("rescore_tiles", *v), rescore_tiles(*v), plan.tile_rescore_config()[1])
        for v in (
            ("bf16", 64, 4, 32),
            ("bf16", 128, 8, 64),
            ("fp32", 64, 4, 32),
            ("bf16", 64, 4, 16),
            ("bf16", 128, 4, 64, "qwen1.5b"),
            ("bf16", 64, 4, 64, "qwen0.5b"),
        )  # fmt: skip
    ]
    sources += [
        (("tile_top", h, blk), tile_top(h, blk, 32), 4 if blk >= 512 else 1)
        for h, blk in ((True, 1024), (False, 512), (True, 64))
    ]
    # the blocks of a chunk's selection: the embedded preset's 32, Llama-8B's 127 (a 128-slot tile), the
    # Qwen models' 256 (the paper's sizing for a 32K window), and the Qwen chunk's reduction to 256 keys per tile
    sources += [(("blocks", kp, 32), blocks(kp, 32), select.BLOCKS_WARPS) for kp in (32, 128, 256)]
    sources.append((("tile_top", True, 1024, "kp-256"), tile_top(True, 1024, 256), 4))
    # a decode step's selection in one program (the embedded preset has 36 hits)
    sources += [(("select_small", n), select_small(n), select.SMALL_WARPS) for n in (16, 64)]
    # a decode step's split scope attention, merging in its last program or not
    sources += [(("scope", *v), *scope(*v)) for v in (("bf16", 64, True), ("bf16", 64, False), ("fp32", 128, True))]
    # ... for the Qwen models' groups of 6 (D 128) and 7 (D 64)
    sources += [(("scope", "bf16", 128, m, "qwen1.5b"), *scope("bf16", 128, m, True, 6, None, "qwen1.5b"))
                for m in (True, False)]  # fmt: skip
    sources.append((("scope", "bf16", 64, True, "qwen0.5b"), *scope("bf16", 64, True, True, 7, None, "qwen0.5b")))
    # prefill chunks: the embedded preset's (256 tokens x 3 heads), Llama-8B's (512 x 4) with the block shape
    # of a device with ~200 KB of shared memory per program, and the Qwen models' (512 x 6, 512 x 7)
    sources.append((("scope", "bf16", 64, "prefill", 768), *scope("bf16", 64, False, False, 768)))
    sources.append((("scope", "bf16", 128, "prefill", 2048), *scope("bf16", 128, False, False, 2048, (128, 128, 8, 3))))
    sources.append((("scope", "bf16", 128, "prefill", 3072, "qwen1.5b"),
                    *scope("bf16", 128, False, False, 3072, (128, 128, 8, 3), "qwen1.5b")))  # fmt: skip
    sources.append((("scope", "bf16", 64, "prefill", 3584, "qwen0.5b"),
                    *scope("bf16", 64, False, False, 3584, None, "qwen0.5b")))  # fmt: skip
    return [s if len(s) == 4 else (*s, 3) for s in sources]


def main() -> int:
    for v, src, warps, stages in variants():
        try:
            triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
        except Exception as exc:  # noqa: BLE001  (reported with the variant, then fail)
            print(f"FAILED {v}: {type(exc).__name__}: {exc}", flush=True)
            return 1
        print(f"compiled {v}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
