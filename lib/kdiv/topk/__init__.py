"""Top-k teachers: a teacher given as top-k token ids and log-probabilities (from an offline pass or a serving
engine), the treatments of the mass outside the k ids (:mod:`.teacher`), and an on-disk store of a teacher's top-k
over a tokenised dataset (:mod:`.store`).
"""

from .store import TopKStore, TopKStoreWriter, sequence_hash
from .teacher import TREATMENTS, TopK, topk_divergence, topk_from_logits

__all__ = ["TREATMENTS", "TopK", "TopKStore", "TopKStoreWriter", "sequence_hash", "topk_divergence", "topk_from_logits"]
