"""Training and evaluating the reference models of every family on real data: ``python -m genkernels.models.train``."""
