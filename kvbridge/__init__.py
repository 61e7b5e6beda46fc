"""kvbridge: a radix-indexed paged KV block store with a master index and layer-wise transports.

Never imports Triton; the index, hashing and protocol modules never import torch.
"""
