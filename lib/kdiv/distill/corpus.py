"""The real arm's corpus: definitions from Princeton WordNet 3.0, in the Dolly / MiniLLM JSONL format.

One record per (lemma, sense): ``{"instruction": "define: bank (n.)", "context": "", "response": <the sense's
gloss>, "references": [<every gloss of the lemma with that part of speech>]}``. A prompt therefore has several
right answers (the senses), as an instruction-following prompt has; ROUGE-L takes the max over them. The gloss is
the definition part of WordNet's gloss (before the first ``;``, which starts its usage examples).

WordNet's data files install offline with Debian's ``wordnet-base`` package (``apt-get install wordnet-base``:
``/usr/share/wordnet/data.noun``); the records the committed experiments use are built by ``make real-corpus``
and committed beside them with WordNet's licence (a BSD-style licence: use, copy, modify and distribute with the
copyright notice). Reference: Miller, "WordNet: A Lexical Database for English", CACM 38(11), 1995.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = ["read_wordnet", "build_wordnet_jsonl"]

_POS = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}


def read_wordnet(folder, pos: str = "noun"):
    """(lemma, definition) for every sense in WordNet's ``data.<pos>`` file, in file order."""
    path = Path(folder) / f"data.{pos}"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise ValueError(
            f"WordNet data file {str(path)!r} cannot be read ({err.strerror}); on Debian: apt-get install wordnet-base"
        ) from None
    for line in lines:
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        n_words = int(parts[3], 16)
        words = [parts[4 + 2 * i] for i in range(n_words)]
        definition = gloss.split(";")[0].strip()
        for w in words:
            lemma = w.split("(")[0].replace("_", " ").lower()
            yield lemma, definition


def build_wordnet_jsonl(folder, out, *, pos=("noun",), max_words: int = 16, max_records: int | None = 12_000, seed=0):
    """Write the records (see the module docstring) of one-word lemmas whose definitions have at most ``max_words``
    words; a random sample (``seed``) of whole lemmas up to about ``max_records`` records. Returns the count."""
    by_lemma: dict[tuple[str, str], list[str]] = {}
    for p in pos:
        if p not in _POS:
            raise ValueError(f"pos must be among {sorted(_POS)}, got {p!r}")
        for lemma, definition in read_wordnet(folder, p):
            if " " in lemma or "-" in lemma or not lemma.isalpha() or len(definition.split()) > max_words:
                continue
            senses = by_lemma.setdefault((lemma, p), [])
            if definition not in senses:
                senses.append(definition)
    keys = sorted(by_lemma)
    random.Random(seed).shuffle(keys)
    records = []
    for lemma, p in keys:
        senses = by_lemma[(lemma, p)]
        for s in senses:
            records.append(
                {"instruction": f"define: {lemma} ({_POS[p]})", "context": "", "response": s, "references": senses}
            )
        if max_records is not None and len(records) >= max_records:
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out)
    return len(records)
