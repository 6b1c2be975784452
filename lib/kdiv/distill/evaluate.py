r"""Evaluation: ROUGE-L as MiniLLM reports it, and the token- and sequence-level metrics against the truth.

With q the student's next-token distribution and p the truth's (p* on the synthetic arm, the teacher on the real
one), over the response tokens only:

- ``fkl_data``, ``rkl_data``: mean KL(p || q) and KL(q || p) at contexts from the data (the references);
- ``fkl_own``, ``rkl_own``: the same at contexts from the student's own samples (exposure bias);
- ``head_err``, ``tail_err``: AKL's g_head and g_tail (:func:`kdiv.head_tail_error`, mu = 0.5) at data contexts;
- ``nll_truth_of_own`` (precision): :math:`-\frac1{|x|}\log p(x)` of the student's samples x ~ q, per token;
- ``nll_own_of_data`` (coverage / recall): :math:`-\frac1{|x|}\log q(x)` of references x ~ p, per token;
- ``nll_truth_of_greedy``: precision of the greedy responses;
- ``rougeL``, ``rougeL_greedy``: ``rouge_score.RougeScorer(['rougeL'], use_stemmer=True)`` F-measure, the max over
  the references, x 100, of one sampled response (temperature 1, top-k 0, top-p 1) and of the greedy one.

Every mean is over tokens (all counted tokens of all responses pooled), except ROUGE-L (mean over prompts).
"""

from __future__ import annotations

import torch

import kdiv

from .data import IGNORE, Example, collate_train

__all__ = ["rouge_l", "token_metrics", "akl_head_weight", "evaluate_model", "METRICS"]

METRICS = (
    "rougeL",
    "rougeL_greedy",
    "nll_truth_of_own",
    "nll_own_of_data",
    "nll_truth_of_greedy",
    "fkl_data",
    "rkl_data",
    "fkl_own",
    "rkl_own",
    "head_err",
    "tail_err",
)

_SCORER = None


def rouge_l(prediction: str, references) -> float:
    """MiniLLM's ROUGE-L: F-measure of ``rouge_score``'s rougeL with the Porter stemmer, max over references, x100."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _shifted(logits, labels):
    """Logits at the positions that predict a counted label: ([N, V], labels [N])."""
    lab = labels[:, 1:]
    mask = lab != IGNORE
    return logits[:, :-1][mask], lab[mask]


@torch.no_grad()
def token_metrics(student_logprobs, truth_logprobs, labels, mu: float = 0.5) -> dict:
    """Sums over counted tokens of FKL, RKL, g_head, g_tail, -log q(label), -log p(label), and the count.

    Shapes: log-probabilities [B, T, V] aligned with a causal LM's logits; labels [B, T] (-100 = not counted).
    """
    lq, y = _shifted(student_logprobs.float(), labels)
    lp, _ = _shifted(truth_logprobs.float(), labels)
    q, p = lq.exp(), lp.exp()
    g_head, g_tail = kdiv.head_tail_error(q, p, mu)
    return {
        "fkl": float((p * (lp - lq)).sum()),
        "rkl": float((q * (lq - lp)).sum()),
        "head_err": float(g_head.sum()),
        "tail_err": float(g_tail.sum()),
        "nll_q": float(-lq.gather(-1, y[:, None]).sum()),
        "nll_p": float(-lp.gather(-1, y[:, None]).sum()),
        "n": int(y.numel()),
    }


@torch.no_grad()
def akl_head_weight(student_logits, teacher_logits, labels, mu: float = 0.5) -> float:
    """Mean over counted tokens of AKL's head weight g_head / (g_head + g_tail) (1/2 where q = p)."""
    lq, _ = _shifted(student_logits.float().log_softmax(-1), labels)
    lp, _ = _shifted(teacher_logits.float().log_softmax(-1), labels)
    g_head, g_tail = kdiv.head_tail_error(lq.exp(), lp.exp(), mu)
    total = g_head + g_tail
    w = torch.where(total > 0, g_head / total.clamp_min(1e-30), 0.5)
    return float(w.mean())


def _sum_metrics(parts):
    out = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


