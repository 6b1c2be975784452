"""AKL's head / tail weights on chunks of rows, with the head threshold found without sorting whole rows.

:func:`kdiv.core.headtail.head_threshold` sorts each row; at LLM vocabularies that sort costs more than the whole
divergence. :func:`head_threshold_rows` returns exactly the same threshold (same ties, same float arithmetic): most
rows are settled by their top 32 probabilities, found through the 64-token segments with the largest maxima; rows
with larger heads go through a bisection for a cutoff, then a sort of the tokens above it.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine.chunked import Scratch
from .headtail import threshold as head_threshold  # the unchecked form: rows come from the engine's softmax

__all__ = ["head_threshold_rows", "head_weight", "akl_weights"]

# Most rows are settled by their top _TOP_K probabilities; rows of at most _SORT_BELOW tokens are simply sorted.
_TOP_K = 32
_SORT_BELOW = 4 * _TOP_K
_SEGMENT = 64


def _top_values(p, k):
    """p.topk(k).values for p [n, V] (contiguous rows), several times faster for long rows: the k largest values
    lie in the k segments of _SEGMENT tokens with the largest maxima (those k maxima are k values >= the k-th
    largest maximum, so every value above it is in one of those segments, and ties with it are there k - a times
    over), so only k * _SEGMENT candidates go through topk."""
    n, vocab = p.shape
    full = vocab // _SEGMENT * _SEGMENT
    if full < 4 * k * _SEGMENT:
        return p.topk(k, dim=-1).values
    segments = p.as_strided((n, full // _SEGMENT, _SEGMENT), (p.stride(0), _SEGMENT, 1))
    best = segments.amax(-1).topk(k, dim=-1).indices
    candidates = segments.gather(1, best.unsqueeze(-1).expand(n, k, _SEGMENT)).reshape(n, k * _SEGMENT)
    if full < vocab:
        candidates = torch.cat([candidates, p[:, full:]], dim=1)
    return candidates.topk(k, dim=-1).values


def _threshold_of_prefix(values, mu):
    """head_threshold's own arithmetic on a descending prefix values [n, k] of each row's sorted probabilities.

    Returns (tau [n], settled [n] bool). Where the prefix holds more than mu of the mass (``settled``) tau equals
    head_threshold of the whole row: every tie group in the prefix but the last is complete, so its tie-aware
    cumulative mass is the same number as in the full sort, and the last (maybe cut) group already has more than mu
    and is outside the head either way."""
    mass = values.cumsum(dim=-1)
    n_head = (mass.gather(-1, _last_of_tie_group(values)) <= mu).sum(dim=-1, keepdim=True).clamp_min(1)
    return values.gather(-1, n_head - 1).squeeze(-1), mass[:, -1] > mu


def _last_of_tie_group(values):
    """For rows sorted in descending order [n, k]: the index of the last entry equal to each entry."""
    n, k = values.shape
    if k <= 256:  # a binary search per entry (as head_threshold does) costs less than the passes below
        neg = -values
        return torch.searchsorted(neg, neg, right=True) - 1
    # the first group end at or after each entry, by a reversed running minimum: O(k) instead of O(k log k)
    ends = torch.ones(n, k, dtype=torch.bool, device=values.device)
    ends[:, :-1] = values[:, :-1] != values[:, 1:]
    index = torch.arange(k, device=values.device).expand(n, k)
    return torch.where(ends, index, k).flip(-1).cummin(-1).values.flip(-1)


# The bisection stops once the mass at or above its cutoff exceeds mu by at most _MASS_SLACK * (1 - mu), or the
# tokens at or above it are at most _FEW_CANDIDATES: a few more candidates to sort, but fewer passes over the rows.
_MASS_SLACK = 0.1
_FEW_CANDIDATES = 2048
_MAX_PASSES = 16


def _cutoff_above_mu(p, mu, hi, ws):
    """Per row a probability cutoff c with more than mu of the mass at or above it, and not much more: bisection
    on log c between (1 - mu) / V (the tokens below it hold less than 1 - mu) and hi. p [n, V], hi [n] -> [n];
    ws: a Scratch of p's shape."""
    n, vocab = p.shape
    best = torch.full((n,), (1 - mu) / vocab, dtype=p.dtype, device=p.device)
    log_lo, log_hi = best.log(), hi.log()
    done = torch.zeros(n, dtype=torch.bool, device=p.device)
    for _ in range(_MAX_PASSES):
        mid = (log_lo + log_hi) / 2
        cutoff = mid.exp()
        # a float 0/1 indicator and a dot product: one cheap pass (bool masks are slow on CPU)
        indicator = torch.ge(p, cutoff.unsqueeze(-1), out=ws.scratch(0))
        mass = ws.dot(p, indicator)
        above = mass > mu
        best = torch.where(above, torch.maximum(best, cutoff), best)
        log_lo = torch.where(above, mid, log_lo)
        log_hi = torch.where(above, log_hi, mid)
        done |= above & ((mass <= mu + _MASS_SLACK * (1 - mu)) | (indicator.sum(-1) <= _FEW_CANDIDATES))
        if bool(done.all()):
            break
    return best


