r"""Vocab-parallel divergences on torch.distributed: each rank holds a contiguous shard of the vocabulary, and the
divergence of the full rows is found with collectives over per-row statistics, never by gathering the logits.

Every token-level divergence takes ``vocab_group=``, a process group over which the vocabulary is split (the
tensor-parallel group of a vocab-parallel LM head)::

    loss = kdiv.akl(student_shard, teacher_shard, mask=mask, vocab_group=group)   # [..., V_rank] each
    loss.backward()                                                                # student_shard.grad: [..., V_rank]

Conventions:

- **Shards.** Each rank passes the logits of its own slice of the vocabulary, ``[..., V_rank]``, both models split
  alike; the slices are disjoint and together make the whole vocabulary. Their sizes may differ (V_rank >= 1).
  Which rank holds which ids does not change the result (every divergence here is a sum over the vocabulary, and
  the AKL head depends on the values only); the usual layout, Megatron-LM's, gives group rank r the ids
  ``[r V / world, (r + 1) V / world)`` (:func:`vocab_range` computes it, uneven sizes included).
- **Everything else is the same on every rank**: the batch shape, ``mask`` (True = the token counts),
  ``temperature``, ``reduction``, the hyper-parameters and ``chunk_size``. kdiv checks this with one small
  ``all_gather`` per call; a bad argument on any rank raises the same ValueError on every rank (which names the
  rank), so that no rank is left waiting in a collective.
- **The result** is the divergence of the full, concatenated rows, the same value on every rank, with the
  single-process conventions (``reduction`` ``"mean"`` over the counted tokens, ``"sum"``, ``"none"``; no
  ``T**2``; a ``-inf`` logit floored at log-probability -87.34, also when a rank's whole shard of a row is
  ``-inf``; bf16 / fp16 computed in fp32). ``loss.backward()`` on each rank writes that rank's shard of the
  gradient of the full loss into ``student_shard.grad``; no collective runs in backward. Call backward on every
  rank with the same upstream gradient, as a replicated loss gives it.
- **Communication** per chunk of rows (about 2^18 logits of the largest shard per chunk): three ``all_reduce`` of
  per-row numbers, 2 + 2 + 2 per row (2 + 2 + 6 for AKL), i.e. 24 bytes per token in fp32 (40 for AKL; float64
  inputs: twice that); AKL's head search adds two ``all_reduce`` per round, ``3 * BUCKETS + 1`` = 49 numbers
  (264 bytes) per row still searched (:mod:`kdiv.parallel.head`). Nothing of size [N, V] is communicated.

Megatron-core's tensor-parallel group is a plain ``torch.distributed`` process group, so it is passed as it is
(kdiv does not import Megatron)::

    from megatron.core import parallel_state
    group = parallel_state.get_tensor_model_parallel_group()
    # logits from a ColumnParallelLinear LM head with gather_output=False: [s, b, V / tp] on each rank
    loss = kdiv.reverse_kl(student_logits, teacher_logits, mask=mask, vocab_group=group)

With a teacher sharded like the student (its own vocab-parallel head on the same group), nothing else is needed;
the loss is then replicated over the group, as Megatron's ``vocab_parallel_cross_entropy`` is.
"""

from .head import BUCKETS
from .vocab import Stats, head_mask, vocab_parallel


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The ids ``[start, stop)`` of rank `rank`'s contiguous shard: ``vocab_size / world_size`` each when it
    divides (Megatron-LM's layout), else the first ``vocab_size % world_size`` ranks hold one more."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    if not (isinstance(vocab_size, int) and vocab_size >= world_size):
        raise ValueError(f"vocab_size must be an int >= world_size, got {vocab_size!r}")
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


__all__ = ["vocab_parallel", "head_mask", "vocab_range", "Stats", "BUCKETS"]
