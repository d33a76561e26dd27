"""``reattention serve``: the OpenAI-compatible server (a `reattention_core.app.cli` plug-in).

Under ``torchrun`` (``WORLD_SIZE > 1``) the KV store is sharded across the ranks: rank 0 serves,
the other ranks follow its generations::

    torchrun --nproc-per-node 2 --no-python reattention serve
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from reattention_core.errors import InvalidInputError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="model id clients pass (default: the model's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-context", type=int, default=None, help="reject prompt + max_tokens above this (400)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion length when a request gives none")
    p.add_argument(
        "--max-request-bytes",
        default="64M",
        metavar="SIZE",
        help="refuse request bodies larger than this with 413 (default 64M)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip compiling kernels before listening")
    p.set_defaults(func=cmd_serve)


def _require_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidInputError(f"reattention serve needs {' and '.join(missing)}: pip install 'reattention[serve]'")


def _size(text: str) -> int:
    from reattention_core.cache.directory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise InvalidInputError(f"--max-request-bytes takes a size like 64M or 1048576, got {text!r}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    _require_extra()
    from reattention_core.app.cli import _load
    from reattention_core.app.serving.app import AppConfig
    from reattention_core.app.serving.server import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port)  # validate before loading the model
    app_config = AppConfig(
        model_name=args.model_name,
        api_key=args.api_key,
        default_max_tokens=args.max_tokens,
        max_request_bytes=_size(args.max_request_bytes),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _serve_sharded(args, config, app_config)
    engine = _load(args)
    if args.max_context is not None:
        engine.config = engine.config.replace(max_context=args.max_context)
    if not args.no_warmup and hasattr(engine, "warmup"):
        print(f"warming up ({engine.warmup():.1f}s)", file=sys.stderr, flush=True)
    print(
        f"serving {args.model_name or engine.model_name} at http://{config.host}:{config.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    serve(engine, config, app_config)
    return 0


def _serve_sharded(args: argparse.Namespace, config, app_config) -> int:
    """Under torchrun: every rank loads the model, rank 0 serves, the others follow its generations."""
    from reattention_core.app.cli import offload_config
    from reattention_core.app.serving.server import serve
    from reattention_core.distributed import ShardedEngine, init_from_env
    from reattention_core.engine import ReAttentionEngine

    if offload_config(args) is not None:
        raise InvalidInputError(
            "--offload works with one process; a sharded store (torchrun) keeps its shards on the GPUs"
        )
    if args.compile:
        raise InvalidInputError("--compile works with one process; drop it to serve a sharded store (torchrun)")
    device = init_from_env()
    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file, device=device, cache=False)
    if args.mode:
        engine.config = engine.config.replace(mode=args.mode)
    if args.max_context is not None:
        engine.config = engine.config.replace(max_context=args.max_context)
    sharded = ShardedEngine(engine)
    if not sharded.is_leader:
        sharded.follow()
        return 0
    print(
        f"serving {args.model_name or engine.model_name} at http://{config.host}:{config.port}/v1, "
        f"KV store sharded over {sharded.world} ranks",
        file=sys.stderr,
        flush=True,
    )
    try:
        serve(engine, config, app_config, backend=sharded)
    finally:
        sharded.shutdown()  # release the followers
    return 0
