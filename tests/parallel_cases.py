"""What every rank runs for tests/test_parallel.py: the vocab-parallel divergences on shards of seeded logits,
against the unsharded kdiv result (values and gradients) and the float64 references; and the bad-input scenarios.

Every rank builds the same full logits from one seed, takes its shard, and compares on its own: a rank returns a
list of failures (empty when all is well), which the test gathers. Many cases per process group: starting the
ranks costs far more than the cases.
"""

from __future__ import annotations

import math

import kdiv
import kdiv.parallel
import numpy as np
import reference
import torch
import torch.distributed as dist
from cases import DEFAULT_CASES, HYPER_CASES

SETTINGS = [tuple(c.values) for c in DEFAULT_CASES + HYPER_CASES]
REDUCTIONS = ("mean", "sum", "none")


def bounds(sizes, rank):
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def _logits(shape, seed, dtype, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _with_inf(s, t, sizes):
    """-inf entries: scattered in both, a row whose first shard is all -inf for the student, a row whose last shard
    is all -inf for the teacher, a row with both, and a row whose student and teacher -inf entries coincide."""
    s, t = s.clone(), t.clone()
    first, last = bounds(sizes, 0), bounds(sizes, len(sizes) - 1)
    t[0, 0, 3] = t[0, 1, 8] = -math.inf
    s[0, 2, 5] = s[1, 0, 0] = -math.inf
    s[1, 1, first[0] : first[1]] = -math.inf
    t[1, 2, last[0] : last[1]] = -math.inf
    s[2, 0, first[0] : first[1]] = -math.inf
    t[2, 0, last[0] : last[1]] = -math.inf
    s[2, 3, 4:9] = t[2, 3, 4:9] = -math.inf
    return s, t


def _close(what, got, want, rtol, atol, failures):
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False)
    except AssertionError as e:
        failures.append(f"{what}: {str(e).splitlines()[0:4]}")


def _one(fn, s, t, lo, hi, group, grad_out_seed=None, **kw):
    """(sharded value, sharded gradient, unsharded value, unsharded gradient's shard)."""
    full = s.clone().requires_grad_()
    want = fn(full, t, **kw)
    shard = s[..., lo:hi].clone().requires_grad_()
    got = fn(shard, t[..., lo:hi], vocab_group=group, **kw)
    grad_out = torch.ones_like(want)
    if grad_out_seed is not None:
        grad_out = _logits(want.shape, grad_out_seed, want.dtype, scale=1.0)
    want.backward(grad_out)
    got.backward(grad_out)
    return got.detach(), shard.grad, want.detach(), full.grad[..., lo:hi]


