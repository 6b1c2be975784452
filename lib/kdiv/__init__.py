"""kdiv: the divergences used as knowledge-distillation losses for large language models.

``import kdiv`` loads the core only (torch and numpy): the token-level divergences on logits (one signature for
all, :mod:`kdiv.core.divergences`), optimal transport (:mod:`kdiv.core.transport`), the AKL head / tail split
(:mod:`kdiv.core.headtail`) and the registry (``DIVERGENCES``, ``get``, ``spec``). What the notebooks use is in
:mod:`kdiv.lab` (the ``notebooks`` extra).
"""

from .core import headtail as headtail
from .core import transport as transport
from .core.checks import KdivWarning
from .core.distillation_loss import DistillationLoss, DistillationLossOutput
from .core.divergences import *  # noqa: F403  (every registered divergence, and mask_from_labels)
from .core.divergences import __all__ as _divergence_names
from .core.engine.native import backend, get_backend, native_build, set_backend
from .core.headtail import head_mask, head_tail_error, head_threshold
from .core.registry import DIVERGENCES, SPECS, TOKEN_LEVEL, get, hyperparameters, spec
from .core.spec import DivergenceSpec, Hyper
from .core.transport import (
    sinkd,
    sinkhorn,
    sinkhorn_divergence,
    sinkhorn_plan,
    sorted_wasserstein,
    sorted_wasserstein_probs,
    wasserstein_1d,
    wasserstein_1d_probs,
)
from .fused import fused_linear
from .topk.teacher import TopK, topk_from_logits

__version__ = "0.2.0"

__all__ = [
    *_divergence_names,
    "DIVERGENCES",
    "DistillationLoss",
    "DistillationLossOutput",
    "DivergenceSpec",
    "KdivWarning",
    "Hyper",
    "SPECS",
    "TOKEN_LEVEL",
    "TopK",
    "backend",
    "fused_linear",
    "get",
    "get_backend",
    "head_mask",
    "head_tail_error",
    "head_threshold",
    "hyperparameters",
    "native_build",
    "set_backend",
    "sinkd",
    "sinkhorn",
    "sinkhorn_divergence",
    "sinkhorn_plan",
    "sorted_wasserstein",
    "sorted_wasserstein_probs",
    "spec",
    "topk_from_logits",
    "wasserstein_1d",
    "wasserstein_1d_probs",
]

# The notebooks' modules lived at the top level before kdiv.lab: ``from kdiv.lab import toy`` still works, importing
# kdiv.lab.toy (and matplotlib) only when asked for.
_LAB = ("toy", "gaussian", "outliers", "zoo", "gradients", "explorer", "plotting")


def __getattr__(name):
    if name in _LAB:
        import importlib

        return importlib.import_module(f"kdiv.lab.{name}")
    raise AttributeError(f"module 'kdiv' has no attribute {name!r}")
