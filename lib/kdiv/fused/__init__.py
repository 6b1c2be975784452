"""The fused hidden-state path: divergences computed from the student's (and teacher's) last hidden states and
LM-head weights chunk by chunk, never materialising the [tokens, vocab] logits.

Not built yet: this package is the room it will live in.
"""
