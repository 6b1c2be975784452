r"""Optimal transport between distributions: exact 1-D W1, ULD's sorted W1, log-domain Sinkhorn, SinKD.

Two levels of API:

- on **logits**, with the signature of every kdiv divergence
  ``fn(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", **hyper)``:
  :func:`wasserstein_1d`, :func:`sorted_wasserstein` (per token) and :func:`sinkd` (per batch). Student first;
  ``q = softmax(student_logits / T)``, ``p = softmax(teacher_logits / T)``; gradients reach the student only;
  no ``T**2`` factor. A ``-inf`` logit is a probability of exactly 0 (no logarithm is taken here).
- on **probabilities** (last axis sums to 1), for the notebooks: :func:`wasserstein_1d_probs`,
  :func:`sorted_wasserstein_probs`, :func:`sinkhorn`, :func:`sinkhorn_plan`, :func:`sinkhorn_divergence`.
  Arguments ``(a, b)`` as in POT: ``cost[i, j]`` is the price of moving a unit of mass from ``a_i`` to ``b_j``.
  Gradients flow to every tensor argument by autograd.

float64 inputs are computed in float64, everything else in float32; the result has that dtype.
"""

from __future__ import annotations

import math

import torch

from .checks import _as_float, check_logits, check_mask, check_positive, check_positive_int, check_reduction, warn

__all__ = [
    "wasserstein_1d",
    "wasserstein_1d_probs",
    "sorted_wasserstein",
    "sorted_wasserstein_probs",
    "sinkhorn",
    "sinkhorn_plan",
    "sinkhorn_divergence",
    "sinkd",
]

# Sinkhorn checks its marginal error every this many iterations: each check costs about one iteration and a
# device-to-host sync.
CHECK_EVERY = 10


# ---------------------------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------------------------


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tol(tol) -> float:
    tol = _as_float("tol", tol)
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    return tol


