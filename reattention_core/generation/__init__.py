"""One generation, from a tokenised prompt to text.

* `request` - `Request`, `TextStream`, `GenerationResult`, `PrefillResult`;
* `sampling` - `SamplingParams` and the `Sampler`; `text` - deltas, stop strings, the result;
* `prefill` - chunked prefill; `loop` - the one decode loop over a model's `Steps`;
* `runner` - an engine's sessions (lock, store, cache); `cuda_graph` - steps replayed as CUDA graphs;
* `warmup` - the warm-up prompt.
"""

from reattention_core.generation.request import GenerationResult, PrefillResult, Request, TextStream
from reattention_core.generation.sampling import SamplingParams

__all__ = ["GenerationResult", "PrefillResult", "Request", "SamplingParams", "TextStream"]
