"""One layer of ReAttention: the scope plan, block selection, RoPE and the attention function."""
