"""Imported once by the fault suite's fork server (see `tests.faults.common.process_context`)."""

import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

import reattention_core
import reattention_core.cache.disk  # noqa: F401
import tests.helpers  # noqa: F401
