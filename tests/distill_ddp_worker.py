"""One rank of tests/test_distill_ddp.py: a step of the KD lab's harness (kdiv.distill.train) under
DistributedDataParallel on gloo, each rank with its share of one batch of transformers GPT-2 examples."""

from __future__ import annotations

import torch
from kdiv import DistillationLoss
from kdiv.distill.data import Example, collate_train
from kdiv.distill.models import ModelSpec, build_model
from kdiv.distill.train import _wrap, batch_loss, rank_slice

VOCAB = 50
SPEC = ModelSpec(n_layer=1, n_embd=16, n_head=2, n_positions=32)


def examples(n: int = 6) -> list[Example]:
    """n examples whose prompts and responses differ in length, so that the ranks' shares differ in tokens."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (2 + i,), generator=g).tolist()
        response = torch.randint(1, VOCAB, (3 + 2 * i,), generator=g).tolist()
        out.append(Example("", prompt, response))
    return out


def step_gradient(rank: int, world_size: int, divergence: str = "akl", recipe: str = "global"):
    """The student's gradient after one step of the harness on this rank's share of the batch (flattened, numpy).
    recipe "global": kdiv.distill.train.batch_loss; "naive": each rank's own mean, averaged by DDP."""
    teacher = build_model(SPEC, VOCAB, seed=0)
    student = build_model(SPEC, VOCAB, seed=1)
    batch = examples()
    idx = rank_slice(list(range(len(batch))), rank, world_size)
    ids, att, labels = collate_train([batch[i] for i in idx], pad_id=0)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=att).logits
    loss_fn = DistillationLoss(divergence, kd_ratio=0.5)
    ddp = _wrap(student)
    if recipe == "global":
        loss = batch_loss(ddp, loss_fn, ids, att, labels, teacher_logits).loss
    else:
        loss = loss_fn(ddp(input_ids=ids, attention_mask=att).logits, teacher_logits, labels).loss
    loss.backward()
    return torch.cat([p.grad.flatten() for p in student.parameters()]).numpy()


def both_recipes(rank: int, world_size: int, divergence: str):
    return {recipe: step_gradient(rank, world_size, divergence, recipe) for recipe in ("global", "naive")}
