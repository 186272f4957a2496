"""``genkernels-train MODEL`` / ``python -m genkernels.models.train MODEL``: train one family end to end.

A run reads its data (:mod:`~genkernels.models.train.data`; nothing is downloaded), trains with Adam (the
family's variant) at a learning rate that follows ``--warmup-steps`` and ``--lr-schedule`` (:func:`learning_rate`;
by default constant for every family but gpt), shows a progress bar (loss, items/s), and writes into ``--out``:

* ``log.jsonl``: one JSON object per logging step: ``step``, ``loss`` (the mean since the previous record, averaged
  over the processes; GANs add ``generator_loss``), ``items_per_s`` (training items of all processes per second),
  ``lr`` (the learning rate of the record's last step, :func:`learning_rate`) and ``time`` (seconds of training so
  far, resumed runs included);
* ``checkpoint.pt`` (:mod:`~genkernels.models.train.checkpoint`) every ``--checkpoint-every`` steps and at the end;
* ``metrics.json``: the held-out score in the family's natural unit (bits per dim, per character or per sample),
  beside classical baselines fitted and scored on the same split and the quality of image samples
  (:mod:`~genkernels.models.train.evaluation`);
* ``samples.png`` (``samples.txt`` for gpt; ``sample_*.wav`` and ``spectrogram.png`` for wavenet) and ``loss.png``;
  the vae adds ``interpolations.png`` (latent interpolations) and ``reconstructions.png``, dcgan
  ``truncation.png`` (one set of latents at several truncations), realnvp and glow ``temperatures.png`` (one set
  of latents at several temperatures), pixelcnn ``completions.png`` (held-out top halves completed), ddpm
  ``guidance.png`` (classifier-free guidance scales by class), ``inpainting.png`` and ``image_to_image.png``.

On a CPU device each process runs one thread unless ``--threads`` says otherwise: the models are small, and on a
machine whose cores other work shares, multi-threaded ops spend most of their time waiting for each other.

Under ``torchrun --nproc-per-node N`` the same command trains data-parallel (:mod:`~genkernels.models.train
.distributed`). ``--amp`` runs the losses under bf16 autocast on a CUDA device; on a CPU it is an error (bf16
autocast on CPUs is slow and not what the option is for), so a run never silently trains in another precision.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from genkernels.kernels.runtime import IMPLS, use_impl

from . import checkpoint, distributed, evaluation, pictures
from .data import BatchOrder, DataError
from .families import FAMILIES, Family, RunSettings, ema_model

QUICK_BATCH_SIZE = 16
DEFAULT_CHECKPOINT_EVERY = 500
LR_SCHEDULES = ("constant", "cosine")
FINAL_LR_FRACTION = 0.1  # where the cosine schedule ends, as a fraction of --lr


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def learning_rate(step: int, steps: int, lr: float, schedule: str, warmup: int) -> float:
    """The learning rate of training step ``step`` (0-based) of ``steps``: the linear warmup ``lr (step + 1) /
    warmup`` over the first ``warmup`` steps, then ``lr`` (``schedule="constant"``) or the cosine decay
    ``lr (f + (1 - f) (1 + cos(pi p)) / 2)`` with ``p = (step - warmup) / (steps - warmup)`` (``"cosine"``:
    from ``lr`` at the end of the warmup towards ``f lr`` at the end, ``f`` = :data:`FINAL_LR_FRACTION`). A
    function of its arguments alone, so a resumed run with the same ``--steps`` follows the schedule of the run
    that never stopped."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * (1 + math.cos(math.pi * progress)) / 2)


