"""Data-parallel training: two Gloo processes train the parameters one process trains with the global batch."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from genkernels.models.train import checkpoint, cli

# A deterministic loss (no noise draws), so two processes and one see exactly the same batches and losses.
GPT_RUN = ["gpt", "--quick", "--impl", "eager", "--steps", "3", "--batch-size", "8", "--log-every", "1",
           "--block-size", "16", "--n-embd", "32", "--n-head", "2", "--n-layer", "1", "--sample-chars", "8",
           "--eval-windows", "2"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(rank: int, world_size: int, port: int, argv: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if cli.main(argv) != 0:
        raise RuntimeError(f"rank {rank} failed")


def train_in_processes(argv: list, world_size: int = 2) -> None:
    mp.spawn(worker, args=(world_size, free_port(), argv), nprocs=world_size, join=True)


def read(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return records, torch.load(out / checkpoint.FILE_NAME, weights_only=False)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_global_batch(sharding, tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    assert cli.main(GPT_RUN + ["--out", str(single)]) == 0
    train_in_processes(GPT_RUN + sharding + ["--out", str(parallel)])
    single_log, single_state = read(single)
    parallel_log, parallel_state = read(parallel)
    assert len(parallel_state["rng"]["generators"]) == 2  # each process's generator is saved
    for one, two in zip(single_log, parallel_log, strict=True):  # losses averaged over the two processes
        assert two["step"] == one["step"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    for key, value in single_state["model"].items():
        torch.testing.assert_close(parallel_state["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert (parallel / "metrics.json").exists() and (parallel / "samples.txt").exists()
