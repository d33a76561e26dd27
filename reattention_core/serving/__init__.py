"""OpenAI-compatible serving of a `ReAttentionEngine` (extra ``serve``: fastapi + uvicorn).

    reattention serve                        # embedded model on http://127.0.0.1:8000/v1

    from reattention_core.serving import BackgroundServer
    with BackgroundServer(engine) as srv:    # free loopback port, daemon thread
        openai.OpenAI(base_url=srv.base_url, api_key="x").chat.completions.create(...)
"""

from reattention_core.serving.app import AppConfig, create_app
from reattention_core.serving.server import BackgroundServer, ServeConfig, serve

__all__ = ["AppConfig", "BackgroundServer", "ServeConfig", "create_app", "serve"]
