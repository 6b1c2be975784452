"""Tiny causal LMs built from configs (nothing is downloaded) and a batch of prompt + completion sequences, for the
training and integration tests."""

from __future__ import annotations

import torch

VOCAB = 97
LENGTH = 12


def gpt2(seed: int, *, vocab_size: int = VOCAB, n_embd: int = 32, initializer_range: float = 0.02):
    """A 2-layer GPT-2 without dropout (so that two runs of one batch agree), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=initializer_range,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return GPT2LMHeadModel(config)


def llama(seed: int, *, vocab_size: int = VOCAB, hidden_size: int = 32):
    """A 2-layer Llama, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


def teacher_and_student(arch: str = "gpt2", *, teacher_vocab: int = VOCAB, student_vocab: int = VOCAB):
    """(teacher, student): the teacher wider and with larger initial weights (a peaked, non-uniform target)."""
    if arch == "gpt2":
        return gpt2(0, vocab_size=teacher_vocab, n_embd=48, initializer_range=0.3), gpt2(1, vocab_size=student_vocab)
    return llama(0, vocab_size=teacher_vocab, hidden_size=48), llama(1, vocab_size=student_vocab)


def batch(n: int = 8, *, seed: int = 0, length: int = LENGTH, vocab: int = VOCAB) -> dict:
    """input_ids, attention_mask, labels [n, length]: a prompt of 2 to 5 tokens (label -100), a completion, and
    right padding (id 2, label -100) of 0 to 6 tokens: every row counts a different number of tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (n, length), generator=g)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    labels = input_ids.clone()
    prompt = torch.randint(2, 6, (n,), generator=g)
    padding = torch.randint(0, 7, (n,), generator=g)
    for i in range(n):
        labels[i, : prompt[i]] = -100
        if padding[i]:
            input_ids[i, -padding[i] :] = 2
            attention_mask[i, -padding[i] :] = 0
            labels[i, -padding[i] :] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Rows(torch.utils.data.Dataset):
    """The rows of a batch as a dataset of dicts (what a Trainer's default collator stacks back)."""

    def __init__(self, data: dict):
        self.data = data

    def __len__(self):
        return len(next(iter(self.data.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def hand_written_loop(student, teacher, data: dict, loss_fn, *, steps: int, lr: float) -> list[tuple[float, ...]]:
    """SGD on the whole batch, one step at a time: (loss, kd, ce) before each step. The reference the trainers'
    logged numbers are checked against."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    model_inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    teacher.eval()
    history = []
    for _ in range(steps):
        with torch.no_grad():
            teacher_logits = teacher(**model_inputs).logits
        out = loss_fn(student(**model_inputs).logits, teacher_logits, data["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((out.loss.item(), out.kd.item(), out.ce.item()))
    return history


def word_level_tokenizer(vocab_size: int = VOCAB):
    """A tokenizer built in memory (one word per id), for trainers that insist on a processing class."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
