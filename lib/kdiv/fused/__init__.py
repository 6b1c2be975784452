"""The fused hidden-state path: divergences computed from the student's (and teacher's) last hidden states and
LM-head weights chunk by chunk, never materialising the [tokens, vocab] logits (:func:`kdiv.fused_linear`)."""

from .linear import fused_linear as fused_linear