def _threshold_large_head(p, mu, hi, ws, native=None):
    """head_threshold(p, mu) for rows [n, V] whose head has more than _TOP_K tokens, hi [n] a probability at or
    above the threshold: only the probabilities at or above a cutoff holding more than mu of the mass are sorted.
    ws: a Scratch of p's shape; native: the native backend's kernel, which does the same steps row by row (any
    cutoff with more than mu above it gives the same threshold)."""
    n, vocab = p.shape
    if native is not None and p.dtype == torch.float32 and p.device.type == "cpu":
        # the same steps in the native kernel, row by row: the bisection, then the selection, sort and prefix sums
        cutoff = native.head_cutoff(p, mu, hi, _MASS_SLACK, _FEW_CANDIDATES, _MAX_PASSES)
        tau, settled = native.head_threshold(p, mu, cutoff)
        if not bool(settled.all()):
            redo = (~settled).nonzero().squeeze(1)
            tau[redo] = head_threshold(p[redo], mu)
        return tau
    cutoff = _cutoff_above_mu(p, mu, hi, ws)
    if p.device.type == "cpu":
        prefix = _sorted_candidates_numpy(p, cutoff, vocab // 4)
    else:
        prefix = _sorted_candidates(p, cutoff, vocab // 4)
    if prefix is None:
        return head_threshold(p, mu)  # flat rows: sorting them whole costs about the same
    tau, settled = _threshold_of_prefix(prefix, mu)
    if not bool(settled.all()):
        # the bisection's sums and the cumsum's disagree about mu: only at a razor's edge, sort those rows whole
        redo = (~settled).nonzero().squeeze(1)
        tau[redo] = head_threshold(p[redo], mu)
    return tau


def _sorted_candidates(p, cutoff, max_width):
    """[n, width]: each row's probabilities >= its cutoff, in descending order, zero-padded; None when some row
    has more than max_width of them."""
    n = p.shape[0]
    keep = p >= cutoff.unsqueeze(-1)
    counts = keep.sum(-1)
    width = int(counts.max())
    if width > max_width:
        return None
    row, col = keep.nonzero(as_tuple=True)
    start = counts.cumsum(0) - counts
    prefix = torch.zeros(n, width, dtype=p.dtype, device=p.device)
    prefix[row, torch.arange(row.numel(), device=p.device) - start[row]] = p[row, col]
    return prefix.sort(dim=-1, descending=True).values


def _sorted_candidates_numpy(p, cutoff, max_width):
    """:func:`_sorted_candidates` on the CPU through numpy, whose selection and sort of a few thousand values are
    several times faster than torch's nonzero and sort at these sizes (measured: [8, 32000] rows, ~1000 candidates
    each, 0.25 ms against 0.8 ms); the same values, so the same threshold."""
    rows, cuts = p.detach().numpy(), cutoff.detach().numpy()
    kept = [row[row >= c] for row, c in zip(rows, cuts, strict=True)]
    width = max(len(k) for k in kept)
    if width > max_width:
        return None
    prefix = np.zeros((len(kept), width), dtype=rows.dtype)
    for i, k in enumerate(kept):
        k.sort()
        prefix[i, : len(k)] = k[::-1]
    return torch.from_numpy(prefix)


def head_threshold_rows(p, mu, ws, native=None):
    """Exactly :func:`kdiv.core.headtail.head_threshold` (same ties, same float arithmetic) for p [n, V], without a
    full sort: a row whose top probability exceeds mu has that as its threshold; a top-_TOP_K settles the rows
    whose head is small; the rest go through :func:`_threshold_large_head`. ws: a Scratch of p's shape; native:
    the native backend's kernel (kdiv.core.engine.native.NativeKernel), which then does the large heads' bisection,
    selection, sort and prefix sums, or None."""
    n, vocab = p.shape
    if vocab <= _SORT_BELOW or p.device.type == "cuda":
        return head_threshold(p, mu)  # on CUDA: no host sync in the chunk loop (see the module docstring)
    top1 = p.amax(-1)
    if bool((top1 > mu).all()):
        return top1  # the top group alone has more than mu: the head is that group
    top = _top_values(p, _TOP_K)
    tau, settled = _threshold_of_prefix(top, mu)
    if not bool(settled.all()):
        rows = (~settled).nonzero().squeeze(1)
        if rows.numel() == n:
            tau = _threshold_large_head(p, mu, top[:, -1], ws, native)
        else:
            tau[rows] = _threshold_large_head(p[rows], mu, top[rows, -1], ws.first_rows(rows.numel()), native)
    return tau


def head_weight(q, p, mu, ws):
    """AKL's head weight g_head / (g_head + g_tail) per row [n] for probabilities [n, V]; 1/2 where q == p.
    ws: a Scratch of p's shape (its buffers 0 and 1 are overwritten)."""
    tau = head_threshold_rows(p, mu, ws)
    err = torch.sub(p, q, out=ws.scratch(0)).abs_()
    g_total = err.sum(-1)
    # a float 0/1 head indicator and a dot product: much faster on CPU than a bool mask and masked_fill
    g_head = ws.dot(err, torch.ge(p, tau.unsqueeze(-1), out=ws.scratch(1)))
    # The reference code divides 0 by 0 when p == q; any weights give loss 0 and gradient 0 there.
    exact = g_total == 0
    return torch.where(exact, 0.5, g_head / torch.where(exact, 1, g_total))


def akl_weights(logq, logp, mu):
    """AKL's (head weight, tail weight) per row from log-probabilities [..., V] -> ([...], [...]); (1/2, 1/2) where
    the student is exact. The head is :func:`kdiv.core.headtail.head_mask` of p = exp(logp)."""
    p, q = logp.exp(), logq.exp()
    vocab = p.shape[-1]
    p2, q2 = p.reshape(-1, vocab).contiguous(), q.reshape(-1, vocab).contiguous()
    w_head = head_weight(q2, p2, mu, Scratch.like(p2)).reshape(p.shape[:-1])
    return w_head, 1 - w_head
