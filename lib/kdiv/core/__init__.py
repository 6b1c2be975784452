"""The core of kdiv: everything a training script needs, on torch and numpy only.

- :mod:`.divergences`: the token-level divergences on logits (one signature for all) and ``mask_from_labels``;
  :mod:`.kernels`: their closed-form row kernels; :mod:`.spec`: one record per divergence; :mod:`.registry`:
  lookup by name.
- :mod:`.engine`: the chunked forward + backward that runs a row kernel over [tokens, vocab] logits, and the CPU
  worker pool it shares chunks out to.
- :mod:`.headtail`: AKL's head / tail split; :mod:`.head_selection`: the same threshold without full sorts.
- :mod:`.transport`: Wasserstein, Sinkhorn, the debiased Sinkhorn divergence and SinKD.
- :mod:`.checks`: argument checks (bad input raises a ValueError naming the argument).

Nothing in the core imports matplotlib, the notebooks' support (:mod:`kdiv.lab`) or a training framework.
"""
