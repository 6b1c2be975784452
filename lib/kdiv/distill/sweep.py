"""The resumable sweep: ``run(cfg, out)`` trains and evaluates every (regime, divergence, seed) of a config.

``out/results.json`` holds ``{"config": ..., "records": [...]}``: one record per (arm, regime, divergence, seed)
with every metric of :data:`kdiv.distill.evaluate.METRICS`, the curves over training and the wall time. It is
rewritten atomically (a temporary file, then ``os.replace``) after each record, once that record's samples are
appended to ``out/samples.jsonl``; a rerun drops samples that have no record (an interrupted run's) and skips every
record already there. So an interrupted sweep resumes where it stopped and loses nothing. The teacher's weights and
the arm's generated data are cached in ``out/cache/`` (not results: a clean rerun rebuilds them identically).

Records besides the students: ``regime="teacher"`` (the trained teacher) and, on the synthetic arm,
``regime="truth"`` (p* itself: the ceiling of every metric).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .arms import make_arm
from .config import DistillConfig
from .evaluate import evaluate_model
from .models import check_same_vocab, generate, vocab_size_of
from .train import train_student, train_teacher, world

__all__ = ["run", "load_results", "planned_records", "record_key"]


def record_key(rec) -> tuple:
    return (rec["arm"], rec["regime"], rec["divergence"], int(rec["seed"]))


def planned_records(cfg: DistillConfig) -> list[tuple]:
    """Every (arm, regime, divergence, seed) the config asks for, in the order they run."""
    keys = [(cfg.arm, "teacher", "none", cfg.teacher_seed)]
    if cfg.arm == "synthetic":
        keys.append((cfg.arm, "truth", "none", cfg.data_seed))
    for seed in cfg.seeds:
        if "sft" in cfg.regimes:
            keys.append((cfg.arm, "sft", "none", seed))
        for regime in ("kd", "kd_oracle", "onpolicy"):
            if regime not in cfg.regimes:
                continue
            divs = [d for d in cfg.divergences if regime != "onpolicy" or d in cfg.onpolicy_divergences]
            keys += [(cfg.arm, regime, d, seed) for d in divs]
    return keys


def load_results(path) -> dict:
    """``results.json`` of a results folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"results file {str(path)!r} cannot be read: {err}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tqdm(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _model_fns(model, arm):
    def logprobs(ids, att):
        return model(input_ids=ids, attention_mask=att).logits.float().log_softmax(-1)

    def _gen(greedy):
        def fn(examples):
            from .data import collate_prompts

            outs = []
            for i in range(0, len(examples), 64):
                ids, att = collate_prompts(examples[i : i + 64], arm.pad_id)
                outs += generate(
                    model,
                    ids,
                    att,
                    max_new_tokens=arm.max_new_tokens,
                    greedy=greedy,
                    eos_id=arm.eos_id,
                    pad_id=arm.pad_id,
                    seed=777 + i,
                ).tolist()
            return outs

        return fn

    return logprobs, _gen(False), _gen(True)


def _truth_fns(arm):
    """p* as a model: its log-probabilities, exact samples and its greedy continuation."""
    lang = arm.lang

    def sample(examples):
        g = torch.Generator().manual_seed(777)
        return lang.continue_(torch.tensor([e.prompt_ids for e in examples]), arm.max_new_tokens, g).tolist()

    def greedy(examples):
        x = torch.tensor([e.prompt_ids for e in examples])
        for _ in range(arm.max_new_tokens):
            x = torch.cat([x, lang.next_token_probs(x)[:, -1].argmax(-1, keepdim=True)], 1)
        return x[:, -arm.max_new_tokens :].tolist()

    return arm.truth_logprobs, sample, greedy


