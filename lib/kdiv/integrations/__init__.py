"""Framework integrations, each imported only when asked for and needing the ``train`` extra
(``pip install kdiv[train]``: transformers and TRL):

- :mod:`kdiv.integrations.hf_trainer`: ``DistillationTrainer``, a ``transformers.Trainer`` that distils a teacher
  into the student with a :class:`kdiv.DistillationLoss`; ``distillation_loss_on_batch`` for a ``compute_loss`` of
  one's own.
- :mod:`kdiv.integrations.trl`: TRL's GKD trainer with any kdiv divergence in place of ``generalized_jsd_loss``.

Importing these modules does not import transformers or TRL: the trainer classes are built on first use.
"""