def _check_probs(name: str, x) -> None:
    """x is a floating tensor [..., n], n >= 1, of finite non-negative entries summing to 1 over the last axis."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor of probabilities [..., n]")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., n] with n >= 1, got {tuple(x.shape)}")
    with torch.no_grad():
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        if (x < 0).any():
            raise ValueError(f"{name} has negative entries")
        # loose enough for float32 probabilities over a large vocabulary
        if ((x.double().sum(-1) - 1).abs() > 1e-4).any():
            raise ValueError(f"{name} must sum to 1 over its last axis")


def _check_support(support, n: int, dtype, device) -> torch.Tensor | None:
    if support is None:
        return None
    support = torch.as_tensor(support)
    if support.dim() != 1 or support.shape[0] != n:
        raise ValueError(
            f"support must be a 1-D tensor of length {n} (the vocabulary), got shape {tuple(support.shape)}"
        )
    support = support.to(device=device, dtype=dtype)
    if not torch.isfinite(support).all():
        raise ValueError("support contains NaN or inf")
    if n > 1 and not (support.diff() > 0).all():
        raise ValueError("support must be strictly increasing")
    return support


def _probs_from_logits(student_logits, teacher_logits, temperature, mask):
    """(q, p, mask) in the compute dtype; rows that do not count are set to uniform so that no NaN appears."""
    check_logits(student_logits, teacher_logits)
    temperature = check_positive("temperature", temperature)
    mask = check_mask(mask, student_logits.shape[:-1], student_logits.device)
    dtype = _dtype(student_logits, teacher_logits)
    out = []
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits.detach())):
        z = x.to(dtype) / temperature
        with torch.no_grad():
            if torch.isnan(z).any() or (z == math.inf).any():
                raise ValueError(f"{name} contains NaN or +inf")
            empty = (z == -math.inf).all(-1)
            if mask is not None:
                empty &= mask
            if empty.any():
                raise ValueError(f"{name} has a counted token whose logits are all -inf")
        if mask is not None:
            z = torch.where(mask.unsqueeze(-1), z, 0)
        # exp(z - logsumexp z) rather than torch.softmax, whose CPU kernel is parallel even for tiny inputs and
        # can take milliseconds per call on a busy machine
        out.append((z - torch.logsumexp(z, dim=-1, keepdim=True)).exp())
    return out[0], out[1], mask


def _reduce(rows, mask, reduction):
    """rows [...] -> [] ("mean" over counted rows, 0 when none counts; "sum") or [...] ("none", 0 where masked)."""
    if mask is not None:
        rows = torch.where(mask, rows, 0)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n_counted = rows.numel() if mask is None else mask.sum()
    return total / (n_counted.clamp_min(1) if isinstance(n_counted, torch.Tensor) else max(n_counted, 1))


# ---------------------------------------------------------------------------------------------------------------
# The math, once each
# ---------------------------------------------------------------------------------------------------------------


def _w1(a, b, support):
    # CDF difference on each of the V - 1 gaps between consecutive support points (the last CDF value is 1 for both)
    gap = (a.cumsum(-1) - b.cumsum(-1))[..., :-1].abs()
    return gap.sum(-1) if support is None else (gap * support.diff()).sum(-1)


def _sorted_l1(a, b):
    return (a.sort(-1, descending=True).values - b.sort(-1, descending=True).values).abs().sum(-1)


def _sinkhorn_log_plan(log_a, log_b, cost, epsilon, max_iter, tol, caller="sinkhorn"):
    """log of the entropic plan, [..., n, m], by Sinkhorn iterations on the dual potentials in the log domain.

    The potentials are kept divided by epsilon (f = F / eps): every exp() is of a difference, so nothing
    overflows however small epsilon is. Each iteration makes the column marginals exact; the stopping test is the
    L1 error of the row marginals. A zero-mass entry has log_a = -inf and gets an empty row (column) of the plan.
    With tol > 0, a KdivWarning (naming `caller`) when max_iter iterations end above it.
    """
    neg_c = -cost / epsilon
    g = torch.zeros_like(log_b)
    error = math.inf
    for it in range(max_iter):
        f = log_a - torch.logsumexp(neg_c + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(neg_c + f.unsqueeze(-1), dim=-2)
        if tol > 0 and ((it + 1) % CHECK_EVERY == 0 or it + 1 == max_iter):
            error = _row_marginal_error(neg_c, f, g, log_a)
            if error <= tol:
                break
    if tol > 0 and error > tol:
        needed = max(cost.max().item() / epsilon, 1.0)
        if max_iter < 3 * needed:
            advice = (
                f"Raise max_iter (about max(cost) / epsilon = {needed:.3g} iterations are needed, more in float32) "
                "or epsilon"
            )
        else:
            advice = (
                f"max_iter is already well above max(cost) / epsilon = {needed:.3g}: tol is probably below what "
                f"{cost.dtype} reaches at this epsilon; raise tol or epsilon, or pass float64 inputs"
            )
        warn(
            f"{caller} did not converge: after max_iter={max_iter} iterations the row marginals are off by "
            f"{error:.3g} in L1 (tol={tol:g}): the plan is not yet a transport plan between the marginals, and for a "
            f"small epsilon the value can be far off. {advice}; tol=0 runs exactly max_iter iterations unchecked."
        )
    return neg_c + f.unsqueeze(-1) + g.unsqueeze(-2)


def _row_marginal_error(neg_c, f, g, log_a) -> float:
    """The largest L1 error of the plan's row marginals (its column marginals are exact after each iteration)."""
    with torch.no_grad():
        rows = torch.logsumexp(neg_c + f.unsqueeze(-1) + g.unsqueeze(-2), dim=-1).exp()
        return (rows - log_a.exp()).abs().sum(-1).max().item()


def _safe_log(x):
    # log 0 = -inf without a NaN gradient (d log x / dx at 0 would be inf, times a zero upstream gradient)
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).log(), -math.inf)


