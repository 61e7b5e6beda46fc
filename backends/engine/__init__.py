"""The paged-attention PyTorch engine (no Triton, no kvbridge internals)."""
