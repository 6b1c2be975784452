"""The configuration of a distillation sweep: one frozen dataclass, recorded in full in ``results.json``.

``DistillConfig.preset(arm, quick=False)`` gives the committed experiments' settings (``quick=True``: the same
pipeline at toy sizes, for ``make test``). Regimes:

- ``sft``: the student trained on the data responses with cross-entropy only (the baseline);
- ``kd``: teacher-forced KD on the data responses, loss (1 - kd_ratio) CE + kd_ratio D(teacher, student), as in
  MiniLLM's KD baseline and the AKL paper;
- ``onpolicy``: KD on the student's own sampled responses (GKD with lambda = 1: every batch on-policy);
- ``kd_oracle`` (synthetic arm only): teacher-forced KD whose teacher is the true distribution p* itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

import kdiv

from .hmm import HMMConfig
from .models import ModelSpec

__all__ = ["DistillConfig", "REGIMES", "ARMS"]

ARMS = ("synthetic", "real")
REGIMES = ("sft", "kd", "kd_oracle", "onpolicy")
ALL_DIVERGENCES = tuple(kdiv.TOKEN_LEVEL)
ONPOLICY_DEFAULT = ("forward_kl", "reverse_kl", "js", "akl")
QUICK_DIVERGENCES = ("forward_kl", "reverse_kl", "akl")


def _divergence_names(names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    bad = [d for d in names if d not in kdiv.SPECS]
    if bad:
        raise ValueError(f"unknown divergence {bad[0]!r}: choose from {', '.join(sorted(kdiv.SPECS))}")
    return tuple(names)


@dataclass(frozen=True)
class DistillConfig:
    arm: str = "synthetic"
    divergences: tuple[str, ...] = ALL_DIVERGENCES
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = ("sft", "kd", "kd_oracle", "onpolicy")
    onpolicy_divergences: tuple[str, ...] = ONPOLICY_DEFAULT
    # models
    teacher: ModelSpec = ModelSpec(n_layer=2, n_embd=64, n_head=4, n_positions=32)
    student: ModelSpec = ModelSpec(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    # training
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    kd_ratio: float = 0.5
    temperature: float = 1.0
    teacher_steps: int = 1500
    teacher_lr: float = 3e-3
    # evaluation
    n_eval: int = 128
    n_refs: int = 4
    curve_points: int = 7
    n_probe: int = 64
    # synthetic arm
    hmm: HMMConfig = HMMConfig()
    prompt_len: int = 8
    response_len: int = 16
    n_train: int = 8192
    # real arm
    data: str | None = None
    tokenizer_vocab: int = 1024
    max_prompt_length: int = 48
    max_length: int = 88
    max_new_tokens: int = 32
    # seeds of what every training seed shares, and threads (results depend on the thread count)
    data_seed: int = 1234
    teacher_seed: int = 4321
    threads: int = 1
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        object.__setattr__(self, "divergences", _divergence_names(self.divergences))
        object.__setattr__(self, "onpolicy_divergences", _divergence_names(self.onpolicy_divergences))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds!r}")
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad:
            raise ValueError(f"regimes must be among {REGIMES}, got {bad!r}")
        if self.arm == "real" and "kd_oracle" in self.regimes:
            object.__setattr__(self, "regimes", tuple(r for r in self.regimes if r != "kd_oracle"))
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio!r}")
        if self.arm == "real" and not self.data:
            raise ValueError("the real arm needs data= (a Dolly-format JSONL file)")

    @classmethod
    def preset(cls, arm: str, *, quick: bool = False, **overrides) -> DistillConfig:
        if arm == "synthetic":
            base = dict(arm=arm)
            if quick:
                base.update(
                    steps=30,
                    teacher_steps=60,
                    n_eval=16,
                    n_refs=2,
                    n_probe=16,
                    n_train=512,
                    curve_points=3,
                    seeds=(0, 1),
                    batch_size=16,
                    divergences=QUICK_DIVERGENCES,
                    onpolicy_divergences=QUICK_DIVERGENCES,
                )
        elif arm == "real":
            base = dict(
                arm=arm,
                data="experiments/real/data/wordnet_nouns.jsonl",
                teacher=ModelSpec(n_layer=2, n_embd=64, n_head=4, n_positions=96),
                student=ModelSpec(n_layer=1, n_embd=32, n_head=2, n_positions=96),
                steps=240,
                teacher_steps=1200,
                n_eval=96,
                n_train=6000,
            )
            if quick:
                base.update(
                    data="tests/data/wordnet_slice.jsonl",
                    steps=20,
                    teacher_steps=40,
                    n_eval=8,
                    n_probe=8,
                    n_train=400,
                    curve_points=3,
                    seeds=(0, 1),
                    batch_size=8,
                    divergences=QUICK_DIVERGENCES,
                    onpolicy_divergences=QUICK_DIVERGENCES,
                    tokenizer_vocab=512,
                    max_prompt_length=64,
                    max_new_tokens=24,
                )
        else:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        base["quick"] = quick
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        d = dict(d)
        d["teacher"], d["student"], d["hmm"] = (
            ModelSpec(**d["teacher"]),
            ModelSpec(**d["student"]),
            HMMConfig(**d["hmm"]),
        )
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    def shared(self) -> dict:
        """Everything that every record of a results folder must agree on (all but which seeds, divergences and
        regimes are run): a rerun with another value here needs another folder."""
        d = self.to_dict()
        for k in ("seeds", "divergences", "regimes", "onpolicy_divergences"):
            d.pop(k)
        return json.loads(json.dumps(d))

    def with_(self, **kw) -> DistillConfig:
        return replace(self, **kw)
