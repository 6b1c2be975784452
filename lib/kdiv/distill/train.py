"""Training: the teacher's SFT, the student's SFT baseline, teacher-forced KD and on-policy KD.

Pairing: every run of one training seed starts from the same student weights (:func:`init_student`) and sees the
same batches in the same order (:func:`batch_schedule`); on-policy runs draw their samples with the same generator
seed at each step. The runs of a seed differ only in the loss, so differences between divergences are paired.

The loss is :class:`kdiv.DistillationLoss`, the module users put in their own training loops.

Data parallelism: under ``torchrun --nproc-per-node N`` (a default process group initialised, see
:func:`kdiv.distill.sweep.run`), every model is wrapped in ``DistributedDataParallel`` and each rank takes a
contiguous 1/N of every step's batch (:func:`rank_slice`). The loss is normalised by the counted tokens of the
*global* batch (``num_items_in_batch``, one all-reduce of a scalar per step) and scaled by N, since DDP averages
the ranks' gradients: each step's gradient is then that of the whole batch on one process, up to summation order
(:func:`batch_loss`; tests/test_distill_ddp.py). On-policy samples are drawn on each rank for its own prompts.
"""

from __future__ import annotations

import math

import torch

from ..core.distillation_loss import DistillationLoss
from .data import IGNORE, Example, collate_prompts, collate_train
from .evaluate import curve_point
from .models import build_model, generate

__all__ = [
    "batch_schedule",
    "batch_loss",
    "init_student",
    "lr_at",
    "rank_slice",
    "train_student",
    "train_teacher",
    "world",
]


def batch_schedule(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: epochs of random permutations of the data, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out, perm = [], []
    for _ in range(steps):
        if len(perm) < batch_size:
            perm = perm + torch.randperm(n_examples, generator=g).tolist()
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(idx: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a step's batch (sizes differ by at most one when N does not divide it)."""
    n = len(idx)
    return idx[rank * n // world_size : (rank + 1) * n // world_size]


def _wrap(model):
    """DistributedDataParallel around `model` when a process group of more than one rank is running."""
    if world()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def batch_loss(model, loss_fn, ids, att, labels, teacher_logits=None):
    """The step's loss output on this rank's rows (a DistillationLossOutput; teacher_logits None: the student's own,
    for SFT). Alone, the mean over the batch's counted tokens. With N > 1 ranks, this rank's sum over the counted
    tokens of the global batch, times N: DDP's average of the ranks' gradients is then the gradient of the global
    mean, whatever each rank's share of the tokens."""
    logits = model(input_ids=ids, attention_mask=att).logits
    teacher = logits.detach() if teacher_logits is None else teacher_logits
    _, n_ranks = world()
    if n_ranks == 1:
        return loss_fn(logits, teacher, labels)
    n_items = loss_fn.counted(labels).sum()
    torch.distributed.all_reduce(n_items)
    out = loss_fn(logits, teacher, labels, num_items_in_batch=n_items)
    return out._replace(loss=out.loss * n_ranks)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to lr / 10."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def init_student(cfg, arm, seed: int):
    return build_model(cfg.student, arm.vocab_size, seed=10_000 + seed, pad_id=arm.pad_id, eos_id=arm.eos_id)


def _optimizer(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def _step(model, opt, loss, step, steps, lr):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train_teacher(cfg, arm, progress=None):
    """The teacher, trained from scratch by SFT on the training responses (deterministic in cfg.teacher_seed)."""
    model = build_model(cfg.teacher, arm.vocab_size, seed=cfg.teacher_seed, pad_id=arm.pad_id, eos_id=arm.eos_id)
    model.train()
    ddp, (rank, n_ranks) = _wrap(model), world()
    opt = _optimizer(model, cfg.teacher_lr)
    loss_fn = DistillationLoss("forward_kl", kd_ratio=0.0)
    schedule = batch_schedule(len(arm.train), cfg.batch_size, cfg.teacher_steps, cfg.teacher_seed)
    for step, idx in enumerate(schedule):
        ids, att, labels = collate_train([arm.train[i] for i in rank_slice(idx, rank, n_ranks)], arm.pad_id)
        out = batch_loss(ddp, loss_fn, ids, att, labels)
        _step(model, opt, out.loss, step, cfg.teacher_steps, cfg.teacher_lr)
        if progress is not None:
            progress.update(1)
    model.eval()
    return model


def _curve_steps(steps: int, points: int) -> list[int]:
    return sorted({round(i * steps / (points - 1)) for i in range(points)})


def train_student(cfg, arm, *, regime, divergence, seed, teacher_fn, truth_fn, progress=None):
    """Train one student; returns (model, curves). ``teacher_fn``: (ids, att) -> teacher logits (None for SFT);
    ``truth_fn``: (ids, att) -> log-probabilities of the truth, for the curves."""
    model = init_student(cfg, arm, seed)
    model.train()
    ddp, (rank, n_ranks) = _wrap(model), world()
    opt = _optimizer(model, cfg.lr)
    if regime == "sft":
        loss_fn = DistillationLoss("forward_kl", kd_ratio=0.0)
    else:
        kd_ratio = 1.0 if regime == "onpolicy" else cfg.kd_ratio
        loss_fn = DistillationLoss(divergence, kd_ratio=kd_ratio, temperature=cfg.temperature)
    schedule = batch_schedule(len(arm.train), cfg.batch_size, cfg.steps, seed)
    at = set(_curve_steps(cfg.steps, cfg.curve_points))
    curves: dict[str, list] = {"step": []}

    def record(step):
        model.eval()
        ids, att, labels = arm.probe
        with torch.no_grad():
            s = model(input_ids=ids, attention_mask=att).logits
            t = teacher_fn(ids, att) if teacher_fn is not None else truth_fn(ids, att)
            point = curve_point(s, t, truth_fn(ids, att), labels)
        curves["step"].append(step)
        for k, v in point.items():
            curves.setdefault(k, []).append(v)
        model.train()

    for step, idx in enumerate(schedule):
        if step in at:
            record(step)
        batch = [arm.train[i] for i in rank_slice(idx, rank, n_ranks)]
        if regime == "onpolicy":
            sample_seed = 1_000_003 * (seed + 1) + step + 7919 * rank
            ids, att, labels = _on_policy_batch(model, arm, batch, seed=sample_seed)
        else:
            ids, att, labels = collate_train(batch, arm.pad_id)
        with torch.no_grad():
            teacher_logits = teacher_fn(ids, att) if teacher_fn is not None else None
        out = batch_loss(ddp, loss_fn, ids, att, labels, teacher_logits)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"{regime}/{divergence} seed {seed}: loss is {float(out.loss)} at step {step}")
        _step(model, opt, out.loss, step, cfg.steps, cfg.lr)
        if progress is not None:
            progress.update(1)
    if cfg.steps in at:
        record(cfg.steps)
    model.eval()
    return model, curves


def _on_policy_batch(model, arm, batch, seed):
    """Prompts of the batch with responses sampled from the student (temperature 1); labels on the responses."""
    ids, att = collate_prompts(batch, arm.pad_id)
    resp = generate(
        model, ids, att, max_new_tokens=arm.max_new_tokens, eos_id=arm.eos_id, pad_id=arm.pad_id, seed=seed
    ).tolist()
    examples = []
    for e, r in zip(batch, resp, strict=True):
        if arm.eos_id is not None and arm.eos_id in r:
            r = r[: r.index(arm.eos_id) + 1]
        examples.append(Example("", e.prompt_ids, r))
    ids, att, labels = collate_train(examples, arm.pad_id)
    assert (labels != IGNORE).any()
    return ids, att, labels
