"""Framework adapters for the ReAttention engine: `reattention_integrations.langchain` (extra
``langchain``) and `reattention_integrations.llama_index` (extra ``llama-index``).

Importing this package imports neither framework. Adapters share engines through a process-wide
registry (`shared_engine`, `register_engine`).
"""

from reattention_integrations._engine import EngineSettings, register_engine, shared_engine
from reattention_integrations.errors import UnsupportedMessageError

__all__ = ["EngineSettings", "UnsupportedMessageError", "register_engine", "shared_engine"]