@torch.no_grad()
def _pooled(logprob_fn, truth_fn, pairs, pad_id, chunk=64):
    """token_metrics summed over (prompt_ids, response_ids) pairs, in chunks."""
    parts = []
    for i in range(0, len(pairs), chunk):
        ex = [Example("", list(p), list(r)) for p, r in pairs[i : i + chunk]]
        ids, att, labels = collate_train(ex, pad_id)
        parts.append(token_metrics(logprob_fn(ids, att), truth_fn(ids, att), labels))
    return _sum_metrics(parts)


def _trim(ids, eos_id, pad_id):
    """A generated response up to and including its end-of-text token."""
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    if eos_id is not None:
        while ids and ids[-1] == pad_id:
            ids.pop()
    return ids


def evaluate_model(arm, logprob_fn, truth_fn, sample_fn, greedy_fn) -> tuple[dict, list[dict]]:
    """Every metric of :data:`METRICS` for one model, and its samples (one per prompt and decoding).

    logprob_fn / truth_fn: (input_ids, attention_mask) -> log-probabilities [B, T, V];
    sample_fn / greedy_fn: list[Example] -> responses [B, max_new_tokens] (token ids).
    """
    examples = arm.eval
    tok = arm.tokenizer
    own = [_trim(r, arm.eos_id, arm.pad_id) for r in sample_fn(examples)]
    greedy = [_trim(r, arm.eos_id, arm.pad_id) for r in greedy_fn(examples)]
    samples, scores = [], {"sample": [], "greedy": []}
    for decoding, responses in (("sample", own), ("greedy", greedy)):
        for e, r in zip(examples, responses, strict=True):
            text = tok.decode(r)
            score = rouge_l(text, e.references)
            scores[decoding].append(score)
            samples.append(
                {
                    "prompt": e.prompt,
                    "references": e.references,
                    "generation": text,
                    "decoding": decoding,
                    "rougeL": score,
                }
            )
    data_pairs = [(e.prompt_ids, r) for r, e in _reference_pairs(arm)]
    data = _pooled(logprob_fn, truth_fn, data_pairs, arm.pad_id)
    own_m = _pooled(logprob_fn, truth_fn, [(e.prompt_ids, r) for e, r in zip(examples, own, strict=True)], arm.pad_id)
    greedy_m = _pooled(
        logprob_fn, truth_fn, [(e.prompt_ids, r) for e, r in zip(examples, greedy, strict=True)], arm.pad_id
    )
    n = max(data["n"], 1)
    metrics = {
        "rougeL": sum(scores["sample"]) / len(scores["sample"]),
        "rougeL_greedy": sum(scores["greedy"]) / len(scores["greedy"]),
        "nll_truth_of_own": own_m["nll_p"] / max(own_m["n"], 1),
        "nll_own_of_data": data["nll_q"] / n,
        "nll_truth_of_greedy": greedy_m["nll_p"] / max(greedy_m["n"], 1),
        "fkl_data": data["fkl"] / n,
        "rkl_data": data["rkl"] / n,
        "fkl_own": own_m["fkl"] / max(own_m["n"], 1),
        "rkl_own": own_m["rkl"] / max(own_m["n"], 1),
        "head_err": data["head_err"] / n,
        "tail_err": data["tail_err"] / n,
    }
    return metrics, samples


def _reference_pairs(arm):
    """(reference token ids, example) for every tokenised reference: all n_refs samples of p* on the synthetic arm,
    the data response on the real one."""
    refs = getattr(arm, "eval_refs", None)
    if refs is not None:
        return [(refs[k, i].tolist(), e) for k in range(refs.shape[0]) for i, e in enumerate(arm.eval)]
    return [(e.response_ids, e) for e in arm.eval]


@torch.no_grad()
def curve_point(student_logits, teacher_logits, truth_logprobs, labels) -> dict:
    """One point of the curves over training, on the probe batch: FKL, RKL, g_head, g_tail against the truth and
    AKL's head weight against the KD teacher (means over counted tokens)."""
    m = token_metrics(student_logits.float().log_softmax(-1), truth_logprobs, labels)
    n = max(m["n"], 1)
    point = {k: m[k] / n for k in ("fkl", "rkl", "head_err", "tail_err")}
    point["akl_head_weight"] = akl_head_weight(student_logits, teacher_logits, labels)
    return point
