"""Where every layer's pre-RoPE keys and values live: resident, offloaded or sharded stores."""