def divergences(rank, world, sizes, group_ranks, chunk_size=None):
    """Every divergence and hyper-parameter example, in float64 (masks, temperature, -inf, every reduction, chunks
    of `chunk_size` rows), float32 and bf16, on the group of `group_ranks` (None: every rank) with these shard
    sizes. Returns the failures. Collectives cost milliseconds each on a busy machine: few chunks."""
    group = dist.group.WORLD if group_ranks is None else dist.new_group(group_ranks)
    if group_ranks is not None and rank not in group_ranks:
        return []
    r = dist.get_rank(group)
    lo, hi = bounds(sizes, r)
    vocab = sum(sizes)
    failures = []
    s64, t64 = _with_inf(_logits((3, 5, vocab), 1, torch.float64), _logits((3, 5, vocab), 2, torch.float64), sizes)
    s64[0, 4] = math.nan  # a masked row may hold anything
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 4] = mask[2, 1] = False
    s32, t32 = _logits((7, vocab), 3, torch.float32), _logits((7, vocab), 4, torch.float32)
    s16, t16 = _logits((2, 3, vocab), 5, torch.bfloat16), _logits((2, 3, vocab), 6, torch.bfloat16)
    mask16 = torch.tensor([[True, False, True], [True, True, True]])
    for i, (name, hyper) in enumerate(SETTINGS):
        fn = kdiv.get(name, **hyper)
        reduction = REDUCTIONS[i % 3]
        tag = f"{name}{hyper} group {group_ranks} sizes {sizes}"
        kw = dict(temperature=1.7, mask=mask, reduction=reduction)
        got, grad, want, want_grad = _one(fn, s64, t64, lo, hi, group, grad_out_seed=i, chunk_size=chunk_size, **kw)
        _close(f"{tag} float64 {reduction} value", got, want, 1e-10, 1e-12, failures)
        _close(f"{tag} float64 {reduction} gradient", grad, want_grad, 1e-9, 1e-12, failures)
        # the float64 reference of the full rows, written independently of kdiv
        s_ref = np.where(np.isnan(s64.numpy()), 0.0, s64.numpy())  # the masked NaN row, made harmless
        per_token = reference.DIVERGENCES[name](s_ref, t64.numpy(), temperature=1.7, **hyper)
        expected = torch.as_tensor(reference.reduce(per_token, mask.numpy(), reduction))
        _close(f"{tag} float64 {reduction} vs reference", got, expected, 1e-8, 1e-10, failures)

        got, grad, want, want_grad = _one(fn, s32, t32, lo, hi, group)
        _close(f"{tag} float32 value", got, want, 2e-5, 2e-6, failures)
        _close(f"{tag} float32 gradient", grad, want_grad, 1e-4, 2e-7, failures)
        if not hyper:
            got, grad, want, want_grad = _one(fn, s16, t16, lo, hi, group, mask=mask16, reduction="sum")
            _close(f"{tag} bf16 value", got, want, 1e-4, 1e-5, failures)
            _close(f"{tag} bf16 gradient", grad.float(), want_grad.float(), 1.6e-2, 2e-3, failures)
            assert grad.dtype == torch.bfloat16
    # no counted token: 0, and a zero gradient, without a single collective per chunk
    shard = s32[..., lo:hi].clone().requires_grad_()
    value = kdiv.akl(shard, t32[..., lo:hi], mask=torch.zeros(7, dtype=torch.bool), vocab_group=group)
    value.backward()
    if value.item() != 0.0 or bool(shard.grad.any()):
        failures.append(f"{tag}: no counted token gave {value.item()}")
    return failures


def _head_teachers(vocab, sizes):
    """Teacher logits [rows, V] with every kind of head: peaked, flat (large heads), Gaussian, ties (integer
    logits, and whole tie groups across shards), Zipf-like, and shards of all -inf."""
    g = torch.Generator().manual_seed(7)
    rows = [
        4.0 * torch.randn(4, vocab, generator=g, dtype=torch.float64),
        0.5 * torch.randn(4, vocab, generator=g, dtype=torch.float64),  # flat: heads of hundreds
        torch.randint(0, 4, (4, vocab), generator=g).double(),  # ties everywhere
        torch.randint(0, 40, (4, vocab), generator=g).double() / 8,
        -torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))[torch.randperm(vocab, generator=g)].expand(2, -1),
        torch.zeros(1, vocab, dtype=torch.float64),  # one tie group: the whole row
    ]
    t = torch.cat(rows)
    t[0, 10] = 50.0  # a token above mu on its own
    first = bounds(sizes, 0)
    t[1, first[0] : first[1]] = -math.inf
    t[8, first[0] : first[1]] = -math.inf
    return t


