"""kdiv: the divergences used as knowledge-distillation losses for large language models.

Token-level divergences on logits (one signature for all, see :mod:`kdiv.divergences`), optimal transport
(:mod:`kdiv.transport`), the AKL head / tail split (:mod:`kdiv.headtail`), and the registry ``DIVERGENCES`` / ``get``.
"""

from .divergences import (
    akl,
    forward_kl,
    js,
    mask_from_labels,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    symmetric_kl,
    tvd,
)
from .headtail import head_mask, head_tail_error, head_threshold
from .registry import DIVERGENCES, TOKEN_LEVEL, get, hyperparameters
from .transport import (
    sinkd,
    sinkhorn,
    sinkhorn_divergence,
    sinkhorn_plan,
    sorted_wasserstein,
    sorted_wasserstein_probs,
    wasserstein_1d,
    wasserstein_1d_probs,
)

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "TOKEN_LEVEL",
    "akl",
    "forward_kl",
    "get",
    "head_mask",
    "head_tail_error",
    "head_threshold",
    "hyperparameters",
    "js",
    "mask_from_labels",
    "reverse_kl",
    "sinkd",
    "sinkhorn",
    "sinkhorn_divergence",
    "sinkhorn_plan",
    "skew_kl",
    "skew_reverse_kl",
    "sorted_wasserstein",
    "sorted_wasserstein_probs",
    "symmetric_kl",
    "tvd",
    "wasserstein_1d",
    "wasserstein_1d_probs",
]
