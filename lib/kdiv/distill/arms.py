"""The two arms of the lab: a synthetic language with a known distribution, and a real English corpus.

An arm supplies the tokenizer, the training examples, the evaluation prompts with their references, a fixed probe
batch (for the curves over training), the generation length, and, on the synthetic arm, the truth: the exact
next-token log-probabilities of p* at every position (:meth:`SyntheticArm.truth_logprobs`). On the real arm the
trained teacher stands in for the truth (the metrics say "vs truth" and mean "vs the teacher" there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import DistillConfig
from .data import BPETokenizer, WordTokenizer, collate_train, encode_records, format_prompt, read_jsonl
from .hmm import HiddenMarkovLanguage

__all__ = ["SyntheticArm", "RealArm", "make_arm"]


def _write_jsonl(path: Path, records) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class SyntheticArm:
    name = "synthetic"
    template = "plain"

    def __init__(self, cfg: DistillConfig, cache: Path):
        self.cfg = cfg
        self.lang = HiddenMarkovLanguage.from_config(cfg.hmm)
        self.tokenizer = WordTokenizer(self.lang.words)
        lp, lr = cfg.prompt_len, cfg.response_len
        g = torch.Generator().manual_seed(cfg.data_seed)
        seqs = self.lang.sample(cfg.n_train, lp + lr, g)
        # The training set goes through the Dolly-format writer and loader like any other data set.
        train_path = cache / "train.jsonl"
        _write_jsonl(
            train_path,
            (
                {"instruction": self.lang.render(s[:lp]), "context": "", "response": self.lang.render(s[lp:])}
                for s in seqs
            ),
        )
        self.train = encode_records(
            read_jsonl(train_path), self.tokenizer, template="plain", max_prompt_length=lp, max_length=lp + lr
        )
        self.eval_prompt_ids = self.lang.sample(cfg.n_eval, lp, g)  # [n_eval, lp]
        self.eval_refs = torch.stack([self.lang.continue_(self.eval_prompt_ids, lr, g) for _ in range(cfg.n_refs)])
        self.eval = [
            encode_records(
                [
                    {
                        "instruction": self.lang.render(p),
                        "response": self.lang.render(self.eval_refs[0, i]),
                        "references": [self.lang.render(r[i]) for r in self.eval_refs],
                    }
                ],
                self.tokenizer,
                template="plain",
                max_prompt_length=lp,
                max_length=lp + lr,
            )[0]
            for i, p in enumerate(self.eval_prompt_ids)
        ]
        probe = self.lang.sample(cfg.n_probe, lp + lr, g)
        labels = probe.clone()
        labels[:, :lp] = -100
        self.probe = (probe, torch.ones_like(probe), labels)
        self.max_new_tokens = lr
        self.eos_id, self.pad_id = None, self.tokenizer.pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def truth_logprobs(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """log p*(x_{t+1} | x_{<=t}) at every position, aligned with a causal LM's logits: [B, T] -> [B, T, V]."""
        return self.lang.next_token_probs(input_ids)[:, 1:].log().float()


class RealArm:
    name = "real"
    template = "minillm"

    def __init__(self, cfg: DistillConfig, cache: Path):
        self.cfg = cfg
        records = read_jsonl(cfg.data)
        # Split by prompt: the evaluation prompts are never seen in training (one record each: its references
        # hold every right answer); the training set keeps every record of the other prompts.
        by_prompt: dict[str, list[dict]] = {}
        for r in records:
            by_prompt.setdefault(format_prompt(r, self.template), []).append(r)
        prompts = list(by_prompt)
        g = torch.Generator().manual_seed(cfg.data_seed)
        prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=g).tolist()]
        eval_records = [by_prompt[p][0] for p in prompts[: cfg.n_eval]]
        train_records = [r for p in prompts[cfg.n_eval :] for r in by_prompt[p]][: cfg.n_train]
        tok_path = cache / "tokenizer.json"
        if tok_path.exists():
            self.tokenizer = BPETokenizer.load(tok_path)
        else:
            texts = [format_prompt(r, self.template) + r["response"] for r in train_records]
            self.tokenizer = BPETokenizer.train(texts, vocab_size=cfg.tokenizer_vocab)
            self.tokenizer.save(tok_path)
        kw = dict(template=self.template, max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
        self.train = encode_records(train_records, self.tokenizer, **kw)
        self.eval = encode_records(eval_records, self.tokenizer, **kw)
        if not self.eval or len(self.train) < cfg.batch_size:
            raise ValueError(
                f"data file {cfg.data!r}: {len(self.eval)} evaluation and {len(self.train)} training examples fit "
                f"max_prompt_length={cfg.max_prompt_length} and max_length={cfg.max_length} tokens"
            )
        self.probe = collate_train(self.eval[: cfg.n_probe], self.tokenizer.pad_id)
        self.max_new_tokens = cfg.max_new_tokens
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    truth_logprobs = None


def make_arm(cfg: DistillConfig, cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    return SyntheticArm(cfg, cache) if cfg.arm == "synthetic" else RealArm(cfg, cache)