def build_parser(family: Optional[Family] = None) -> argparse.ArgumentParser:
    """The command's parser; with ``family``, that family's model-size options too."""
    parser = argparse.ArgumentParser(
        prog="genkernels-train", description="Train a genkernels reference model on data that ships with its "
                                             "packages (or on your own with --data).")
    parser.add_argument("model", choices=list(FAMILIES), help="the family to train")
    parser.add_argument("--data", default=None, help="images: a folder of PNG/JPEG files or an .npy array; gpt: "
                                                     "a UTF-8 text file; wavenet: a folder of 8 kHz mono WAV files")
    steps, batch, lr = ((f"{family.steps}; --quick {family.quick_steps}",
                         f"{family.batch_size}; --quick {min(family.batch_size, QUICK_BATCH_SIZE)}", f"{family.lr:g}")
                        if family is not None else ("the family's",) * 3)
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"global batch size, over all processes (default {batch})")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {lr})")
    schedule, warmup = ((family.lr_schedule, f"{family.warmup_steps}; --quick 0") if family is not None
                        else ("the family's",) * 2)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                        help=f"constant: --lr throughout; cosine: from --lr down to {FINAL_LR_FRACTION:g} of it at "
                             f"the last step (default {schedule})")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help=f"steps of linear learning-rate warmup from 0 before the schedule (default {warmup})")
    parser.add_argument("--out", default=None, help="output folder (default: runs/MODEL)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    parser.add_argument("--impl", choices=IMPLS, default="auto", help="genkernels' op implementation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the noise and the batch order")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (few steps, small samples)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default 1 on a CPU device: these models are small, and on a "
                             "shared machine multi-threaded ops stall; on CUDA devices torch's default)")
    parser.add_argument("--log-every", type=int, default=None, help="steps per log record (default 10; quick 1)")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                        help="steps between checkpoints (one is always written at the end)")
    if family is not None:
        group = parser.add_argument_group(f"{family.name} options")
        for option in family.options:
            quick = f", --quick {option.quick}" if option.quick is not None else ""
            group.add_argument(_flag(option.name), type=type(option.default), default=None,
                               choices=option.choices or None, help=f"{option.help} (default {option.default}{quick})")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Family, argparse.Namespace]:
    """The family named by the first argument and every option (an unknown name lists the valid ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the family's options (and its --help) need the family first: the first argument that names one
    named = next((FAMILIES[arg] for arg in argv if arg in FAMILIES), None)
    args = build_parser(named).parse_args(argv)
    return FAMILIES[args.model], args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: train, print the held-out metrics, return the exit status (errors in the data, the
    options or a checkpoint print one line and return 2)."""
    family, args = parse_args(argv)
    try:
        metrics = train(family, args)
    except (DataError, checkpoint.CheckpointError, ValueError) as error:
        print(f"genkernels-train: error: {error}", file=sys.stderr)
        return 2
    if metrics is not None:
        print(json.dumps(metrics))
    return 0


def train(family: Family, args: argparse.Namespace) -> Optional[dict]:
    """Run the training that ``args`` describes (see the module doc); returns the metrics on rank 0."""
    context = distributed.start(args.device)
    try:
        return _Run(family, args, context).run()
    finally:
        distributed.stop(context)


