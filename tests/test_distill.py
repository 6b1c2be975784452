"""The KD lab's harness (kdiv.distill): exact HMM probabilities against brute force, the statistics against scipy,
the data loader, the loss module against a plain computation, resuming an interrupted sweep, and the CLI's errors.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

from kdiv import DistillationLoss  # noqa: E402
from kdiv.distill import stats  # noqa: E402
from kdiv.distill.config import DistillConfig  # noqa: E402
from kdiv.distill.data import BPETokenizer, collate_train, encode_records, format_prompt, read_jsonl  # noqa: E402
from kdiv.distill.evaluate import rouge_l  # noqa: E402
from kdiv.distill.hmm import HiddenMarkovLanguage, HMMConfig, pseudo_words  # noqa: E402
from kdiv.distill.sweep import load_results, planned_records, record_key, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "wordnet_slice.jsonl"


# ------------------------------------------------------------------------------------------------ the HMM
def _tiny_hmm():
    init = np.array([0.6, 0.4])
    trans = np.array([[0.7, 0.3], [0.2, 0.8]])
    emit = np.array([[0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    return HiddenMarkovLanguage(init, trans, emit, words=["ba", "do", "ko"]), init, trans, emit


def _brute_force_prob(x, init, trans, emit):
    """p(x) summed over every hidden path, written plainly."""
    total = 0.0
    for path in itertools.product(range(len(init)), repeat=len(x)):
        p = init[path[0]] * emit[path[0], x[0]]
        for t in range(1, len(x)):
            p *= trans[path[t - 1], path[t]] * emit[path[t], x[t]]
        total += p
    return total


def test_hmm_sequence_probabilities_match_brute_force():
    lang, init, trans, emit = _tiny_hmm()
    seqs = list(itertools.product(range(3), repeat=4))
    want = np.array([_brute_force_prob(s, init, trans, emit) for s in seqs])
    got = lang.log_prob(torch.tensor(seqs)).exp().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert abs(want.sum() - 1) < 1e-12
    # conditional: log p(x_3, x_4 | x_1, x_2)
    prefix = np.array([_brute_force_prob(s[:2], init, trans, emit) for s in seqs])
    np.testing.assert_allclose(lang.log_prob(torch.tensor(seqs), start=2).exp().numpy(), want / prefix, rtol=1e-12)


def test_hmm_next_token_distributions_match_brute_force():
    lang, init, trans, emit = _tiny_hmm()
    ctx = torch.tensor([[0, 2, 1], [2, 2, 2]])
    probs = lang.next_token_probs(ctx)  # [2, 4, 3]
    for b in range(2):
        for t in range(4):
            c = ctx[b, :t].tolist()
            base = _brute_force_prob(c, init, trans, emit) if c else 1.0
            want = [_brute_force_prob([*c, v], init, trans, emit) / base for v in range(3)]
            np.testing.assert_allclose(probs[b, t].numpy(), want, rtol=1e-12)


def test_hmm_samples_follow_its_probabilities():
    lang, init, trans, emit = _tiny_hmm()
    g = torch.Generator().manual_seed(0)
    x = lang.sample(40_000, 2, g)
    codes = (x[:, 0] * 3 + x[:, 1]).numpy()
    freq = np.bincount(codes, minlength=9) / len(codes)
    want = np.array([_brute_force_prob([a, b], init, trans, emit) for a in range(3) for b in range(3)])
    np.testing.assert_allclose(freq, want, atol=0.01)
    # continuation given a prefix: the conditional distribution of the next token
    prefix = torch.tensor([[2, 2]]).expand(20_000, -1)
    nxt = lang.continue_(prefix, 1, g)[:, 0].numpy()
    np.testing.assert_allclose(
        np.bincount(nxt, minlength=3) / len(nxt), lang.next_token_probs(prefix[:1])[0, -1], atol=0.015
    )


def test_hmm_from_config_is_a_valid_sparse_sticky_language():
    lang = HiddenMarkovLanguage.from_config(HMMConfig(n_states=6, vocab_size=40, emit_words=3, seed=3))
    assert torch.allclose(lang.trans.diagonal(), torch.full((6,), 0.55, dtype=torch.float64))
    assert ((lang.emit > 0.05).sum(-1) <= 3).all() and (lang.emit > 0).all()
    with pytest.raises(ValueError, match="emit_words"):
        HMMConfig(vocab_size=4, emit_words=5)


def test_pseudo_words_are_unchanged_by_the_rouge_stemmer():
    from rouge_score.tokenizers import DefaultTokenizer

    words = pseudo_words(192)
    assert len(set(words)) == 192
    assert DefaultTokenizer(use_stemmer=True).tokenize(" ".join(words)) == words


def test_rouge_l_is_minillms_metric():
    # max over references of the F-measure, x 100; LCS of "a b c d" and "a c d e" is 3: P = R = 3/4
    assert rouge_l("a b c d", ["x y", "a c d e"]) == pytest.approx(75.0)
    assert rouge_l("", ["a"]) == 0.0


# ------------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 30])
def test_t_distribution_matches_scipy(df):
    for t in (-3.1, -0.4, 0.0, 0.7, 2.5):
        assert stats.t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), abs=1e-12)
    assert stats.t_quantile(0.975, df) == pytest.approx(scipy.stats.t.ppf(0.975, df), rel=1e-9)


def test_mean_ci_matches_scipy():
    x = np.array([23.1, 24.0, 22.7, 23.9])
    m, lo, hi = stats.mean_ci(x)
    want = scipy.stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy.stats.sem(x))
    assert m == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(want, rel=1e-10)
    assert np.isnan(stats.mean_ci([1.0])[1])


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, size=40)
    lo, hi = stats.bootstrap_ci(x, n_boot=20_000, seed=1)
    want = scipy.stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", random_state=2)
    assert lo == pytest.approx(want.confidence_interval.low, abs=0.06)
    assert hi == pytest.approx(want.confidence_interval.high, abs=0.06)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)


def test_paired_differences_pair_by_seed():
    recs = [
        {"regime": "kd", "divergence": d, "seed": s, "metrics": {"m": base + s + off}}
        for s, base in ((0, 10.0), (1, 20.0), (2, 30.0))
        for d, off in (("forward_kl", 0.0), ("akl", 0.5 + 0.1 * s))
    ]
    (row,) = stats.paired_differences(recs, "m")
    # the seeds' spread (10 to 30) cancels: the differences are 0.5, 0.6, 0.7
    assert row["mean"] == pytest.approx(0.6) and row["real"]
    want = scipy.stats.t.interval(0.95, 2, loc=0.6, scale=scipy.stats.sem([0.5, 0.6, 0.7]))
    assert (row["t_low"], row["t_high"]) == pytest.approx(want)
    assert 0.5 - 1e-9 <= row["boot_low"] <= row["boot_high"] <= 0.7 + 1e-9


# ------------------------------------------------------------------------------------------------ data, loss
def test_read_jsonl_and_the_minillm_template(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."})
        + "\n"
        + json.dumps({"instruction": "Sum", "context": "2 and 3", "response": "5"})
        + "\n"
    )
    a, b = read_jsonl(path)
    assert a["response"] == "Blue." and a["references"] == ["Blue."] and a["context"] == ""
    assert format_prompt(a).endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:\n2 and 3\n\n### Response:\n" in format_prompt(b)
    assert format_prompt(a).startswith("Below is an instruction that describes a task. Write a response")


@pytest.mark.parametrize(
    "content, match",
    [(None, "cannot be read"), ("not json\n", "not JSON"), ('{"instruction": "x"}\n', "needs"), ("\n", "no records")],
)
def test_read_jsonl_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_jsonl(path)
    assert "bad.jsonl" in str(err.value)


def test_encoding_counts_only_response_tokens_and_applies_the_limits():
    recs = read_jsonl(SLICE)[:60]
    tok = BPETokenizer.train([format_prompt(r) + r["response"] for r in recs], vocab_size=400)
    ex = encode_records(recs, tok, max_prompt_length=200, max_length=70)
    assert ex and all(len(e.prompt_ids) + len(e.response_ids) <= 70 for e in ex)
    full = [e for e in ex if len(e.prompt_ids) + len(e.response_ids) < 70]
    assert all(e.response_ids[-1] == tok.eos_id for e in full)
    assert not encode_records(recs, tok, max_prompt_length=5, max_length=70)
    ids, att, labels = collate_train(ex[:4], tok.pad_id)
    for i, e in enumerate(ex[:4]):
        n_p, n_r = len(e.prompt_ids), len(e.response_ids)
        assert (labels[i, :n_p] == -100).all() and labels[i, n_p : n_p + n_r].tolist() == e.response_ids
        assert (labels[i, n_p + n_r :] == -100).all() and att[i].sum() == n_p + n_r


def test_loss_stand_in_is_the_documented_mix():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11, dtype=torch.float64), torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    out = DistillationLoss("forward_kl", kd_ratio=0.3)(s, t, labels)
    # plainly: shift, keep counted tokens, CE and KL(p || q) averaged over them
    ss, tt, y = s[:, :-1].reshape(-1, 11), t[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    keep = y != -100
    lq, lp = ss[keep].log_softmax(-1), tt[keep].log_softmax(-1)
    ce = -lq.gather(-1, y[keep][:, None]).mean()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert out.n_tokens == int(keep.sum())
    assert float(out.ce) == pytest.approx(float(ce)) and float(out.kd) == pytest.approx(float(kl))
    assert float(out.loss) == pytest.approx(0.7 * float(ce) + 0.3 * float(kl))
    with pytest.raises(ValueError, match="vocab"):
        DistillationLoss("akl")(s, t[..., :10], labels)


# ------------------------------------------------------------------------------------------------ sweep, CLI
def _tiny(arm="synthetic", **kw):
    base = dict(steps=4, teacher_steps=4, n_eval=4, n_probe=4, curve_points=2, seeds=(0, 1), batch_size=4)
    base.update(divergences=("forward_kl", "akl"), onpolicy_divergences=("akl",))
    if arm == "synthetic":
        base.update(n_train=64, n_refs=2, prompt_len=4, response_len=6)
    else:
        base.update(data=str(SLICE), n_train=64, tokenizer_vocab=512, max_prompt_length=64, max_new_tokens=6)
    base.update(kw)
    return DistillConfig.preset(arm, quick=True, **base)


def test_sweep_resumes_after_an_interruption_and_loses_nothing(tmp_path):
    cfg = _tiny()
    keys = planned_records(cfg)
    assert len(keys) == 2 + 2 * (1 + 2 + 2 + 1)
    run(cfg, tmp_path, progress=False, stop_after=3)
    first = load_results(tmp_path)
    assert [record_key(r) for r in first["records"]] == keys[:3]
    # a crash after a record's samples were appended but before results.json was written: orphan samples
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write(json.dumps({"arm": "synthetic", "regime": "kd", "divergence": "akl", "seed": 9, "rougeL": 0}) + "\n")
    full = run(cfg, tmp_path, progress=False)
    assert [record_key(r) for r in full["records"]] == keys
    assert full["records"][:3] == first["records"]
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {record_key(x) for x in lines} == set(keys)
    assert len(lines) == len(keys) * 2 * cfg.n_eval  # one sampled and one greedy response per prompt
    # every ROUGE-L in results.json is the mean of its samples', and recomputes from the texts
    for rec in full["records"]:
        mine = [x for x in lines if record_key(x) == record_key(rec) and x["decoding"] == "sample"]
        assert rec["metrics"]["rougeL"] == pytest.approx(
            np.mean([rouge_l(x["generation"], x["references"]) for x in mine])
        )
    # lockstep: at step 0 every student of a seed is the same model
    kd0 = [r for r in full["records"] if r["seed"] == 0 and r["curves"]]
    assert len({json.dumps(r["curves"]["fkl"][0]) for r in kd0}) == 1
    truth = next(r for r in full["records"] if r["regime"] == "truth")["metrics"]
    assert truth["fkl_data"] == pytest.approx(0, abs=1e-6) and truth["rkl_own"] == pytest.approx(0, abs=1e-6)
    # a rerun has nothing to do; another config in the same folder is refused
    assert run(cfg, tmp_path, progress=False) == full
    with pytest.raises(ValueError, match="another config"):
        run(_tiny(steps=5), tmp_path, progress=False)


def test_real_arm_runs_on_the_shipped_slice(tmp_path):
    cfg = _tiny("real", seeds=(0,), regimes=("sft", "onpolicy"))
    res = run(cfg, tmp_path, progress=False)
    assert {r["regime"] for r in res["records"]} == {"teacher", "sft", "onpolicy"}
    for r in res["records"]:
        assert all(np.isfinite(v) for v in r["metrics"].values())
    assert (tmp_path / "cache" / "tokenizer.json").exists()


def test_config_errors():
    with pytest.raises(ValueError, match="unknown divergence 'klx'"):
        DistillConfig(divergences=("forward_kl", "klx"))
    with pytest.raises(ValueError, match="regimes"):
        DistillConfig(regimes=("kd", "dpo"))
    with pytest.raises(ValueError, match="data="):
        DistillConfig(arm="real")


def test_vocab_mismatch_is_a_clear_error():
    from kdiv.distill.models import check_same_vocab

    with pytest.raises(ValueError, match="vocabularies differ"):
        check_same_vocab(512, 500)


def test_cli_entry_point_reports_a_bad_divergence(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kdiv.distill", "run", "--arm", "synthetic", "--divergences", "forward_kl,nope"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown divergence 'nope'" in out.stderr and "akl" in out.stderr


def test_cli_errors(tmp_path, capsys):
    from kdiv.distill.cli import main

    missing = tmp_path / "missing.jsonl"
    assert main(["run", "--arm", "real", "--data", str(missing), "--quick", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "cannot be read" in err
    assert main(["run", "--arm", "synthetic", "--seeds", "a,b", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--arm", "moon", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("arm", ["synthetic", "real"])
def test_committed_results_match_their_samples(arm):
    # The committed ROUGE-L of a record is the mean over its sampled responses, recomputed here with rouge_score
    # from samples.jsonl (a few records per arm, to stay fast), and every record has its samples.
    folder = ROOT / "experiments" / arm
    if not (folder / "results.json").exists():
        pytest.skip(f"no committed results for the {arm} arm")
    results = load_results(folder)
    samples: dict[tuple, list] = {}
    for line in (folder / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        samples.setdefault((*record_key(s), s["decoding"]), []).append(s)
    assert {k[:4] for k in samples} == {record_key(r) for r in results["records"]}
    for rec in results["records"][:: max(1, len(results["records"]) // 4)]:
        for decoding, metric in (("sample", "rougeL"), ("greedy", "rougeL_greedy")):
            mine = samples[(*record_key(rec), decoding)]
            got = np.mean([rouge_l(s["generation"], s["references"]) for s in mine])
            assert got == pytest.approx(rec["metrics"][metric], abs=1e-9)
