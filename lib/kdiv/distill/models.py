"""Teacher and student causal LMs of ``transformers``, built from a config, and generation with them.

``ModelSpec(arch="gpt2", n_layer=2, n_embd=64, n_head=4)`` builds a GPT-2 (``arch="llama"``: a LLaMA) of that
size from scratch; ``ModelSpec(path="/models/gpt2-xl")`` loads local pretrained weights with
``AutoModelForCausalLM.from_pretrained`` instead: that is how the paper's full-size setting (GPT-2 1.5B -> GPT-2
120M on Dolly, with the GPT-2 tokenizer) is run on a GPU; it is documented, not tested here.

Generation follows MiniLLM's evaluation: sampling at temperature 1 with top-k 0 and top-p 1 (``transformers``
defaults to top-k 50, so it is set explicitly), and greedy decoding beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ModelSpec", "build_model", "check_same_vocab", "generate"]


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "gpt2"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 64
    path: str | None = None

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be 'gpt2' or 'llama', got {self.arch!r}")
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(spec: ModelSpec, vocab_size: int, *, seed: int, pad_id: int = 0, eos_id: int | None = None):
    """A causal LM with freshly initialised weights (deterministic in ``seed``), no dropout; or the pretrained
    model at ``spec.path``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if spec.path is not None:
        return AutoModelForCausalLM.from_pretrained(spec.path)
    special = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    torch.manual_seed(seed)
    if spec.arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=spec.n_positions,
            n_embd=spec.n_embd,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.n_embd,
            intermediate_size=4 * spec.n_embd,
            num_hidden_layers=spec.n_layer,
            num_attention_heads=spec.n_head,
            num_key_value_heads=spec.n_head,
            max_position_embeddings=spec.n_positions,
            **special,
        )
        model = LlamaForCausalLM(cfg)
    return model


def vocab_size_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocab(teacher_vocab: int, student_vocab: int) -> None:
    """KD compares the two distributions token by token: the vocabularies must be the same."""
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} tokens): "
            "token-level KD needs one tokenizer for both"
        )


@torch.no_grad()
def generate(model, input_ids, attention_mask, *, max_new_tokens, greedy=False, eos_id=None, pad_id=0, seed=0):
    """Responses [B, max_new_tokens] (padded with ``pad_id`` after an end-of-text token) for left-padded prompts.

    Sampling is at temperature 1, top-k 0, top-p 1 (MiniLLM's evaluation), seeded by ``seed``; ``greedy=True``
    takes the argmax. With ``eos_id=None`` every response has exactly ``max_new_tokens`` tokens.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=not greedy,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None if eos_id is not None else max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)
    model.train(was_training)
    new = out[:, input_ids.shape[1] :]
    if new.shape[1] < max_new_tokens:
        new = torch.cat([new, new.new_full((new.shape[0], max_new_tokens - new.shape[1]), pad_id)], 1)
    return new
