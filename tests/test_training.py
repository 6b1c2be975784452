"""Training with kdiv.DistillationLoss on tiny config-built GPT-2 models: the gradient-accumulation recipe (exact)
against the naive one (off), and the snippets of the README's "Using kdiv in training", run as written."""

from __future__ import annotations

import copy
import socket

import kdiv
import pytest
import torch

pytest.importorskip("transformers")
import tiny_lm  # noqa: E402


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def accumulate(student, teacher, data, loss_fn, *, micro: int, recipe: str):
    """Backward over micro-batches of `micro` rows; the gradient of the whole batch. recipe "num_items": each
    micro-batch's sum over its tokens divided by the batch's count; "naive": the mean of the micro-batch means."""
    student.zero_grad()
    n_micro = len(data["labels"]) // micro
    n_items = (data["labels"][:, 1:] != -100).sum()
    total = 0.0
    for i in range(0, len(data["labels"]), micro):
        mb = {k: v[i : i + micro] for k, v in data.items()}
        inputs = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        if recipe == "num_items":
            loss = loss_fn(student(**inputs).logits, teacher_logits, mb["labels"], num_items_in_batch=n_items).loss
        else:
            loss = loss_fn(student(**inputs).logits, teacher_logits, mb["labels"]).loss / n_micro
        loss.backward()
        total += loss.item()
    return total, gradients(student)


@pytest.mark.parametrize("micro", [1, 2])
def test_gradient_accumulation_recipe_is_exact_and_the_naive_one_is_not(micro):
    teacher, student = tiny_lm.teacher_and_student()
    data = tiny_lm.batch(8, seed=1)
    loss_fn = kdiv.DistillationLoss("akl", kd_ratio=0.5)
    full, full_grad = accumulate(student, teacher, data, loss_fn, micro=8, recipe="naive")

    summed, grad = accumulate(student, teacher, data, loss_fn, micro=micro, recipe="num_items")
    assert summed == pytest.approx(full, rel=1e-5)
    assert ((grad - full_grad).norm() / full_grad.norm()).item() < 1e-5

    naive, naive_grad = accumulate(student, teacher, data, loss_fn, micro=micro, recipe="naive")
    loss_error = abs(naive - full) / full
    grad_error = ((naive_grad - full_grad).norm() / full_grad.norm()).item()
    print(f"micro-batches of {micro}: naive loss {loss_error:.1%} off, gradient {grad_error:.1%} off")
    # the per-token losses of random data are alike, so the loss is close; the gradient is not
    assert loss_error > 1e-4 and grad_error > 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_parallel_recipe_on_two_gloo_ranks(tmp_path):
    # Two spawned ranks (gloo on CPU), two rows each: with num_items_in_batch = the tokens of both ranks and the loss
    # times the world size, DDP's averaged gradient is the full batch's; each rank's own mean is not. A rank that
    # raises makes spawn raise here (and the 60 s process-group timeout bounds a rank left waiting).
    import ddp_worker
    from kdiv.testing.distributed import run_ranks

    # run_ranks bounds the whole run (a rank that hangs fails the test instead of stalling the suite)
    outcomes = run_ranks(ddp_worker.run_in_group, 2, str(tmp_path), timeout=120.0, collective_timeout=60.0)
    assert [status for status, _ in outcomes] == ["ok", "ok"], outcomes
    want = ddp_worker.full_batch_gradient()
    for rank in range(2):
        grads = torch.load(tmp_path / f"grad{rank}.pt")
        torch.testing.assert_close(grads["num_items"], want, rtol=1e-5, atol=1e-7)
        assert ((grads["naive"] - want).norm() / want.norm()).item() > 0.05


# ---- the README's snippets, as written there -------------------------------------------------------------------
def test_readme_plain_loop():
    teacher, student = tiny_lm.teacher_and_student()
    data = tiny_lm.batch(8)
    loader = [{k: v[i : i + 4] for k, v in data.items()} for i in (0, 4)] * 3
    losses = []
    # --- snippet: plain loop ---
    loss_fn = kdiv.DistillationLoss("akl", kd_ratio=0.5)  # 0.5 * CE on the labels + 0.5 * AKL(teacher, student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    teacher.eval()
    for batch in loader:  # input_ids, attention_mask, labels [B, L]; label -100 = the token does not count
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits  # [B, L, V]
        out = loss_fn(student(**inputs).logits, teacher_logits, batch["labels"])  # shifts by itself
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())  # out.kd, out.ce: the two terms, for logging
    # --- end ---
    assert losses[-1] < losses[0] and out.n_tokens.item() > 0


def test_readme_gradient_accumulation():
    teacher, student = tiny_lm.teacher_and_student()
    data = tiny_lm.batch(8)
    loss_fn = kdiv.DistillationLoss("akl", kd_ratio=0.5)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    reference = copy.deepcopy(student)
    # --- snippet: gradient accumulation ---
    micro_batches = [{k: v[i : i + 2] for k, v in data.items()} for i in range(0, 8, 2)]
    # the counted tokens of the whole batch, as the loss counts them (after the shift)
    n_items = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches)
    for mb in micro_batches:
        inputs = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        loss_fn(student(**inputs).logits, teacher_logits, mb["labels"], num_items_in_batch=n_items).loss.backward()
    optimizer.step()  # the same step as on the whole batch at once
    optimizer.zero_grad()
    # --- end ---
    tiny_lm.hand_written_loop(reference, teacher, data, loss_fn, steps=1, lr=0.5)
    for p, q in zip(student.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_readme_vocabulary_mismatch():
    teacher, _ = tiny_lm.teacher_and_student()
    student = tiny_lm.gpt2(1, vocab_size=104)  # the student's embedding padded to a multiple of 8
    batch = tiny_lm.batch(4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    student_logits = student(**inputs).logits
    # --- snippet: vocabulary mismatch ---
    # teacher_logits [B, L, 97], student_logits [B, L, 104]
    padded = kdiv.DistillationLoss("forward_kl", vocab="pad")  # the teacher's 7 missing ids get -inf logits
    sliced = kdiv.DistillationLoss("forward_kl", vocab="slice")  # both compared over ids 0..96 only
    padded(student_logits, teacher_logits, batch["labels"]).loss.backward()
    # --- end ---
    with pytest.raises(ValueError, match="vocab='slice'"):
        kdiv.DistillationLoss("forward_kl")(student_logits, teacher_logits, batch["labels"])
    assert (
        sliced(student_logits, teacher_logits, batch["labels"]).loss
        < padded(student_logits, teacher_logits, batch["labels"]).loss
    )
    # the student's ids the teacher lacks are pushed down
    assert (student.lm_head.weight.grad[97:] != 0).any()
