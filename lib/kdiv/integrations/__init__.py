"""Framework integrations: a ``transformers.Trainer`` and TRL trainers that take any kdiv divergence. Each is
imported only when asked for (``import kdiv.integrations.<name>``) and needs the ``distill`` extra.

Not built yet: this package is the room they will live in.
"""