def heads(rank, world, sizes):
    """AKL's head on shards equals kdiv.head_mask of the full rows, at several mu, float64 and float32."""
    lo, hi = bounds(sizes, rank)
    vocab = sum(sizes)
    t = _head_teachers(vocab, sizes)
    failures = []
    for dtype in (torch.float64, torch.float32):
        for mu in (0.1, 0.5, 0.9):
            tt = t.to(dtype)
            got = kdiv.parallel.head_mask(tt[:, lo:hi], mu, group=dist.group.WORLD, temperature=1.3)
            full = kdiv.head_mask(torch.softmax(tt / 1.3, -1), mu)[:, lo:hi]
            if not torch.equal(got, full):
                bad = (got != full).any(-1).nonzero().squeeze(1).tolist()
                failures.append(f"head {dtype} mu={mu}: rows {bad} differ")
            robust = reference.head_is_robust(reference.softmax_t(t.numpy(), 1.3), mu, 1e-5)
            want = reference.head_set(reference.softmax_t(t.numpy(), 1.3), mu)[:, lo:hi]
            if not (got.numpy() == want)[robust].all():
                failures.append(f"head {dtype} mu={mu}: differs from the reference's head set")
    return failures


def bad_inputs(rank, world):
    """One rank's bad argument (or a disagreement between ranks) raises on every rank; the group stays usable.
    Returns [(scenario, message or None)] on this rank; then, on the last scenario, the last rank leaves."""
    group = dist.group.WORLD
    vocab_sizes = [5 + 3 * r for r in range(world)]
    lo, hi = bounds(vocab_sizes, rank)
    s, t = _logits((4, sum(vocab_sizes)), 8, torch.float32), _logits((4, sum(vocab_sizes)), 9, torch.float32)
    s, t = s[:, lo:hi], t[:, lo:hi]
    nan = s.clone()
    if rank == world - 1:
        nan[2, 0] = math.nan
    all_inf = t.clone()
    all_inf[1] = -math.inf
    last = rank == world - 1
    mask = torch.tensor([True, rank == 0, rank != 0, True])  # as many counted rows on every rank, not the same
    scenarios = {
        "temperature on the last rank": lambda g: kdiv.js(s, t, temperature=-1.0 if last else 1.0, vocab_group=g),
        "hyper-parameter on rank 0": lambda g: kdiv.js(s, t, beta=2.0 if rank == 0 else 0.5, vocab_group=g),
        "unknown keyword on rank 0": lambda g: kdiv.tvd(s, t, vocab_group=g, **({"gamma": 1.0} if rank == 0 else {})),
        "mask differs": lambda g: kdiv.forward_kl(s, t, mask=mask, vocab_group=g),
        "divergence differs": lambda g: (kdiv.forward_kl if rank == 0 else kdiv.reverse_kl)(s, t, vocab_group=g),
        "shape on rank 0": lambda g: kdiv.akl(s[:3] if rank == 0 else s, t, vocab_group=g),
        "NaN on the last rank": lambda g: kdiv.akl(nan, t, vocab_group=g),
        "teacher all -inf": lambda g: kdiv.skew_kl(s, all_inf, vocab_group=g),
        "top-k teacher": lambda g: kdiv.forward_kl(
            s, kdiv.TopK(t.topk(2).indices, t.log_softmax(-1).topk(2).values), vocab_group=g
        ),
    }
    out = []
    for scenario, call in scenarios.items():
        try:
            call(group)
            out.append((scenario, None))
        except ValueError as e:
            out.append((scenario, str(e)))
    # still usable after all that
    out.append(("usable", float(kdiv.forward_kl(s, t, vocab_group=group))))
    return out


def leave(rank, world):
    """The last rank stops taking part (its own code failed before its call) and its process ends; the others'
    call must raise, not wait forever. Returns None on the last rank, else the error's (type, message)."""
    lo, hi = bounds([6] * world, rank)
    s, t = _logits((3, 6 * world), 10, torch.float32), _logits((3, 6 * world), 11, torch.float32)
    if rank == world - 1:
        return None
    try:
        kdiv.reverse_kl(s[:, lo:hi], t[:, lo:hi], vocab_group=dist.group.WORLD)
    except Exception as e:  # gloo's error for a peer that is gone (its type differs between torch versions)
        return (type(e).__name__, str(e)[:200])
    return ("no error", "")
