"""One generation: sampling, chunked prefill, the decode loop and CUDA-graph steps."""
