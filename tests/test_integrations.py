"""kdiv in transformers' Trainer and TRL's GKD trainer, end to end on tiny config-built models: a few steps each,
the loss falls and equals a hand-written loop's on the same batches; TRL's own loss as a cross-check of kdiv's JS;
the integrations stay out of ``import kdiv``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import kdiv
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")
import tiny_lm  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# TRL 1.16 calls transformers APIs that transformers 5 has renamed; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
STEPS, LR = 3, 0.5


def trainer_args(cls, tmp_path, **kwargs):
    """Arguments for a short, deterministic run: no shuffling, a constant learning rate, no clipping, fp32, one
    log line per step, nothing saved or reported."""
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    return cls(**{**settings, **kwargs})


def logged(trainer, *names):
    return [tuple(h[n] for n in names) for h in trainer.state.log_history if "loss" in h]


def check_against_hand_loop(history, reference, columns=3):
    """The trainer's per-step numbers equal the loop's, and the loss falls."""
    assert len(history) == len(reference) == STEPS
    for got, want in zip(history, reference, strict=True):
        assert got == pytest.approx(want[:columns], rel=2e-5)
    assert history[-1][0] < history[0][0]


@pytest.mark.parametrize(
    "arch, student_vocab, loss",
    [
        ("gpt2", tiny_lm.VOCAB, kdiv.DistillationLoss("akl", kd_ratio=0.5)),
        # a student whose vocabulary is padded past the teacher's, T², mostly KD
        ("llama", 104, kdiv.DistillationLoss("reverse_kl", kd_ratio=0.8, temperature=2.0, t_squared=True, vocab="pad")),
    ],
)
def test_hf_trainer_matches_a_hand_written_loop(arch, student_vocab, loss, tmp_path):
    from kdiv.integrations.hf_trainer import DistillationTrainer
    from transformers import TrainingArguments

    teacher, student = tiny_lm.teacher_and_student(arch, student_vocab=student_vocab)
    data = tiny_lm.batch(8)  # one optimizer step = the whole batch, in two micro-batches of 4
    reference = tiny_lm.hand_written_loop(copy.deepcopy(student), teacher, data, loss, steps=STEPS, lr=LR)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        loss=loss,
        args=trainer_args(TrainingArguments, tmp_path),
        train_dataset=tiny_lm.Rows(data),
        optimizers=(torch.optim.SGD(student.parameters(), lr=LR), None),
    )
    trainer.train()
    check_against_hand_loop(logged(trainer, "loss", "kd", "ce"), reference)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_readme_trainer(tmp_path):
    teacher, student = tiny_lm.teacher_and_student()
    train_dataset = tiny_lm.Rows(tiny_lm.batch(8))
    out_dir = str(tmp_path)
    # --- snippet: Trainer ---
    from kdiv.integrations.hf_trainer import DistillationTrainer
    from transformers import TrainingArguments

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,  # frozen, run in eval mode under torch.no_grad()
        loss=kdiv.DistillationLoss("akl", kd_ratio=0.5),
        args=TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=train_dataset,  # rows of input_ids, attention_mask, labels
    )
    trainer.train()  # logs loss, kd and ce
    # --- end ---
    history = logged(trainer, "loss", "kd", "ce")
    assert len(history) == 2 and all(0 < x < 20 for row in history for x in row)


def test_hf_trainer_refuses_bad_arguments(tmp_path):
    from kdiv.integrations.hf_trainer import DistillationTrainer, distillation_loss_on_batch
    from transformers import TrainingArguments

    teacher, student = tiny_lm.teacher_and_student()
    args = trainer_args(TrainingArguments, tmp_path)
    with pytest.raises(ValueError, match="teacher_model must be a torch.nn.Module"):
        DistillationTrainer(model=student, teacher_model=None, args=args)
    with pytest.raises(ValueError, match="loss must be a kdiv.DistillationLoss"):
        DistillationTrainer(model=student, teacher_model=teacher, loss=kdiv.akl, args=args)
    with pytest.raises(ValueError, match="ignore_index must be -100"):
        DistillationTrainer(model=student, teacher_model=teacher, loss=kdiv.DistillationLoss(ignore_index=0), args=args)
    with pytest.raises(ValueError, match="'labels'"):
        distillation_loss_on_batch(
            student, teacher, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, kdiv.DistillationLoss()
        )


def gkd_collate(rows):
    """The rows stacked, plus the prompt fields TRL's GKD trainer reads when it generates."""
    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    out["prompts"], out["prompt_attention_mask"] = out["input_ids"][:, :2], out["attention_mask"][:, :2]
    return out