# ---------------------------------------------------------------------------------------------------------------
# 1-D Wasserstein and ULD's sorted variant
# ---------------------------------------------------------------------------------------------------------------


def wasserstein_1d_probs(a, b, *, support=None):
    r"""Exact W1 between two distributions on one ordered 1-D support, from probabilities.

    .. math:: W_1(a, b) = \sum_{i=0}^{V-2} \Big|\sum_{k \le i} a_k - \sum_{k \le i} b_k\Big|\,(x_{i+1} - x_i)

    with support points :math:`x_0 < \dots < x_{V-1}`; ``support=None`` means :math:`x_i = i` (spacing 1). This is
    the closed form of optimal transport with cost :math:`|x_i - x_j|` (``scipy.stats.wasserstein_distance`` with
    ``u_values = v_values = support`` and the probabilities as weights). Symmetric in (a, b).

    Shapes: a, b [..., V] (each sums to 1 over the last axis); support [V]; returns [...].
    Reference: Vallender, "Calculation of the Wasserstein Distance Between Probability Distributions on the
    Line", Theory Probab. Appl. 18, 1974.
    """
    _check_probs("a", a)
    _check_probs("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = _dtype(a, b)
    support = _check_support(support, a.shape[-1], dtype, a.device)
    return _w1(a.to(dtype), b.to(dtype), support)


def wasserstein_1d(student_logits, teacher_logits, *, support=None, temperature=1.0, mask=None, reduction="mean"):
    r"""Exact W1 between student and teacher on an ordered vocabulary: :math:`\sum_i |Q_i - P_i|\,(x_{i+1} - x_i)`.

    :math:`Q, P` are the cumulative sums of q and p over the vocabulary in its given order, :math:`x` the support
    (``None``: :math:`x_i = i`). Meaningful when token ids carry an order (binned numbers, ratings, the toy
    teachers); on an LLM vocabulary the order is arbitrary. The gradient (by autograd) is bounded: every
    :math:`|\partial W_1 / \partial q_k| \le x_{V-1} - x_0`. Math in :func:`wasserstein_1d_probs`.

    Shapes: logits [..., V]; support [V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Vallender, "Calculation of the Wasserstein Distance Between Probability Distributions on the
    Line", Theory Probab. Appl. 18, 1974.
    """
    reduction = check_reduction(reduction)
    q, p, mask = _probs_from_logits(student_logits, teacher_logits, temperature, mask)
    support = _check_support(support, q.shape[-1], q.dtype, q.device)
    return _reduce(_w1(q, p, support), mask, reduction)


def sorted_wasserstein_probs(a, b):
    r"""ULD's distance from probabilities: :math:`\sum_i |a_{(i)} - b_{(i)}|`, both sorted in descending order.

    It is V times the exact W1 between the *values* :math:`\{a_i\}` and :math:`\{b_i\}` seen as two clouds of V
    points of mass 1/V on the real line (``V * scipy.stats.wasserstein_distance(a, b)``): it ignores which token
    holds which probability, so it is 0 whenever b is a permutation of a. Never larger than
    :math:`\sum_i |a_i - b_i| = 2\,\mathrm{TVD}`; in [0, 2].

    Shapes: a, b [..., V] (each sums to 1 over the last axis); returns [...].
    Reference: Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
    LLMs", arXiv 2402.12030, 2024.
    """
    _check_probs("a", a)
    _check_probs("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = _dtype(a, b)
    return _sorted_l1(a.to(dtype), b.to(dtype))


def sorted_wasserstein(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean"):
    r"""ULD loss term: :math:`\sum_i |q_{(i)} - p_{(i)}|` with q and p each sorted in descending order.

    The distillation term of the Universal Logit Distillation loss (without its cross-entropy term and weight),
    per token. ULD was made for teachers and students with different vocabularies: its code pads the shorter
    sorted vector with zeros; here both logits share one vocabulary, so no padding is needed. ULD's code sums over
    the vocabulary with no 1/2 factor, as here; it averages over the answer tokens of each sequence, then over
    sequences, where reduction="mean" averages over all counted tokens at once. ULD allows a different
    temperature for student and teacher; here one ``temperature`` divides both. See
    :func:`sorted_wasserstein_probs` for what the value measures.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
    LLMs", arXiv 2402.12030, 2024.
    """
    reduction = check_reduction(reduction)
    q, p, mask = _probs_from_logits(student_logits, teacher_logits, temperature, mask)
    return _reduce(_sorted_l1(q, p), mask, reduction)


# ---------------------------------------------------------------------------------------------------------------
# Entropic optimal transport
# ---------------------------------------------------------------------------------------------------------------


def _sinkhorn_args(a, b, cost, epsilon, max_iter, tol):
    _check_probs("a", a)
    _check_probs("b", b)
    epsilon = check_positive("epsilon", epsilon)
    max_iter = check_positive_int("max_iter", max_iter)
    tol = _check_tol(tol)
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"cost must be a torch.Tensor [n, m] or [..., n, m], got {type(cost).__name__}")
    n, m = a.shape[-1], b.shape[-1]
    if cost.dim() < 2 or tuple(cost.shape[-2:]) != (n, m):
        raise ValueError(f"cost must have shape [..., {n}, {m}] (a's and b's sizes), got {tuple(cost.shape)}")
    try:
        torch.broadcast_shapes(a.shape[:-1], b.shape[:-1], cost.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading dims of a {tuple(a.shape[:-1])}, b {tuple(b.shape[:-1])} and cost "
            f"{tuple(cost.shape[:-2])} do not broadcast"
        ) from None
    if not torch.isfinite(cost).all():
        raise ValueError("cost contains NaN or inf")
    dtype = _dtype(a, b, cost) if cost.is_floating_point() else _dtype(a, b)
    a, b, cost = a.to(dtype), b.to(dtype), cost.to(device=a.device, dtype=dtype)
    return a, b, cost, epsilon, max_iter, tol


def sinkhorn_plan(a, b, cost, *, epsilon=0.1, max_iter=1000, tol=1e-6):
    r"""The entropic optimal transport plan :math:`\Gamma_\varepsilon` between a and b.

    .. math:: \Gamma_\varepsilon = \arg\min_{\Gamma \ge 0,\ \Gamma 1 = a,\ \Gamma^\top 1 = b}
              \langle \Gamma, C \rangle + \varepsilon\,\mathrm{KL}(\Gamma \,\|\, a b^\top)

    computed with Sinkhorn iterations in the log domain (stable for small epsilon: no kernel
    :math:`e^{-C/\varepsilon}` is formed). The entropy term :math:`\sum \Gamma \log \Gamma` of POT gives the same
    plan. Iterations stop after ``max_iter`` or once the row marginals are within ``tol`` in L1 (checked every
    10 iterations and at the last; ``tol=0`` runs exactly ``max_iter``); the column marginals are exact after every
    iteration. Gradients flow through the iterations by autograd (memory: a few [..., n, m] tensors per iteration
    when gradients are needed).

    Choosing epsilon and max_iter: epsilon is a length on the cost's scale. The plan blurs the exact one over costs
    of about epsilon, so the value exceeds the exact OT cost by roughly epsilon times a log of the support size;
    take epsilon a small fraction (1-5 %) of :math:`\max C` for a value close to exact OT, larger for a smooth loss.
    The iterations needed grow as :math:`\max C / \varepsilon` (more in float32, whose potentials, of that size,
    lose precision): budget max_iter at a few times that. When ``max_iter`` iterations end with the row marginals
    still more than ``tol`` off, a :class:`kdiv.KdivWarning` says so with the error (as POT does): the plan is
    then not a transport plan between a and b and the value can be far off (two bumps 8 apart on [0, 10], exact
    cost 7.82: 0 at epsilon = 1e-6 after 1000 iterations). ``tol=0`` turns the check off.

    Shapes: a [..., n], b [..., m] (each sums to 1); cost [n, m] or [..., n, m] (leading dims broadcast);
    returns [..., n, m].
    Reference: Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013;
    Peyré & Cuturi, "Computational Optimal Transport", 2019, Sec. 4.4 (log-domain iterations).
    """
    a, b, cost, epsilon, max_iter, tol = _sinkhorn_args(a, b, cost, epsilon, max_iter, tol)
    return _sinkhorn_log_plan(_safe_log(a), _safe_log(b), cost, epsilon, max_iter, tol, "sinkhorn_plan").exp()


def sinkhorn(a, b, cost, *, epsilon=0.1, max_iter=1000, tol=1e-6):
    r"""Transport cost of the entropic plan, :math:`\langle \Gamma_\varepsilon, C \rangle = \sum_{ij}
    \Gamma_{ij} C_{ij}` (the "Sinkhorn distance" of Cuturi 2013).

    The value does not include the entropy term, as ``ot.sinkhorn2`` of POT. It tends to the exact OT cost
    (``ot.emd2``) as epsilon -> 0, from above. Plan, iterations and gradients as in :func:`sinkhorn_plan`.

    Shapes: a [..., n], b [..., m] (each sums to 1); cost [n, m] or [..., n, m]; returns [...].
    Reference: Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013.
    """
    a, b, cost, epsilon, max_iter, tol = _sinkhorn_args(a, b, cost, epsilon, max_iter, tol)
    plan = _sinkhorn_log_plan(_safe_log(a), _safe_log(b), cost, epsilon, max_iter, tol).exp()
    return (plan * cost).sum((-2, -1))


def sinkhorn_divergence(a, b, cost, *, epsilon=0.1, max_iter=1000, tol=1e-6):
    r"""Debiased Sinkhorn divergence :math:`S(a, b) = W(a, b) - \tfrac12 W(a, a) - \tfrac12 W(b, b)`.

    W is :func:`sinkhorn` (the transport cost of the entropic plan, as in Genevay et al.). The entropic plan of
    ``(a, a)`` is not the identity, so :math:`W(a, a) > 0`; subtracting the two self terms removes that bias:
    S is exactly 0 when a == b, and S -> the exact OT cost as epsilon -> 0. a and b live on one support, so cost
    is square. For a cost :math:`|x_i - x_j|` or :math:`|x_i - x_j|^2`, S > 0 when a != b at both ends (exact OT
    as epsilon -> 0; :math:`-\tfrac12 (a-b)^\top C (a-b)`, an energy distance, as epsilon -> infinity) and in
    every case kdiv's tests try; for an arbitrary cost matrix S can be slightly negative. (Feydy et al. prove
    S >= 0 for the variant that adds the entropy term to W; kdiv keeps W = :func:`sinkhorn`.)

    Shapes: a, b [..., V] (each sums to 1); cost [V, V] or [..., V, V]; returns [...].
    Reference: Genevay, Peyré & Cuturi, "Learning Generative Models with Sinkhorn Divergences", AISTATS 2018;
    Feydy et al., "Interpolating between Optimal Transport and MMD using Sinkhorn Divergences", AISTATS 2019.
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b, cost, epsilon, max_iter, tol = _sinkhorn_args(a, b, cost, epsilon, max_iter, tol)
    # one batched run of (a, b), (a, a), (b, b): they stop together, so W(a, b) == W(a, a) bit for bit when a == b
    a3, b3 = torch.broadcast_tensors(a, b)
    lhs, rhs = torch.stack([a3, a3, b3]), torch.stack([b3, a3, b3])
    plan = _sinkhorn_log_plan(_safe_log(lhs), _safe_log(rhs), cost, epsilon, max_iter, tol, "sinkhorn_divergence").exp()
    w_ab, w_aa, w_bb = (plan * cost).sum((-2, -1)).unbind(0)
    return w_ab - 0.5 * w_aa - 0.5 * w_bb


# ---------------------------------------------------------------------------------------------------------------
# SinKD: transport between the samples of a batch
# ---------------------------------------------------------------------------------------------------------------


def sinkd(
    student_logits, teacher_logits, *, epsilon=0.1, max_iter=20, tol=0.0, temperature=1.0, mask=None, reduction="mean"
):
    r"""SinKD's batch-wise Sinkhorn loss: entropic OT between the b student and the b teacher distributions.

    The b counted tokens (all rows of the logits, or those where ``mask`` is True) are the support points. The
    cost between student sample i and teacher sample j is the L1 distance of their distributions (as the authors'
    code computes it), :math:`C_{ij} = \sum_v |q_{iv} - p_{jv}|` (in [0, 2]), and the loss is the transport
    cost of the entropic plan with uniform marginals 1/b:

    .. math:: \mathrm{SinKD} = \langle \Gamma_\varepsilon, C \rangle, \qquad
              \Gamma_\varepsilon 1 = \Gamma_\varepsilon^\top 1 = \tfrac{1}{b} 1

    from ``max_iter`` log-domain Sinkhorn iterations (each a row then a column normalisation; :func:`sinkhorn_plan`).
    Gradients flow through the cost and the iterations, as in the authors' code.

    Differences from the authors' code (which builds C with ``torch.cdist(q, p, p=1)``, normalises the rows and
    columns of :math:`e^{-C/\varepsilon}` 20 times with epsilon = 0.1 and T = 2, and multiplies by a constant
    weight): there the plan is doubly stochastic, with total mass b, so the loss grows with the batch size;
    kdiv's marginals are 1/b, giving the same plan divided by b (same iterates), so the "mean" value does not grow
    with b and a batch repeated twice gives the same loss. ``reduction="sum"`` gives b times it, the authors'
    scale. Defaults epsilon = 0.1 and 20 iterations follow that code (``tol=0``: no early stop); ``temperature``
    defaults to 1 as in every kdiv loss.

    With the teacher equal to the student the loss is *not* 0 (the entropic plan spreads mass over pairs i != j
    whose cost is > 0); for a single token (b = 1) it is :math:`\sum_v |q_v - p_v| = 2\,\mathrm{TVD}`.

    reduction: "mean" is the value above; "none" gives each counted token's share, :math:`b \sum_j
    \Gamma_{ij} C_{ij}` (their mean over counted tokens is the loss; 0 where masked); "sum" is b times the loss.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none". Cost [b, b] in memory.
    Reference: Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation", IEEE TNNLS 36(7),
    2025; first as "Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024 (arXiv
    2402.17110).
    """
    reduction = check_reduction(reduction)
    epsilon = check_positive("epsilon", epsilon)
    max_iter = check_positive_int("max_iter", max_iter)
    tol = _check_tol(tol)
    q, p, mask = _probs_from_logits(student_logits, teacher_logits, temperature, mask)
    vocab = q.shape[-1]
    q_rows, p_rows = q.reshape(-1, vocab), p.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1)
        q_rows, p_rows = q_rows[keep], p_rows[keep]
    n = q_rows.shape[0]
    if n == 0:
        # nothing counts: 0 everywhere, with a (zero) gradient path to the student
        return _reduce(q.sum(-1) * 0, mask, reduction)
    cost = torch.cdist(q_rows.unsqueeze(0), p_rows.unsqueeze(0), p=1).squeeze(0)  # [b, b]: student i, teacher j
    log_marginal = torch.full((n,), -math.log(n), dtype=q.dtype, device=q.device)
    plan = _sinkhorn_log_plan(log_marginal, log_marginal, cost, epsilon, max_iter, tol, "sinkd").exp()
    shares = n * (plan * cost).sum(-1)  # [b]
    if reduction == "none":
        rows = shares.new_zeros(q.shape[:-1])
        if mask is None:
            return shares.reshape(q.shape[:-1])
        return rows.masked_scatter(mask, shares)
    total = shares.sum()
    return total if reduction == "sum" else total / n
