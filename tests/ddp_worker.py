"""One rank of the data-parallel test in tests/test_training.py (torch and kdiv only, so that a spawned rank starts
fast): a tiny causal LM under DistributedDataParallel on gloo, each rank with its own rows of one batch."""

from __future__ import annotations

import datetime
import os

import kdiv
import torch
import torch.distributed as dist

VOCAB, WIDTH = 31, 8


def tiny_lm(seed: int) -> torch.nn.Module:
    """Embedding -> linear: enough of a causal LM to carry gradients, built the same on every rank."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, WIDTH), torch.nn.Linear(WIDTH, VOCAB))


def data(n_rows: int = 4, length: int = 9):
    """input_ids and labels [n_rows, length]; row i has a prompt of 2 i + 1 tokens (label -100)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n_rows, length), generator=g)
    labels = ids.clone()
    for i in range(n_rows):
        labels[i, : 2 * i + 1] = -100
    return ids, labels


def full_batch_gradient():
    """The gradient of the mean loss over every counted token of the whole batch, in one process."""
    student, teacher = tiny_lm(1), tiny_lm(0)
    ids, labels = data()
    loss = kdiv.DistillationLoss("forward_kl", kd_ratio=0.5)(student(ids), teacher(ids).detach(), labels).loss
    loss.backward()
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def run(rank: int, world_size: int, port: int, out_dir: str):
    """This rank's gradient under both recipes, saved to out_dir/grad{rank}.pt, in a process group of its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        run_in_group(rank, world_size, out_dir)
    finally:
        dist.destroy_process_group()


def run_in_group(rank: int, world_size: int, out_dir: str):
    """This rank's gradient under both recipes, saved to out_dir/grad{rank}.pt as {recipe: gradient}; the default
    process group is already initialised."""
    student = torch.nn.parallel.DistributedDataParallel(tiny_lm(1))
    teacher = tiny_lm(0)
    ids, labels = data()
    ids, labels = ids[rank::world_size], labels[rank::world_size]  # this rank's rows
    loss_fn = kdiv.DistillationLoss("forward_kl", kd_ratio=0.5)
    with torch.no_grad():
        teacher_logits = teacher(ids)
    grads = {}
    for recipe in ("num_items", "naive"):
        student.zero_grad()
        if recipe == "num_items":
            # --- snippet: data parallel ---
            n_items = (labels[:, 1:] != -100).sum()  # this rank's counted tokens ...
            dist.all_reduce(n_items)  # ... and then every rank's
            # DDP averages the ranks' gradients: each rank's share of the global mean is scaled back up
            loss = loss_fn(student(ids), teacher_logits, labels, num_items_in_batch=n_items).loss * world_size
            # --- end ---
        else:  # each rank's own mean, averaged by DDP
            loss = loss_fn(student(ids), teacher_logits, labels).loss
        loss.backward()
        grads[recipe] = torch.cat([p.grad.flatten() for p in student.module.parameters()])
    torch.save(grads, os.path.join(out_dir, f"grad{rank}.pt"))
