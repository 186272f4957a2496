"""Training and evaluating the reference models of every family on real data: ``python -m genkernels.models.train``.

``genkernels-train MODEL`` (or ``python -m genkernels.models.train MODEL``) trains one of vae, dcgan, pixelcnn,
realnvp, glow, ddpm, gpt and wavenet on data that ships with its packages, and writes the log, a checkpoint, the
held-out metrics and pictures of samples into ``--out``; ``torchrun --nproc-per-node N`` runs the same command
data-parallel. The modules:

* :mod:`~genkernels.models.train.cli`: the command and the training loop;
* :mod:`~genkernels.models.train.data`: the image, text and audio sets, their splits and the batch order;
* :mod:`~genkernels.models.train.families`: what each family trains on, its losses, held-out metric and samples;
* :mod:`~genkernels.models.train.checkpoint`: one-file checkpoints that resume a run exactly;
* :mod:`~genkernels.models.train.distributed`: process groups, DDP / FSDP2 wrapping, metric averaging;
* :mod:`~genkernels.models.train.pictures`: sample grids, spectrograms and the loss curve;
* :mod:`~genkernels.models.train.metrics` and :mod:`~genkernels.models.train.baselines`: held-out metrics and
  classical baselines.

Importing this package imports nothing but torch, triton and numpy: scikit-learn, matplotlib and Pillow are
imported where they are used.
"""
