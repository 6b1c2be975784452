r"""A ground-truth language p* with exact next-token distributions: a hidden Markov model rendered as words.

The synthetic arm needs a language whose true distribution is known, so that a student can be scored against the
truth itself rather than against a teacher or a finite test set. A hidden Markov model gives that for the price of
the forward algorithm:

.. math::  p^*(x_{1:T}) = \sum_{h_{1:T}} \pi_{h_1} B_{h_1 x_1} \prod_{t>1} A_{h_{t-1} h_t} B_{h_t x_t}

and the next-token distribution given any context is :math:`p^*(x_{t+1} \mid x_{\le t}) = (\alpha_t A) B` with the
filtered state posterior :math:`\alpha_t(h) = P(h_t = h \mid x_{\le t})`.

Design: *sticky* transitions (a state tends to repeat, then jumps to one of a few successors) and *sparse*
emissions (each state emits a handful of words), mixed with a small uniform floor ``eps`` so that every word has
non-zero probability everywhere (log p* stays finite, reverse KL to p* is finite). Continuations are genuinely
multimodal: after a jump the next words come from one of several disjoint sets. A student that cannot track the
hidden state (too few layers, a short window) must either spread its mass over the sets (mean-seeking) or pick one
(mode-seeking): the case where forward and reverse KL can disagree.

Tokens are rendered as pseudo-words (consonant-vowel syllables ending in ``a`` or ``o``), which the ROUGE stemmer
leaves unchanged, so that samples read like text and ROUGE-L sees one word per token.

Shapes: contexts are int tensors [B, T]; probabilities are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["HMMConfig", "HiddenMarkovLanguage", "pseudo_words"]

_CONSONANTS = "bdfgklmnprtvz"
_VOWELS = "aiou"
_LAST = "ao"  # the Porter stemmer strips no suffix ending in a consonant + a/o


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pronounceable words of 2-3 syllables, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(2, 4))
        syl = [
            _CONSONANTS[rng.integers(len(_CONSONANTS))]
            + (_VOWELS if i < k - 1 else _LAST)[rng.integers(4 if i < k - 1 else 2)]
            for i in range(k)
        ]
        w = "".join(syl)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


@dataclass(frozen=True)
class HMMConfig:
    """The ground-truth language: ``n_states`` hidden states over ``vocab_size`` words.

    stay: probability of staying in the same state; the rest goes to ``n_successors`` random successors.
    emit_words: how many words each state emits (sparse); emit_alpha: Dirichlet concentration of their weights.
    eps: mass of the uniform floor on every emission (so no word has probability 0).
    """

    n_states: int = 24
    vocab_size: int = 192
    stay: float = 0.55
    n_successors: int = 3
    emit_words: int = 6
    emit_alpha: float = 0.6
    eps: float = 0.01
    seed: int = 0

    def __post_init__(self):
        for name in ("n_states", "vocab_size", "n_successors", "emit_words"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.emit_words > self.vocab_size:
            raise ValueError(f"emit_words must be <= vocab_size ({self.vocab_size}), got {self.emit_words}")
        if self.n_successors >= self.n_states and self.n_states > 1:
            raise ValueError(f"n_successors must be < n_states ({self.n_states}), got {self.n_successors}")
        for name in ("stay", "eps"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")


class HiddenMarkovLanguage:
    """An HMM language with exact probabilities (float64). Build from an :class:`HMMConfig` or from arrays.

    ``init`` [H], ``trans`` [H, H] (rows sum to 1), ``emit`` [H, V] (rows sum to 1). ``words`` [V] renders tokens.
    """

    def __init__(self, init, trans, emit, words=None):
        self.init = torch.as_tensor(init, dtype=torch.float64)
        self.trans = torch.as_tensor(trans, dtype=torch.float64)
        self.emit = torch.as_tensor(emit, dtype=torch.float64)
        h, v = self.emit.shape
        if self.init.shape != (h,) or self.trans.shape != (h, h):
            raise ValueError(f"init must be [H] and trans [H, H] with H = emit.shape[0] = {h}")
        for name, x in (("init", self.init), ("trans", self.trans), ("emit", self.emit)):
            if (x < 0).any() or not torch.allclose(x.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-9):
                raise ValueError(f"{name} must be non-negative with rows summing to 1")
        self.words = list(words) if words is not None else pseudo_words(v)
        if len(self.words) != v:
            raise ValueError(f"words must have {v} entries, got {len(self.words)}")
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_config(cls, cfg: HMMConfig) -> HiddenMarkovLanguage:
        rng = np.random.default_rng(cfg.seed)
        h, v = cfg.n_states, cfg.vocab_size
        trans = np.zeros((h, h))
        for i in range(h):
            if h == 1:
                trans[i, i] = 1.0
                continue
            others = rng.choice([j for j in range(h) if j != i], size=cfg.n_successors, replace=False)
            trans[i, others] = (1 - cfg.stay) * rng.dirichlet(np.ones(cfg.n_successors))
            trans[i, i] = cfg.stay
        emit = np.full((h, v), cfg.eps / v)
        for i in range(h):
            support = rng.choice(v, size=cfg.emit_words, replace=False)
            emit[i, support] += (1 - cfg.eps) * rng.dirichlet(np.full(cfg.emit_words, cfg.emit_alpha))
        init = rng.dirichlet(np.ones(h))
        return cls(init, trans, emit, pseudo_words(v, seed=cfg.seed))

    @property
    def vocab_size(self) -> int:
        return self.emit.shape[1]

    @property
    def n_states(self) -> int:
        return self.emit.shape[0]

    # ---------------------------------------------------------------------------------------------------- exact
    def _filter(self, tokens: torch.Tensor):
        """Predictive state distributions before each token and the log-normalisers.

        Returns (prior [B, T+1, H], log_pred [B, T]): prior[:, t] = P(h_{t+1} | x_{<=t}) (t = 0: the initial
        distribution), log_pred[:, t] = log p*(x_{t+1} | x_{<=t}).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        prior = self.init.expand(b, -1)
        priors, log_pred = [prior], []
        emit_t = self.emit.t()  # [V, H]
        for i in range(t):
            joint = prior * emit_t[tokens[:, i]]  # [B, H]: P(h_t, x_t | x_<t)
            z = joint.sum(-1)
            log_pred.append(z.log())
            prior = (joint / z.unsqueeze(-1)) @ self.trans
            priors.append(prior)
        return torch.stack(priors, 1), (torch.stack(log_pred, 1) if t else torch.zeros(b, 0, dtype=torch.float64))

    def next_token_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """p*(x_{t+1} | x_{<=t}) for t = 0..T: [B, T] -> [B, T+1, V] (row 0 is the first token's distribution)."""
        prior, _ = self._filter(tokens)
        return prior @ self.emit

    def log_prob(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """log p*(x_{start+1:T} | x_{<=start}) per sequence: [B, T] -> [B] (exact, by the forward algorithm)."""
        _, log_pred = self._filter(tokens)
        return log_pred[:, start:].sum(-1)

    def token_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p*(x_t | x_{<t}) of every token: [B, T] -> [B, T]."""
        return self._filter(tokens)[1]

    # ---------------------------------------------------------------------------------------------------- sampling
    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` sequences of ``length`` tokens from p*: [n, length]."""
        return self.continue_(torch.zeros(n, 0, dtype=torch.long), length, generator)

    def continue_(self, prefix: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
        """Sample ``length`` more tokens from p*(. | prefix) for each row: [B, T] -> [B, length] (exact: the hidden
        state is drawn from its filtered posterior given the prefix, then the chain runs on)."""
        prior, _ = self._filter(prefix)
        state_probs = prior[:, -1]
        out = []
        for _ in range(length):
            h = torch.multinomial(state_probs, 1, generator=generator).squeeze(-1)
            x = torch.multinomial(self.emit[h], 1, generator=generator).squeeze(-1)
            out.append(x)
            state_probs = self.trans[h]
        return torch.stack(out, 1) if out else torch.zeros(prefix.shape[0], 0, dtype=torch.long)

    def entropy_rate(self, n: int = 512, length: int = 64, seed: int = 0) -> float:
        """A Monte-Carlo estimate of -E log p*(x_t | x_<t) per token (nats), over ``n`` sampled sequences."""
        g = torch.Generator().manual_seed(seed)
        x = self.sample(n, length, g)
        return float(-self.token_log_probs(x).mean())

    # ---------------------------------------------------------------------------------------------------- text
    def render(self, tokens) -> str:
        return " ".join(self.words[int(i)] for i in tokens)
