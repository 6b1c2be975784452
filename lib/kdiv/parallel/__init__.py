"""Vocab-parallel divergences on torch.distributed: each rank holds a contiguous shard of the vocabulary, and the
divergence of the full row is found with collectives over per-row statistics, never by gathering logits.

Not built yet: this package is the room it will live in.
"""