def run(cfg: DistillConfig, out, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) the sweep of ``cfg`` into folder ``out``; returns the results dict.

    ``stop_after``: finish at most this many new records, then return (tests use it to interrupt a sweep).

    Under ``torchrun`` (a default process group of N ranks) every rank trains each model on its share of every
    batch (see :mod:`kdiv.distill.train`); rank 0 alone evaluates, writes the results and shows progress.
    """
    rank, n_ranks = world()
    lead = rank == 0
    progress = progress and lead
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    results_path, samples_path, cache = out / "results.json", out / "samples.jsonl", out / "cache"
    if results_path.exists():
        results = load_results(results_path)
        old = DistillConfig.from_dict(results["config"])
        if old.shared() != cfg.shared():
            diff = sorted(k for k in cfg.shared() if cfg.shared()[k] != old.shared().get(k))
            raise ValueError(f"{str(out)!r} holds results of another config (differs in {diff}): use another --out")
    else:
        results = {"config": cfg.to_dict(), "records": []}
    # the config of the folder is the union of what its runs asked for
    merged = results["config"]
    for k in ("seeds", "divergences", "regimes", "onpolicy_divergences"):
        merged[k] = list(dict.fromkeys(list(merged[k]) + list(getattr(cfg, k))))
    done = {record_key(r) for r in results["records"]}
    # samples of a record whose results were never written (an interrupted run) are dropped
    if samples_path.exists() and lead:
        kept = [line for line in samples_path.read_text().splitlines() if line and record_key(json.loads(line)) in done]
        _write_atomic(samples_path, "".join(line + "\n" for line in kept))

    todo = [k for k in planned_records(cfg) if k not in done]
    if not todo:
        return results
    # rank 0 builds the arm first (it writes the data caches), then the others read them
    arm = make_arm(cfg, cache) if lead else None
    if n_ranks > 1:
        torch.distributed.barrier()
    if arm is None:
        arm = make_arm(cfg, cache)
    teacher = _teacher(cfg, arm, cache, progress, lead)
    check_same_vocab(vocab_size_of(teacher), arm.vocab_size)
    truth_fn = arm.truth_logprobs if arm.truth_logprobs is not None else _logits_fn(teacher, log=True)

    n_new = 0
    bar = _tqdm(len(todo), f"{cfg.arm} records", progress)
    for key in todo:
        _, regime, divergence, seed = key
        t0, c0 = time.perf_counter(), time.process_time()
        curves = None
        if regime == "teacher":
            fns = _model_fns(teacher, arm)
        elif regime == "truth":
            fns = _truth_fns(arm)
        else:
            teacher_fn = {"sft": None, "kd": _logits_fn(teacher), "onpolicy": _logits_fn(teacher)}.get(regime)
            if regime == "kd_oracle":
                teacher_fn = arm.truth_logprobs
            steps_bar = _tqdm(cfg.steps, f"{regime}/{divergence}/seed {seed}", progress)
            student, curves = train_student(
                cfg,
                arm,
                regime=regime,
                divergence=divergence,
                seed=seed,
                teacher_fn=teacher_fn,
                truth_fn=truth_fn,
                progress=steps_bar,
            )
            if steps_bar is not None:
                steps_bar.close()
            check_same_vocab(vocab_size_of(teacher), vocab_size_of(student))
            fns = _model_fns(student, arm)
        t_train = time.perf_counter() - t0
        if not lead:  # the other ranks go on to train the next model with rank 0 once it has evaluated this one
            n_new += 1
            if stop_after is not None and n_new >= stop_after:
                break
            continue
        with torch.no_grad():
            metrics, samples = evaluate_model(arm, fns[0], truth_fn, fns[1], fns[2])
        rec = {
            "arm": cfg.arm,
            "regime": regime,
            "divergence": divergence,
            "seed": seed,
            "truth": "p*" if cfg.arm == "synthetic" else "teacher",
            "metrics": metrics,
            "curves": curves,
            **({"ranks": n_ranks} if n_ranks > 1 else {}),  # data-parallel: trained on n_ranks processes
            # wall time, and CPU time of this process (what the wall time is on an idle machine with one thread)
            "seconds": {
                "train": round(t_train, 2),
                "total": round(time.perf_counter() - t0, 2),
                "cpu": round(time.process_time() - c0, 2),
            },
        }
        with open(samples_path, "a") as f:
            for s in samples:
                f.write(json.dumps({**s, "arm": cfg.arm, "regime": regime, "divergence": divergence, "seed": seed}))
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        results["records"].append(rec)
        _write_atomic(results_path, json.dumps(results, indent=1) + "\n")
        n_new += 1
        if bar is not None:
            bar.update(1)
        if stop_after is not None and n_new >= stop_after:
            break
    if bar is not None:
        bar.close()
    return results


def _logits_fn(model, log=False):
    def fn(ids, att):
        with torch.no_grad():
            z = model(input_ids=ids, attention_mask=att).logits.float()
        return z.log_softmax(-1) if log else z

    return fn


def _teacher(cfg, arm, cache: Path, progress, lead=True):
    """The trained teacher, from the cache when its config is the same."""
    from .models import build_model

    path = cache / "teacher.pt"
    tag = json.dumps(cfg.shared(), sort_keys=True)
    if path.exists():
        state = torch.load(path, weights_only=False)
        if state.get("tag") == tag:
            model = build_model(
                cfg.teacher, arm.vocab_size, seed=cfg.teacher_seed, pad_id=arm.pad_id, eos_id=arm.eos_id
            )
            model.load_state_dict(state["weights"])
            return model.eval()
    bar = _tqdm(cfg.teacher_steps, f"{cfg.arm} teacher", progress)
    model = train_teacher(cfg, arm, progress=bar)
    if bar is not None:
        bar.close()
    if lead:
        torch.save({"tag": tag, "weights": model.state_dict()}, path)
    return model
