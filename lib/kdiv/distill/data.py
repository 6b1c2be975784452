"""Instruction data in the Dolly / MiniLLM format, the prompt template, tokenizers and batches.

A record is a JSON object with ``instruction``, ``context`` (or MiniLLM's ``input``) and ``response`` (or
``output``); an optional ``references`` list holds every acceptable response (ROUGE-L takes the max over them; the
response itself is used when it is absent). One record per line (JSONL).

The prompt is MiniLLM's template (``TEMPLATES["minillm"]``, the Alpaca wording with and without an input); the
synthetic arm uses ``"plain"`` (the instruction alone), since its prompts are the first words of a sequence of p*.
As in MiniLLM, the loss counts only the response tokens (the prompt's labels are -100), a response ends with the
end-of-text token where the tokenizer has one, records whose prompt is longer than ``max_prompt_length`` tokens are
dropped and responses are cut to fit ``max_length`` tokens in all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "TEMPLATES",
    "Example",
    "WordTokenizer",
    "BPETokenizer",
    "read_jsonl",
    "format_prompt",
    "encode_records",
    "collate_train",
    "collate_prompts",
]

IGNORE = -100

TEMPLATES = {
    "minillm": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction} {input}", "{instruction}"),
}


def read_jsonl(path) -> list[dict]:
    """The records of a Dolly / MiniLLM JSONL file, with ``context`` and ``response`` filled from MiniLLM's
    ``input`` / ``output`` names. A ValueError names the file for a missing, unreadable or malformed one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"data file {str(path)!r} cannot be read: {err}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data file {str(path)!r}, line {n}: not JSON ({err.msg})") from None
        if not isinstance(rec, dict) or "instruction" not in rec or not ({"response", "output"} & rec.keys()):
            raise ValueError(f"data file {str(path)!r}, line {n}: a record needs 'instruction' and 'response'")
        rec = dict(rec)
        rec["context"] = rec.get("context", rec.get("input", "")) or ""
        rec["response"] = rec.get("response", rec.get("output"))
        rec.setdefault("references", [rec["response"]])
        records.append(rec)
    if not records:
        raise ValueError(f"data file {str(path)!r} holds no records")
    return records


def format_prompt(record: dict, template: str = "minillm") -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    with_input, without = TEMPLATES[template]
    ctx = record.get("context", "")
    if ctx:
        return with_input.format(instruction=record["instruction"], input=ctx)
    return without.format(instruction=record["instruction"])


class WordTokenizer:
    """One token per whitespace-separated word of a fixed vocabulary (the synthetic arm). No special tokens."""

    eos_id = None

    def __init__(self, words):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id = 0  # never counted: synthetic sequences have one length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as err:
            raise ValueError(f"word {err.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)


class BPETokenizer:
    """A byte-level BPE tokenizer of the ``tokenizers`` library with ``<|endoftext|>`` (end of a response) and
    ``<pad>``. Train with :meth:`train`, save with :meth:`save`, load with :meth:`load`."""

    EOS, PAD = "<|endoftext|>", "<pad>"

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.token_to_id(self.EOS)
        self.pad_id = tok.token_to_id(self.PAD)

    @classmethod
    def train(cls, texts, vocab_size: int = 2048):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.EOS, cls.PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path):
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.eos_id, self.pad_id)]
        return self.tok.decode(ids)


@dataclass
class Example:
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    references: list[str] = field(default_factory=list)


def encode_records(records, tokenizer, *, template="minillm", max_prompt_length=256, max_length=512):
    """Tokenise records into :class:`Example` s (see the module docstring for the limits)."""
    out = []
    for rec in records:
        prompt = format_prompt(rec, template)
        p = tokenizer.encode(prompt)
        if len(p) > max_prompt_length or len(p) >= max_length:
            continue
        r = tokenizer.encode(rec["response"])
        if tokenizer.eos_id is not None:
            r = r + [tokenizer.eos_id]
        r = r[: max_length - len(p)]
        out.append(Example(prompt, p, r, list(rec["references"])))
    return out


def collate_train(examples, pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) [B, T]; labels are -100 on the prompt and the padding."""
    t = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    att = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.response_ids)
    return ids, att, labels


def collate_prompts(examples, pad_id: int):
    """Left-padded prompts (input_ids, attention_mask) [B, T] for generation."""
    t = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.prompt_ids)
        ids[i, t - n :] = torch.tensor(e.prompt_ids)
        att[i, t - n :] = 1
    return ids, att