class _Run:
    """One training run's state, built before the first step (every check happens here, before any work)."""

    def __init__(self, family: Family, args: argparse.Namespace, context: distributed.Context):
        self.family, self.args, self.context = family, args, context
        self._check_args()
        self.config = {option.name: (getattr(args, option.name) if getattr(args, option.name) is not None
                                     else option.value(args.quick)) for option in family.options}
        self.config["seed"] = args.seed
        self.steps = args.steps if args.steps is not None else (family.quick_steps if args.quick else family.steps)
        default_batch = min(family.batch_size, QUICK_BATCH_SIZE) if args.quick else family.batch_size
        self.batch_size = args.batch_size if args.batch_size is not None else default_batch
        self.lr = args.lr if args.lr is not None else family.lr
        self.lr_schedule = args.lr_schedule if args.lr_schedule is not None else family.lr_schedule
        default_warmup = 0 if args.quick else family.warmup_steps
        self.warmup_steps = args.warmup_steps if args.warmup_steps is not None else default_warmup
        self.log_every = args.log_every if args.log_every is not None else (1 if args.quick else 10)
        self.out = Path(args.out if args.out is not None else Path("runs") / family.name)
        self.settings = RunSettings(args.data, args.quick, self.out, context.device)
        if args.threads is not None or context.device.type == "cpu":
            torch.set_num_threads(args.threads if args.threads is not None else 1)
        _seed_everything(args.seed)
        self.train_data, self.test_data = family.load_data(self.settings, self.config)
        self.order = BatchOrder(len(self.train_data), self.batch_size, args.seed, context.rank, context.world_size)
        trained = {option.name for option in family.options if option.training} | {"seed"}
        self.checkpoint_config = {"model": {name: value for name, value in self.config.items() if name in trained},
                                  "data": family.describe_data(self.train_data), "batch_size": self.batch_size}

    def _check_args(self) -> None:
        args, family = self.args, self.family
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"{_flag(name)} {value} must be >= 1")
        if args.lr is not None and not args.lr > 0:
            raise ValueError(f"--lr {args.lr} must be > 0")
        if args.warmup_steps is not None and args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps {args.warmup_steps} must be >= 0")
        if args.amp and self.context.device.type != "cuda":
            raise ValueError(f"--amp (bf16 autocast) needs a CUDA device; this run is on {self.context.device}")
        if args.fsdp and not family.supports_fsdp:
            raise ValueError(f"--fsdp: {family.fsdp_refusal}")

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        family, context, device = self.family, self.context, self.context.device
        with use_impl(self.args.impl):
            model = family.build(self.config, self.train_data).to(device)
            generator = torch.Generator(device).manual_seed(self.args.seed * 65536 + context.rank)
            payload = self._load_checkpoint() if self.args.resume else None
            if payload is None:
                first = BatchOrder(len(self.train_data), self.batch_size, self.args.seed).indices(0)
                family.prepare(model, self.train_data.batch(first).to(device), self.train_data, generator)
            else:
                model.load_state_dict(payload["model"])
            ema = ema_model(model, self.config["ema_decay"]) if family.uses_ema() else None
            objectives = [(name, distributed.wrap(objective, context, self.args.fsdp))
                          for name, objective in family.objectives(model, self.train_data)]
            optimizers = {name: family.adam(name, objective.parameters(), self.lr) for name, objective in objectives}
            start_step, elapsed = 0, 0.0
            if payload is not None:
                start_step, elapsed = self._restore(payload, objectives, optimizers, ema, generator)
            self._train(model, objectives, optimizers, ema, generator, start_step, elapsed)
            final_state = distributed.full_state_dict(ema.module if ema is not None else model)
            metrics = self._finish(final_state) if context.is_main else None
        distributed.barrier(context)
        return metrics

    def _load_checkpoint(self) -> dict:
        payload = checkpoint.load(self.out / checkpoint.FILE_NAME, self.family.name, self.checkpoint_config)
        if len(payload["rng"]["generators"]) != self.context.world_size:
            raise checkpoint.CheckpointError(
                f"{self.out / checkpoint.FILE_NAME} was written by {len(payload['rng']['generators'])} process(es); "
                f"resume it with as many (this run has {self.context.world_size})")
        if payload["step"] >= self.steps:
            raise checkpoint.CheckpointError(f"{self.out / checkpoint.FILE_NAME} is at step {payload['step']}; "
                                             f"pass --steps above it to continue (got {self.steps})")
        return payload

    def _restore(self, payload, objectives, optimizers, ema, generator) -> tuple[int, float]:
        for name, objective in objectives:
            distributed.load_full_optimizer_state(objective, optimizers[name], payload["optimizers"][name],
                                                  self.context)
        if ema is not None:
            ema.load_state_dict(payload["ema"])
        checkpoint.restore_rng_state(payload["rng"]["global"][self.context.rank])
        checkpoint.restore_generator(generator, payload["rng"]["generators"][self.context.rank])
        return payload["step"], payload["elapsed"]

    def _save_checkpoint(self, model, objectives, optimizers, ema, generator, step: int, elapsed: float) -> None:
        context = self.context
        model_state = distributed.full_state_dict(model)
        optimizer_states = {name: distributed.full_optimizer_state(objective, optimizers[name], context)
                            for name, objective in objectives}
        global_states = distributed.gather(checkpoint.rng_state(), context)
        generators = distributed.gather(checkpoint.generator_state(generator), context)
        if context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.save(self.out / checkpoint.FILE_NAME, {
                "family": self.family.name, "config": self.checkpoint_config, "step": step, "elapsed": elapsed,
                "model": model_state, "optimizers": optimizer_states,
                "ema": None if ema is None else ema.state_dict(),
                "rng": {"global": global_states, "generators": generators}, "data_order": self.order.state()})
        distributed.barrier(context)

    # ------------------------------------------------------------------------------------------------------------
    def _train(self, model, objectives, optimizers, ema, generator, start_step: int, elapsed: float) -> None:
        from tqdm.auto import tqdm

        context, device = self.context, self.context.device
        log_path = self.out / "log.jsonl"
        if context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _keep_log_until(log_path, start_step)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.args.amp else contextlib.nullcontext())
        bar = tqdm(total=self.steps, initial=start_step, desc=self.family.name, disable=not context.is_main,
                   dynamic_ncols=True)
        sums = {name: torch.zeros((), device=device) for name, _ in objectives}
        since, clock = 0, time.perf_counter()
        model.train()
        for step in range(start_step, self.steps):
            batch = self.train_data.batch(self.order.indices(step)).to(device)
            lr = learning_rate(step, self.steps, self.lr, self.lr_schedule, self.warmup_steps)
            for name, objective in objectives:
                optimizer = optimizers[name]
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = objective(batch, generator)
                loss.backward()
                optimizer.step()
                sums[name] += loss.detach().float()
            if ema is not None:
                ema.update_parameters(model)
            since += 1
            done = step + 1
            if done % self.log_every == 0 or done == self.steps:
                now = time.perf_counter()
                elapsed += now - clock
                record = self._log_record(sums, since, done, now - clock, elapsed, lr)
                if context.is_main:
                    with open(log_path, "a", encoding="utf-8") as log:
                        log.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", items_s=f"{record['items_per_s']:.1f}")
                sums = {name: torch.zeros((), device=device) for name in sums}
                since, clock = 0, time.perf_counter()
            if done % self.args.checkpoint_every == 0 or done == self.steps:
                self._save_checkpoint(model, objectives, optimizers, ema, generator, done, elapsed)
                clock = time.perf_counter()  # checkpoint writing is not training time
            bar.update(1)
        bar.close()

    def _log_record(self, sums: dict, since: int, step: int, seconds: float, elapsed: float, lr: float) -> dict:
        names = list(sums)
        means = distributed.average({name: float(sums[name]) / since for name in names}, self.context)
        record = {"step": step, "loss": means[names[0]]}
        record.update({f"{name}_loss": means[name] for name in names[1:]})
        record.update({"items_per_s": self.batch_size * since / max(seconds, 1e-9), "lr": lr,
                       "time": elapsed})
        return record

    # ------------------------------------------------------------------------------------------------------------
    def _finish(self, final_state: dict) -> dict:
        """Rank 0, after training: score and sample a fresh copy of the final (EMA) weights, write the files."""
        family, device = self.family, self.context.device
        model = family.build(self.config, self.train_data).to(device)
        model.load_state_dict(final_state)
        model.eval()
        generator = torch.Generator(device).manual_seed(self.args.seed)
        metrics = {"model": family.name, "step": self.steps, "data": self.checkpoint_config["data"]["source"],
                   "options": self.config}
        own = family.evaluate(model, self.train_data, self.test_data, self.config, self.settings, generator)
        metrics.update(own)
        metrics.update(evaluation.evaluate(family, model, self.train_data, self.test_data, self.config,
                                           self.settings, generator, own))
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        family.write_samples(model, self.train_data, self.test_data, self.config, self.settings, generator)
        pictures.save_loss_plot(self.out / "log.jsonl", self.out / "loss.png")
        return metrics


def _seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python: the model's initialization is the same on every process."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _keep_log_until(log_path: Path, step: int) -> None:
    """Drop the records after ``step`` (all of them for a fresh run): a resumed run continues the log from its
    checkpoint, without the records of steps it will train again."""
    kept = [record for record in pictures.read_log(log_path) if record["step"] <= step] if log_path.exists() else []
    log_path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
