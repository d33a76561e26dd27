"""Framework adapters for the ReAttention engine.

* `reattention_integrations.langchain`: ``ChatReAttention`` and ``ReAttentionLLM`` (needs
  ``pip install "reattention[langchain]"``).
* `reattention_integrations.llama_index`: ``ReAttentionLLM`` (needs
  ``pip install "reattention[llama-index]"``).

Importing this package imports neither framework. Adapters share engines through a process-wide
registry: `shared_engine(EngineSettings.create(...))` is what they call on first use, and
`register_engine` hands the registry an engine you already loaded.
"""

from reattention_integrations._engine import EngineSettings, register_engine, shared_engine
from reattention_integrations.errors import UnsupportedMessageError

__all__ = ["EngineSettings", "UnsupportedMessageError", "register_engine", "shared_engine"]
