"""``reattention serve``: the OpenAI-compatible server (a `reattention_core.cli` plug-in)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="model id clients pass (default: the model's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-context", type=int, default=None, help="reject prompt + max_tokens above this (400)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion length when a request gives none")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling kernels before listening")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from reattention_core.cli import _load
    from reattention_core.serving.app import AppConfig
    from reattention_core.serving.server import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port)  # validate before loading the model
    engine = _load(args)
    if args.max_context is not None:
        engine.config = engine.config.replace(max_context=args.max_context)
    if not args.no_warmup and hasattr(engine, "warmup"):
        print(f"warming up ({engine.warmup():.1f}s)", file=sys.stderr, flush=True)
    print(f"serving {args.model_name or engine.model_name} at http://{config.host}:{config.port}/v1",
          file=sys.stderr, flush=True)
    serve(engine, config, AppConfig(model_name=args.model_name, api_key=args.api_key,
                                    default_max_tokens=args.max_tokens))
    return 0