def gkd_trainer(tmp_path, teacher, student, data, *, loss=None, **config):
    import datasets
    from kdiv.integrations.trl import GKDTrainer
    from trl.experimental.gkd import GKDConfig

    return GKDTrainer(
        model=student,
        teacher_model=teacher,
        loss=loss,
        args=trainer_args(GKDConfig, tmp_path, max_new_tokens=4, **config),
        train_dataset=datasets.Dataset.from_dict({k: v.tolist() for k, v in data.items()}).with_format("torch"),
        data_collator=gkd_collate,
        processing_class=tiny_lm.word_level_tokenizer(),
        optimizers=(torch.optim.SGD(student.parameters(), lr=LR), None),
    )


def test_trl_gkd_with_a_kdiv_divergence_matches_a_hand_written_loop(tmp_path):
    teacher, student = tiny_lm.teacher_and_student()
    data = tiny_lm.batch(8)
    loss = kdiv.DistillationLoss("akl", kd_ratio=0.5)
    reference = tiny_lm.hand_written_loop(copy.deepcopy(student), teacher, data, loss, steps=STEPS, lr=LR)
    # lmbda=0: the dataset's sequences only (on-policy samples would differ from the loop's batches)
    trainer = gkd_trainer(tmp_path, teacher, student, data, loss=loss, lmbda=0.0)
    trainer.train()
    check_against_hand_loop(logged(trainer, "loss"), reference, columns=1)


def test_readme_trl(tmp_path):
    import datasets

    teacher, student = tiny_lm.teacher_and_student()
    data = tiny_lm.batch(8)
    train_dataset = datasets.Dataset.from_dict({k: v.tolist() for k, v in data.items()}).with_format("torch")
    tokenizer, collator, out_dir = tiny_lm.word_level_tokenizer(), gkd_collate, str(tmp_path)
    # --- snippet: TRL ---
    from kdiv.integrations.trl import GKDTrainer
    from trl.experimental.gkd import GKDConfig

    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        loss=kdiv.DistillationLoss("tvd"),  # in place of TRL's generalized JSD
        args=GKDConfig(
            output_dir=out_dir,
            lmbda=0.5,
            max_new_tokens=4,
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=train_dataset,
        data_collator=collator,  # TRL's default: its ChatML collator over "messages"
        processing_class=tokenizer,
    )
    trainer.train()  # on-policy student samples (lmbda) and dataset batches, both scored by kdiv's TVD
    # --- end ---
    history = logged(trainer, "loss")
    assert len(history) == 2 and all(0 < loss < 1 for (loss,) in history)


def test_readme_trl_function():
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    class MyGKDTrainer(TRLGKDTrainer):
        pass

    # --- snippet: TRL function ---
    from kdiv.integrations.trl import generalized_jsd_loss

    MyGKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss("akl", mu=0.5))
    # --- end ---
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, :3] = -100
    want = kdiv.akl(s, t, mask=labels != -100, mu=0.5)
    torch.testing.assert_close(MyGKDTrainer.generalized_jsd_loss(s, t, labels=labels), want)


def test_trl_default_loss_is_trls_generalized_jsd(tmp_path):
    # kdiv's "js" in TRL's convention: the trainer's default loss against TRL's own generalized_jsd_loss
    from kdiv.integrations.trl import generalized_jsd_loss
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    teacher, student = tiny_lm.teacher_and_student()
    trainer = gkd_trainer(tmp_path, teacher, student, tiny_lm.batch(8), beta=0.3, lmbda=0.0)
    assert trainer.distillation_loss.hyper == {"beta": 0.3}
    s, t = torch.randn(3, 7, 97), 3 * torch.randn(3, 7, 97)
    labels = torch.randint(0, 97, (3, 7))
    labels[0, :4] = -100
    for n in (None, 40):
        want = TRLGKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.3, num_items_in_batch=n)
        got = trainer.generalized_jsd_loss(s, t, labels=labels, beta=0.3, num_items_in_batch=n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for beta in (0.0, 1.0):  # TRL's special cases: forward and reverse KL
        want = TRLGKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
        got = generalized_jsd_loss("js", beta=beta)(s, t, labels=labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        trainer.generalized_jsd_loss(s, t, labels=labels, reduction="mean")


def test_integrations_import_their_framework_only_when_asked():
    code = """
import sys
import kdiv, kdiv.integrations, kdiv.integrations.hf_trainer, kdiv.integrations.trl
print(sorted(m for m in ("transformers", "trl", "datasets", "accelerate") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    import transformers
    import trl.experimental.gkd
    from kdiv.integrations import hf_trainer
    from kdiv.integrations import trl as kdiv_trl

    assert issubclass(hf_trainer.DistillationTrainer, transformers.Trainer)
    assert issubclass(kdiv_trl.GKDTrainer, trl.experimental.gkd.GKDTrainer)
    with pytest.raises(AttributeError):
        hf_trainer.Trainer  # noqa: B018
