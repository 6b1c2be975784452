"""The offline teacher store: round trip, streaming reads, and a clear error on a store that does not match."""

from __future__ import annotations

import json

import kdiv
import numpy as np
import pytest
import torch
from kdiv.topk import TopKStore, TopKStoreWriter

V, K = 50, 6


def _dataset(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    seqs = [torch.randint(0, V, (n_tok,), generator=g) for n_tok in lengths]
    logits = [3 * torch.randn(n_tok, V, generator=g) for n_tok in lengths]
    return seqs, logits


@pytest.fixture
def written(tmp_path):
    seqs, logits = _dataset()
    with TopKStoreWriter(tmp_path / "store", k=K, vocab_size=V, shard_tokens=20) as w:
        for ids, z in zip(seqs, logits, strict=True):
            w.add(ids, z)
    return tmp_path / "store", seqs, logits


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_round_trip(tmp_path, dtype, tol):
    seqs, logits = _dataset()
    with TopKStoreWriter(tmp_path, k=K, vocab_size=V, dtype=dtype, temperature=2.0, shard_tokens=20) as w:
        for ids, z in zip(seqs, logits, strict=True):
            w.add(ids, z)
    store = TopKStore(tmp_path, k=K, vocab_size=V)
    assert len(store) == len(seqs) and store.bytes_per_token == 6 * K and store.temperature == 2.0
    assert len(store.header["shards"]) > 1  # sequences spread over shards
    np.testing.assert_array_equal(store.lengths, [len(s) for s in seqs])
    for i, (ids, z) in enumerate(zip(seqs, logits, strict=True)):
        top = store.sequence(i, ids)
        want_lp, want_ids = torch.log_softmax(z / 2.0, -1).topk(K, -1)
        torch.testing.assert_close(top.indices, want_ids)
        # fp16 keeps log p to 11 significant bits, bf16 to 8
        torch.testing.assert_close(top.logprobs, want_lp, rtol=tol, atol=tol)
        assert top.temperature == 2.0
    # the files have the stated size: 4k + 2k bytes per token
    n_tokens = sum(len(s) for s in seqs)
    data = sum(p.stat().st_size for p in tmp_path.glob("*.bin") if p.name[0].isdigit())
    assert data == n_tokens * 6 * K


def test_batch_against_a_divergence(written):
    path, seqs, logits = written
    store = TopKStore(path)
    rows = [3, 0, 5]
    width = max(len(seqs[i]) for i in rows) + 2
    token_ids = torch.zeros(len(rows), width, dtype=torch.int64)
    for r, i in enumerate(rows):
        token_ids[r, : len(seqs[i])] = seqs[i]
    top, mask = store.batch(rows, token_ids)
    assert top.shape == (3, width) and mask.sum() == sum(len(seqs[i]) for i in rows)
    student = torch.randn(3, width, V, requires_grad=True)
    dense_teacher = torch.zeros(3, width, V)
    for r, i in enumerate(rows):
        dense_teacher[r, : len(seqs[i])] = logits[i]
    got = kdiv.reverse_kl(student, top, mask=mask)
    want = kdiv.reverse_kl(student, kdiv.topk_from_logits(dense_teacher, K), mask=mask)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    got.backward()
    assert bool(torch.isfinite(student.grad).all())


def test_wrong_sequence(written):
    path, seqs, _ = written
    store = TopKStore(path)
    other = seqs[2].clone()
    other[0] = (other[0] + 1) % V
    with pytest.raises(ValueError, match="do not match the store's sequence 2"):
        store.sequence(2, other)
    with pytest.raises(ValueError, match="tokens, the store's sequence 2"):
        store.sequence(2, torch.cat([seqs[2], seqs[2]]))
    token_ids = torch.zeros(2, 20, dtype=torch.int64)
    token_ids[0, : len(seqs[1])] = seqs[1]
    token_ids[1, : len(seqs[1])] = seqs[1]
    with pytest.raises(ValueError, match="token_ids row 1"):
        store.batch([1, 4], token_ids)
    with pytest.raises(ValueError, match="outside the store"):
        store.sequence(len(seqs))


def test_wrong_k_or_vocab(written):
    path, _, _ = written
    with pytest.raises(ValueError, match="k: the store holds k = 6"):
        TopKStore(path, k=8)
    with pytest.raises(ValueError, match="vocab_size"):
        TopKStore(path, vocab_size=V + 1)
    # a store of another vocabulary, used with this student: the TopK check names the mismatch
    top = TopKStore(path).sequence(0)
    with pytest.raises(ValueError, match="indices of teacher_logits must lie in|more than the student"):
        kdiv.forward_kl(torch.randn(top.shape[0], 5), top)


def test_truncated_or_unfinished_store(written, tmp_path):
    path, _, _ = written
    header = json.loads((path / "header.json").read_text())
    shard = path / header["shards"][1]["logprobs"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=f"shard {shard.name} of the store is truncated"):
        TopKStore(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no header.json"):
        TopKStore(tmp_path / "empty")
    (path / "hashes.bin").write_bytes(b"\0" * 8 * header["n_sequences"])
    with pytest.raises(ValueError, match="dataset_hash"):
        TopKStore(path)


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        TopKStoreWriter(tmp_path, k=4, vocab_size=V, dtype="float32")
    with pytest.raises(ValueError, match="k"):
        TopKStoreWriter(tmp_path, k=V + 1, vocab_size=V)
    w = TopKStoreWriter(tmp_path, k=4, vocab_size=V)
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        w.add(torch.arange(3), torch.randn(3, V - 1))
    with pytest.raises(ValueError, match="topk must have shape"):
        w.add(torch.arange(3), topk=kdiv.topk_from_logits(torch.randn(3, V), 5))
    w.add(torch.arange(3), torch.randn(3, V))
    w.close()
    with pytest.raises(ValueError, match="already holds a store"):
        TopKStoreWriter(tmp_path, k=4, vocab_size=V)
