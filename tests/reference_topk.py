r"""Plain float64 numpy formulas for the top-k teacher's treatments of the missing mass, written a second time.

Nothing here imports kdiv. The conventions are those kdiv documents for ``kdiv.TopK`` (not its code):

- the student is dense: q = softmax(student / T) over the whole vocabulary;
- the teacher is ids S [..., k] and log-probabilities t [..., k] taken at temperature T0; its k + 1 categories are
  (p_j for j in S, p_tail = 1 - sum_S p), re-tempered to T as (categories ** (T0 / T)) / their sum;
- "tail": the divergence between the k + 1 categories of both, the student's tail being sum_{v not in S} q_v;
  AKL's head is chosen among the k ids only (the tail category never belongs to it);
- "renorm": the divergence between both restricted to S and renormalised (AKL's head by renormalised mass);
- "fkl_topk": sum_S p_j log(p_j / q_j) with the re-tempered p and the full q.

The divergences themselves are tests/reference.py's, called on log-probabilities (valid logits).
"""

from __future__ import annotations

import numpy as np
import reference


def _teacher_categories(logprobs, t0, temperature):
    p = np.exp(np.asarray(logprobs, dtype=np.float64))
    tail = np.clip(1.0 - p.sum(-1, keepdims=True), 0.0, None)
    cats = np.concatenate([p, tail], axis=-1) ** (t0 / temperature)
    return cats / cats.sum(-1, keepdims=True)


def _student(student, ids, temperature):
    q = reference.softmax_t(student, temperature)
    q_ids = np.take_along_axis(q, ids, axis=-1)
    outside = np.ones(q.shape, dtype=bool)
    np.put_along_axis(outside, ids, False, axis=-1)
    q_tail = np.where(outside, q, 0.0).sum(-1, keepdims=True)
    return q, q_ids, q_tail


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


def akl_head_weight(q_cats, p_cats, mu, tail_category):
    """AKL's head weight g_head / (g_head + g_tail) per token; with a tail category (the last one) the head is
    chosen among the first k categories by their own mass and the tail category is never in it."""
    if tail_category:
        p_ids = p_cats[..., :-1]
        head = np.concatenate([reference.head_set(p_ids, mu), np.zeros(p_ids.shape[:-1] + (1,), dtype=bool)], -1)
    else:
        head = reference.head_set(p_cats, mu)
    err = np.abs(p_cats - q_cats)
    g_head, total = (err * head).sum(-1), err.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 0.5, g_head / total)


def categories(student, ids, logprobs, *, missing="tail", temperature=1.0, t0=1.0):
    """(q_cats, p_cats): the student's and the teacher's categories of a treatment ("tail": k + 1, "renorm": k),
    or for "fkl_topk" (q at the ids, p at the ids), all float64 [..., k (+1)]."""
    ids = np.asarray(ids, dtype=np.int64)
    _, q_ids, q_tail = _student(student, ids, temperature)
    p_cats = _teacher_categories(logprobs, t0, temperature)
    if missing == "fkl_topk":
        return q_ids, p_cats[..., :-1]
    if missing == "tail":
        return np.concatenate([q_ids, q_tail], axis=-1), p_cats
    if missing == "renorm":
        p_ids = p_cats[..., :-1]
        return q_ids / q_ids.sum(-1, keepdims=True), p_ids / p_ids.sum(-1, keepdims=True)
    raise ValueError(missing)


def topk_divergence(name, student, ids, logprobs, *, missing="tail", temperature=1.0, t0=1.0, akl_weight=None, **hyper):
    """Per-token loss [...] of divergence `name` between dense student logits [..., V] and the top-k teacher.
    akl_weight: AKL's head weight [...] held at these values (its weights carry no gradient), else computed."""
    q_cats, p_cats = categories(student, ids, logprobs, missing=missing, temperature=temperature, t0=t0)
    if missing == "fkl_topk":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p_cats > 0, p_cats * (np.log(p_cats) - np.log(q_cats)), 0.0).sum(-1)
    if name == "akl":
        w = (
            akl_head_weight(q_cats, p_cats, hyper.get("mu", 0.5), missing == "tail")
            if akl_weight is None
            else akl_weight
        )
        fkl = reference.forward_kl(_log(q_cats), _log(p_cats))
        rkl = reference.reverse_kl(_log(q_cats), _log(p_cats))
        return w * fkl + (1 - w) * rkl
    return reference.DIVERGENCES[name](_log(q_cats), _log(p_cats), **hyper)


def numerical_gradient(fn, student, eps=1e-6):
    """d sum(fn(student)) / d student by central differences, for a per-token fn [..., V] -> [...] in float64
    (each token's loss depends on its own row only, so one column of every row moves at a time)."""
    student = np.asarray(student, dtype=np.float64)
    grad = np.empty_like(student)
    for v in range(student.shape[-1]):
        up, down = student.copy(), student.copy()
        up[..., v] += eps
        down[..., v] -= eps
        grad[..., v] = (fn(up) - fn(down)) / (2 * eps)
    return grad
