"""Vocab-parallel divergences on torch.distributed (placeholder docstring, filled in below)."""

from .vocab import vocab_parallel

__all__ = ["vocab_parallel"]
