"""Top-k teachers: a teacher given as top-k token ids and log-probabilities (from an offline pass or a serving
engine), the treatments of the mass outside the k ids, and an on-disk store of a teacher's top-k.

Not built yet: this package is the room it will live in.
"""
