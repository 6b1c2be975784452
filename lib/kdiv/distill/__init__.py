"""The sequence-level distillation harness (``kdiv.distill``): data in the Dolly / MiniLLM format, teacher and
student causal LMs built from ``transformers`` configs, KD with any registered divergence, generation, ROUGE-L
evaluation and the ``python -m kdiv.distill`` command line. Needs the ``distill`` extra.

Not built yet: this package is the room it will live in.
"""
