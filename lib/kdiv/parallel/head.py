r"""AKL's head threshold for rows whose vocabulary is sharded over ranks: a distributed selection on per-row
statistics, never a gather of the logits.

The head of a row (:mod:`kdiv.core.headtail`) is ``{j : p_j >= tau}`` where, with the tie-aware mass
:math:`S(v) = \sum_{k:\, p_k \ge v} p_k`, ``tau`` is the smallest probability with :math:`S \le \mu`, or the
largest probability when even its tie group holds more than mu. Equivalently: let ``w`` be the largest probability
with :math:`S(w) > \mu`; ``tau`` is the next larger probability, or ``w`` itself when ``w`` is the maximum.

The search works on the teacher's log-probabilities (the same order and ties as the probabilities) and keeps per
row a range ``[a, b]`` known to hold ``w``, and the mass above ``b``. Each round cuts the range into
:data:`BUCKETS` equal buckets, and every rank adds up, per bucket, its tokens' mass and takes their largest and
smallest value: one ``all_reduce`` (SUM, float64) of ``[n, BUCKETS + 1]`` masses (the extra one: the mass of the
tie group at ``b``) and one ``all_reduce`` (MAX) of ``[n, 2 BUCKETS]`` extremes. The suffix sums of the masses give
``S`` at every bucket's smallest value, exactly (a value's S counts whole buckets above it); ``w`` lies in the
highest non-empty bucket whose smallest value has ``S > mu``, and that bucket's extremes, which are data values,
become the new ``[a, b]``. A row is settled when its range holds one value (ties included: equal values are one
value), and ``tau`` is then the smallest value above it, which the rounds have already seen. Every rank holds the
same range after every round (they are all made from reduced numbers), so all ranks leave the loop together.

Masses are summed in float64 and compared with mu in the compute dtype, as :func:`kdiv.core.headtail.head_threshold`
compares its cumulative sums (torch accumulates a float32 cumsum in float64 on CPU). The split agrees with the
unsharded one wherever the probabilities agree: the shard's probabilities come from the global log-normaliser
(``exp(z - lse)``) rather than from a softmax of the whole row, which can differ in the last bit, so a row whose
tie-aware mass lies within float rounding of mu (or two distinct logits a rounding apart) may split differently,
as it may between two implementations of softmax.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["head_threshold_sharded", "BUCKETS"]

# buckets per round: more buckets, fewer rounds (each two collectives), a larger message ([n, 3 BUCKETS + 1] scalars)
BUCKETS = 16
# a round always settles or narrows a row's range, so the loop ends; this only guards against a bug hanging ranks
_MAX_ROUNDS = 400


def _compact(values, probs, keep):
    """The kept entries of each row, moved to the front: (values [n, w] padded with -inf, probs [n, w] float64
    padded with 0), w the largest count of a row. Padding lies below every range, so no bucket counts it."""
    counts = keep.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    if width * 4 > values.shape[1] * 3:  # hardly smaller: mask in place instead
        return values.masked_fill(~keep, -math.inf), probs.to(torch.float64, copy=True).masked_fill_(~keep, 0.0)
    row, col = keep.nonzero(as_tuple=True)
    pos = torch.arange(row.numel(), device=values.device) - (counts.cumsum(0) - counts)[row]
    out_v = torch.full((values.shape[0], width), -math.inf, dtype=values.dtype, device=values.device)
    out_p = torch.zeros((values.shape[0], width), dtype=torch.float64, device=values.device)
    out_v[row, pos] = values[row, col]
    out_p[row, pos] = probs[row, col].double()
    return out_v, out_p


def head_threshold_sharded(lt, p, mu, vocab_size, top, group, all_reduce=None):
    """The head threshold on log-probabilities of the full rows, per row: the head is ``lt >= tau``.

    lt [n, V_rank]: the teacher's log-probabilities (of the full rows) on this rank's shard, p = exp(lt);
    vocab_size: the full vocabulary size; top [n]: the largest log-probability of each full row (the same value on
    every rank); group: the process group; all_reduce(x, op, group): the collective (default
    torch.distributed.all_reduce). Returns (tau [n], rounds).

    Only the tokens in a row's range take part in a round: they are moved to the front of a smaller tensor before the
    first round and whenever the ranges have shrunk (a local step: the collectives' sizes depend on the number of
    rows still searched only, which every rank knows alike).
    """
    n = lt.shape[0]
    dtype, device = lt.dtype, lt.device
    if all_reduce is None:

        def all_reduce(x, op, group):
            dist.all_reduce(x, op=op, group=group)

    # The tokens below (1 - mu) / (e V) hold less than (1 - mu) / e of the mass, so S there exceeds mu by a margin
    # far above rounding, and w is at or above it.
    a = torch.minimum(torch.full_like(top, math.log((1 - mu) / vocab_size) - 1.0), top)
    b = top.clone()
    above = torch.zeros(n, dtype=torch.float64, device=device)  # mass of the tokens above b
    nxt = torch.full_like(top, math.inf)  # the smallest value above b
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = torch.arange(BUCKETS, device=device, dtype=dtype) / BUCKETS
    index = torch.arange(BUCKETS, device=device)
    vals, probs = _compact(lt, p, lt >= a.unsqueeze(-1))
    rows = torch.arange(n, device=device)  # the row of the full chunk that each row of vals holds
    rounds = 0
    while True:
        rounds += 1
        if rounds > _MAX_ROUNDS:  # the same on every rank
            raise RuntimeError("kdiv.parallel: the AKL head search did not settle (please report this)")
        live = (~done).nonzero().squeeze(1)
        if rounds > 1:
            # drop the settled rows, and the tokens outside the ranges of the others
            at = torch.searchsorted(rows, live)
            rv, rp = vals[at], probs[at]
            keep = (rv >= a[live].unsqueeze(-1)) & (rv <= b[live].unsqueeze(-1))
            vals, probs = _compact(rv, rp, keep)
            rows = live
        rl, rp = vals, probs
        la, lb = a[live], b[live]
        # bucket lower edges a + (b - a) k / K, kept above a, so that the range always splits
        edges = la.unsqueeze(-1) + (lb - la).unsqueeze(-1) * steps
        edges[:, 1:] = torch.maximum(edges[:, 1:], torch.nextafter(la, lb).unsqueeze(-1))
        bucket = torch.searchsorted(edges, rl.contiguous(), right=True) - 1
        inside = (bucket >= 0) & (rl <= lb.unsqueeze(-1))
        bucket = torch.where(inside, bucket, BUCKETS)  # a dummy bucket for the tokens outside [a, b]
        m = len(live)
        mass = torch.zeros(m, BUCKETS + 2, dtype=torch.float64, device=device)
        mass.scatter_add_(1, bucket, rp)
        mass[:, BUCKETS + 1] = (rp * (rl == lb.unsqueeze(-1))).sum(-1)  # the tie group at b
        extremes = torch.full((m, 2, BUCKETS + 1), -math.inf, dtype=dtype, device=device)
        extremes[:, 0].scatter_reduce_(1, bucket, rl, "amax")
        extremes[:, 1].scatter_reduce_(1, bucket, rl.neg(), "amax")
        mass = torch.cat([mass[:, :BUCKETS], mass[:, BUCKETS + 1 :]], 1).contiguous()
        extremes = extremes[:, :, :BUCKETS].contiguous()
        all_reduce(mass, dist.ReduceOp.SUM, group)
        all_reduce(extremes, dist.ReduceOp.MAX, group)
        bmax, bmin = extremes[:, 0], extremes[:, 1].neg()
        la_above = above[live]
        # S at each bucket's smallest value: the mass above b and of every bucket from it up
        s = la_above.unsqueeze(-1) + mass[:, :BUCKETS].flip(-1).cumsum(-1).flip(-1)
        nonempty = bmax > -math.inf
        over = nonempty & ~(s.to(dtype) <= mu)
        # the top tie group alone holds more than mu: w is b
        top_group = ~((la_above + mass[:, BUCKETS]).to(dtype) <= mu)
        pick = torch.where(over, index, -1).amax(-1).clamp_min(0).unsqueeze(-1)
        new_a, new_b = bmin.gather(1, pick).squeeze(1), bmax.gather(1, pick).squeeze(1)
        higher = nonempty & (index > pick)
        next_in = torch.where(higher, bmin, math.inf).amin(-1)
        new_above = la_above + torch.where(higher, mass[:, :BUCKETS], 0.0).sum(-1)
        new_nxt = torch.where(next_in < math.inf, next_in, nxt[live])
        new_a = torch.where(top_group, lb, new_a)
        new_b = torch.where(top_group, lb, new_b)
        new_nxt = torch.where(top_group, nxt[live], new_nxt)
        a[live], b[live], nxt[live], above[live] = new_a, new_b, new_nxt, new_above
        done[live] = new_a == new_b
        if bool(done.all()):
            break
    return torch.where(nxt < math.inf, nxt, a), rounds
