r"""An offline teacher store: a teacher's top-k over a tokenised dataset, written to disk once and read back,
sequence by sequence, during training.

Format (version 1): a folder holding

- ``header.json``, written last (a folder without it is an unfinished store): ``{"format": "kdiv-topk",
  "version": 1, "k", "vocab_size", "ids_dtype": "int32", "logprobs_dtype": "float16" | "bfloat16",
  "temperature" (T0 of the log-probabilities), "n_sequences", "n_tokens", "bytes_per_token", "dataset_hash",
  "shards": [{"ids", "logprobs", "first_sequence", "n_sequences", "first_token", "n_tokens"}, ...]}``;
- ``offsets.bin``: int64 little-endian [n_sequences + 1], sequence i is tokens ``offsets[i]:offsets[i+1]`` of the
  whole store (its length is the difference);
- ``hashes.bin``: uint64 little-endian [n_sequences], per sequence the first 8 bytes of BLAKE2b of its token ids
  as int32 little-endian; ``dataset_hash`` is the BLAKE2b (16 bytes, hex) of ``offsets.bin`` and ``hashes.bin``;
- per shard ``<i>.ids.bin`` int32 little-endian [n_tokens, k] and ``<i>.logprobs.bin`` [n_tokens, k] fp16 (or
  bf16 stored as its 16 bits), row-major: token t's k ids and log-probabilities at its teacher's full softmax
  at temperature T0 (``log_softmax(teacher_logits[t] / T0)``, the positions the student's logits have). A sequence
  never spans two shards; the files are plain arrays, read through numpy memmaps (only the pages a batch touches).

Bytes per token: 4k + 2k = 6k (k = 64: 384 B; k = 8: 48 B; k = 512: 3 KiB), plus 16 B per sequence.
fp16 is the better 16-bit type for log-probabilities: its 11-bit significand puts log p = -10 within 0.005 (p
within 0.5 %), where bf16 (8 bits) is 16 times coarser; its range (down to -65504, and -inf) is enough.

Reading checks the batch against the store: a sequence whose token ids do not hash to the stored ones (another
dataset, another order, another tokeniser), a k or vocabulary size the caller did not expect, and a shard file
shorter than its header says (a copy cut short) each raise a ValueError that says which.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .teacher import TopK, topk_from_logits

__all__ = ["TopKStore", "TopKStoreWriter", "sequence_hash", "FORMAT", "VERSION"]

FORMAT = "kdiv-topk"
VERSION = 1
_LOGPROB_DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.int16, torch.bfloat16)}


def sequence_hash(token_ids) -> int:
    """The store's hash of one sequence: BLAKE2b of its token ids as int32 little-endian, first 8 bytes, as an int."""
    ids = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one sequence [L], got shape {ids.shape}")
    digest = hashlib.blake2b(ids.astype("<i4").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TopKStoreWriter:
    """Writes a store (see the module docstring), one sequence at a time::

        with TopKStoreWriter(path, k=64, vocab_size=V) as w:
            for ids in dataset:                       # ids [L] int
                w.add(ids, teacher(ids[None])[0])     # teacher logits [L, V], or w.add(ids, topk=TopK(...))

    ``dtype``: "float16" (default) or "bfloat16"; ``temperature``: T0, the temperature of the log-probabilities;
    ``shard_tokens``: a new shard starts once a shard holds this many tokens.
    """

    def __init__(self, path, *, k, vocab_size, dtype="float16", temperature=1.0, shard_tokens=1 << 22):
        self.path = Path(path)
        if (self.path / "header.json").exists():
            raise ValueError(f"path {str(self.path)!r} already holds a store")
        if dtype not in _LOGPROB_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_LOGPROB_DTYPES)}, got {dtype!r}")
        for name, value in (("k", k), ("vocab_size", vocab_size), ("shard_tokens", shard_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k ({k}) must be at most vocab_size ({vocab_size})")
        self.path.mkdir(parents=True, exist_ok=True)
        self.k, self.vocab_size, self.dtype, self.shard_tokens = k, vocab_size, dtype, shard_tokens
        self.temperature = float(temperature)
        self._offsets, self._hashes, self._shards = [0], [], []
        self._files = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._files is not None:
            for f in self._files:
                f.close()

    def _open_shard(self):
        i = len(self._shards)
        names = (f"{i:05d}.ids.bin", f"{i:05d}.logprobs.bin")
        self._files = tuple(open(self.path / n, "wb") for n in names)
        self._shards.append(
            {
                "ids": names[0],
                "logprobs": names[1],
                "first_sequence": len(self._hashes),
                "n_sequences": 0,
                "first_token": self._offsets[-1],
                "n_tokens": 0,
            }
        )

    def add(self, token_ids, teacher_logits=None, *, topk: TopK | None = None):
        """Append one sequence: token ids [L] and either the teacher's logits [L, V] (its top k at temperature T0
        are taken here) or its top-k teacher ``topk`` [L, k] (log-probabilities at T0)."""
        if (teacher_logits is None) == (topk is None):
            raise ValueError("pass exactly one of teacher_logits and topk")
        if not isinstance(token_ids, torch.Tensor):
            token_ids = torch.as_tensor(np.asarray(token_ids))
        if token_ids.dim() != 1 or token_ids.is_floating_point():
            raise ValueError(f"token_ids must be an integer sequence [L], got {tuple(token_ids.shape)}")
        if teacher_logits is not None:
            if teacher_logits.shape != (token_ids.numel(), self.vocab_size):
                raise ValueError(
                    f"teacher_logits must have shape [L, vocab_size] = {(token_ids.numel(), self.vocab_size)}, got "
                    f"{tuple(teacher_logits.shape)}"
                )
            topk = topk_from_logits(teacher_logits, self.k, temperature=self.temperature)
        if topk.k != self.k or topk.shape != token_ids.shape:
            raise ValueError(f"topk must have shape [L, k] = {(token_ids.numel(), self.k)}, got {tuple(topk.shape)}")
        ids = topk.indices
        if bool(((ids < 0) | (ids >= self.vocab_size)).any()):
            raise ValueError(f"topk.indices must lie in [0, {self.vocab_size})")
        if self._files is None or self._shards[-1]["n_tokens"] >= self.shard_tokens:
            self._close_shard()
            self._open_shard()
        lp = topk.logprobs.detach().cpu().to(_LOGPROB_DTYPES[self.dtype][1])
        if self.dtype == "bfloat16":
            lp = lp.view(torch.int16)
        self._files[0].write(ids.detach().cpu().numpy().astype("<i4", copy=False).tobytes())
        self._files[1].write(lp.numpy().tobytes())
        shard = self._shards[-1]
        shard["n_sequences"] += 1
        shard["n_tokens"] += token_ids.numel()
        self._offsets.append(self._offsets[-1] + token_ids.numel())
        self._hashes.append(sequence_hash(token_ids))

    def _close_shard(self):
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None

    def close(self):
        """Write the offsets, hashes and (last) the header."""
        self._close_shard()
        offsets = np.asarray(self._offsets, dtype="<i8")
        hashes = np.asarray(self._hashes, dtype="<u8")
        (self.path / "offsets.bin").write_bytes(offsets.tobytes())
        (self.path / "hashes.bin").write_bytes(hashes.tobytes())
        header = {
            "format": FORMAT,
            "version": VERSION,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "ids_dtype": "int32",
            "logprobs_dtype": self.dtype,
            "temperature": self.temperature,
            "n_sequences": len(self._hashes),
            "n_tokens": int(offsets[-1]),
            "bytes_per_token": 6 * self.k,
            "dataset_hash": _dataset_hash(offsets, hashes),
            "offsets": "offsets.bin",
            "sequence_hashes": "hashes.bin",
            "shards": self._shards,
        }
        tmp = self.path / "header.json.tmp"
        tmp.write_text(json.dumps(header, indent=1))
        os.replace(tmp, self.path / "header.json")


def _dataset_hash(offsets, hashes) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(offsets, dtype="<i8").tobytes())
    h.update(np.asarray(hashes, dtype="<u8").tobytes())
    return h.hexdigest()


class TopKStore:
    """A store opened for reading (see the module docstring): ``store[i]`` or ``store.sequence(i, token_ids)`` is
    sequence i's :class:`TopK` [L, k]; ``store.batch(sequence_ids, token_ids)`` a padded batch and its mask.

    ``k``, ``vocab_size``: what the caller expects (a ValueError naming them if the store differs). Opening
    checks every shard's size against the header (a truncated shard is named).
    """

    def __init__(self, path, *, k=None, vocab_size=None):
        self.path = Path(path)
        head = self.path / "header.json"
        if not head.exists():
            raise ValueError(f"path {str(self.path)!r} holds no store (no header.json: not written, or not finished)")
        self.header = h = json.loads(head.read_text())
        if h.get("format") != FORMAT or h.get("version") != VERSION:
            raise ValueError(f"path {str(self.path)!r}: not a {FORMAT} store of version {VERSION}")
        self.k, self.vocab_size, self.temperature = h["k"], h["vocab_size"], h["temperature"]
        if k is not None and k != self.k:
            raise ValueError(f"k: the store holds k = {self.k} ids per token, not the k = {k} asked for")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size: the store's teacher has {self.vocab_size} tokens, not {vocab_size}")
        np_dtype, self._torch_dtype = _LOGPROB_DTYPES[h["logprobs_dtype"]]
        n = h["n_sequences"]
        self.offsets = self._array(h["offsets"], "<i8", n + 1)
        self.hashes = self._array(h["sequence_hashes"], "<u8", n)
        if _dataset_hash(self.offsets, self.hashes) != h["dataset_hash"]:
            raise ValueError(f"{h['offsets']} / {h['sequence_hashes']} do not match the header's dataset_hash")
        self.lengths = np.diff(self.offsets)
        self._shards = h["shards"]
        self._first = np.asarray([s["first_sequence"] for s in self._shards], dtype=np.int64)
        self._maps = []
        for s in self._shards:
            ids = self._memmap(s["ids"], "<i4", s["n_tokens"])
            lp = self._memmap(s["logprobs"], np_dtype, s["n_tokens"])
            self._maps.append((ids, lp))

    def _array(self, name, dtype, count):
        data = (self.path / name).read_bytes()
        if len(data) != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{name} of the store has {len(data)} bytes, the header says {count} entries")
        return np.frombuffer(data, dtype=dtype)

    def _memmap(self, name, dtype, n_tokens):
        file = self.path / name
        want = n_tokens * self.k * np.dtype(dtype).itemsize
        have = file.stat().st_size if file.exists() else 0
        if have != want:
            raise ValueError(f"shard {name} of the store is truncated or damaged: {have} bytes, the header says {want}")
        if n_tokens == 0:
            return np.zeros((0, self.k), dtype=dtype)
        return np.memmap(file, dtype=dtype, mode="r", shape=(n_tokens, self.k))

    @property
    def dataset_hash(self) -> str:
        return self.header["dataset_hash"]

    @property
    def bytes_per_token(self) -> int:
        return self.header["bytes_per_token"]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i) -> TopK:
        return self.sequence(i)

    def sequence(self, i: int, token_ids=None) -> TopK:
        """Sequence i's top-k teacher [L, k] (int64 ids, fp32 log-probabilities, temperature T0). With
        ``token_ids`` [L], checks that they are the ids the store was written for (length and hash)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise ValueError(f"sequence index {i} is outside the store's {len(self)} sequences")
        if token_ids is not None:
            self._check_sequence(i, token_ids, f"token_ids for sequence {i}")
        shard = int(np.searchsorted(self._first, i, side="right")) - 1
        start = int(self.offsets[i] - self._shards[shard]["first_token"])
        stop = start + int(self.lengths[i])
        ids, lp = self._maps[shard]
        ids = torch.from_numpy(np.array(ids[start:stop], dtype=np.int64))
        lp = torch.from_numpy(np.array(lp[start:stop])).view(self._torch_dtype).float()
        return TopK(ids, lp, temperature=self.temperature)

    def _check_sequence(self, i, token_ids, what):
        ids = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
        if ids.shape != (int(self.lengths[i]),):
            raise ValueError(
                f"{what}: {ids.shape[0] if ids.ndim == 1 else ids.shape} tokens, the store's sequence {i} has "
                f"{int(self.lengths[i])} (a different dataset or order?)"
            )
        if sequence_hash(ids) != int(self.hashes[i]):
            raise ValueError(
                f"{what} do not match the store's sequence {i} (different token ids: a different dataset, order "
                "or tokeniser)"
            )

    def batch(self, sequence_ids, token_ids, *, missing="tail") -> tuple[TopK, torch.Tensor]:
        """The top-k teacher of a padded batch: ``(TopK [B, L, k], mask [B, L])``, mask True on the stored tokens.

        ``sequence_ids`` [B]: which stored sequences; ``token_ids`` [B, L]: the batch's (right-padded) token ids,
        checked against the store: row b's first ``length(sequence_ids[b])`` ids must be that sequence. Padding
        positions hold distinct ids 0..k-1 with log-probability -inf: combine the mask with your own (labels).
        """
        token_ids = torch.as_tensor(token_ids)
        seqs = [int(s) for s in torch.as_tensor(sequence_ids).reshape(-1)]
        if token_ids.dim() != 2 or token_ids.shape[0] != len(seqs):
            raise ValueError(f"token_ids must have shape [B, L] with B = {len(seqs)}, got {tuple(token_ids.shape)}")
        b, width = token_ids.shape
        ids = torch.arange(self.k, dtype=torch.int64).expand(b, width, self.k).clone()
        lp = torch.full((b, width, self.k), -torch.inf)
        mask = torch.zeros(b, width, dtype=torch.bool)
        for row, i in enumerate(seqs):
            if not 0 <= i < len(self):
                raise ValueError(f"sequence_ids: {i} is outside the store's {len(self)} sequences")
            n = int(self.lengths[i])
            if n > width:
                raise ValueError(f"token_ids row {row}: {width} positions, the store's sequence {i} has {n} tokens")
            self._check_sequence(i, token_ids[row, :n], f"token_ids row {row}")
            top = self.sequence(i)
            ids[row, :n], lp[row, :n], mask[row, :n] = top.indices, top.logprobs, True
        return TopK(ids, lp, missing=missing, temperature=self.temperature), mask
