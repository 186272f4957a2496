"""Every Triton kernel of the package compiles for Hopper (sm_90) with every config its launcher can pick,
and fits in shared memory: catches GPU-only compile errors the CPU interpreter cannot see."""
import importlib
import json
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import triton
from triton.runtime.interpreter import InterpretedFunction

import genkernels.kernels as package

HOPPER_SHARED_MEMORY_BYTES = 227 * 1024
# What @triton.jit returns: compiled kernels, or interpreted ones when the test session runs the interpreter.
JIT_TYPES = (triton.JITFunction, InterpretedFunction)


def _jit_kernels_by_module():
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels = {name for name, value in vars(module).items()
                   if isinstance(value, JIT_TYPES) and name.endswith("_kernel")
                   and value.fn.__module__ == module.__name__}
        if kernels:
            found[info.name] = (module, kernels)
    return found


def test_every_kernel_declares_its_compile_variants():
    kernels_by_module = _jit_kernels_by_module()
    assert "diffusion" in kernels_by_module
    for module_name, (module, kernels) in kernels_by_module.items():
        declared = {v.kernel.__name__ for v in getattr(module, "compile_variants", lambda: [])()}
        assert kernels <= declared, f"{module_name}: no compile variants for {sorted(kernels - declared)}"


def _run_in_own_process_group(command: list[str], env: dict) -> tuple[int, str, str]:
    """Run ``command`` to completion in a process group of its own and kill that whole group on every way out
    (a failure, a KeyboardInterrupt, pytest stopping): the worker's compile processes never outlive the test.
    No timeout: on a loaded machine the compile is slow, not wrong."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate()
        return process.returncode, stdout, stderr
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    worker = Path(__file__).with_name("sm90_compile_worker.py")
    returncode, stdout, stderr = _run_in_own_process_group(
        [sys.executable, str(worker), str(max(1, min(4, os.cpu_count() or 1)))], env)
    assert returncode == 0, stderr[-4000:]
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    expected = sum(len(module.compile_variants()) for module, _ in _jit_kernels_by_module().values())
    assert len(results) == expected > 0
    for result in results:
        assert result["cubin_bytes"] > 0
        assert result["shared"] <= HOPPER_SHARED_MEMORY_BYTES, f"shared memory overflow: {result}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_compile_runner_leaves_no_process_behind():
    """A command that exits while a process it started still runs: the runner kills that grandchild too."""
    script = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(600)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    returncode, stdout, _ = _run_in_own_process_group([sys.executable, "-c", script], dict(os.environ))
    assert returncode == 0
    grandchild = int(stdout.split()[0])
    for _ in range(400):
        if not _alive(grandchild):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {grandchild} still runs after the compile runner returned")
