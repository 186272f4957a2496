"""The compiled code of every benchmark launch, on a machine without a GPU.

The launches of every benchmark case are captured at the size a GPU run uses (genkernels.bench.capture: what is
compiled is what a GPU launch compiles, with Triton's own specialization of the arguments) and compiled for
Hopper (sm_90) with Triton's bundled ptxas (genkernels.bench.resources), by the Triton installed here and by the
GPU machine's release. One test per Triton release, so that each report is built once whatever the worker layout:
every kernel of the package is launched by some case and compiles, every budget of genkernels.bench.budgets holds
for every launch or is lifted by a written exemption, and the tiles picked for sm_80/86/89 fit their shared
memory.
"""
from __future__ import annotations

import importlib
import pkgutil

import triton
from triton.runtime.interpreter import InterpretedFunction

import genkernels.kernels as package
from genkernels.bench.budgets import EXEMPTIONS, capture_gap, check_rows
from genkernels.bench.resources import run_report
from genkernels.bench.triton_versions import GPU_MACHINE_TRITON

# What @triton.jit returns: compiled kernels, or interpreted ones when the test session runs the interpreter.
JIT_TYPES = (triton.JITFunction, InterpretedFunction)


def _package_kernels() -> set[str]:
    """Every ``@triton.jit`` function named ``*_kernel`` defined in genkernels.kernels (the launchable ones)."""
    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found |= {name for name, value in vars(module).items()
                  if isinstance(value, JIT_TYPES) and name.endswith("_kernel") and value.fn.__module__ == module.__name__}
    return found


def _problems(report: dict) -> list[str]:
    """Everything a report says is wrong: cases that could not be captured (other than the known gaps), launches
    that do not compile, kernels no case launches, budgets neither held nor exempted, and exemptions for this
    Triton release that no launch needs any more."""
    problems = []
    not_captured = {f"{case['case']} ({case['arch']})": case["errors"] for case in report["cases"]
                    if case["errors"] and capture_gap(case["case"]) is None}
    if not_captured:
        problems.append("cases whose launches could not be captured: "
                        + "; ".join(f"{name}: {errors}" for name, errors in sorted(not_captured.items())))
    failed = sorted({f"{row['kernel']} [{row['config']}] on {row['arch']}: {row['compile_error']}"
                     for row in report["rows"] if "compile_error" in row})
    problems += [f"does not compile: {line}" for line in failed]
    missing = _package_kernels() - {row["kernel"] for row in report["rows"]}
    if missing:
        problems.append(f"kernels no benchmark case launches (so nothing compiles them): {sorted(missing)}")
    findings = check_rows(report["rows"])
    problems += sorted({finding.describe() for finding in findings if finding.exemption is None})
    used = {finding.exemption for finding in findings if finding.exemption is not None}
    problems += [f"exemption that covers no launch any more (delete it): {exemption}" for exemption in EXEMPTIONS
                 if exemption not in used and exemption.applies_to_triton(report["triton"])]
    return problems


def test_every_benchmark_launch_compiles_for_sm90_within_its_budgets(tmp_path):
    """Triton as installed: sm_90 in full, and the tiles the launchers pick on sm_80, sm_86 and sm_89 fit those
    architectures' shared memory (compiled that far only)."""
    report = run_report("sm_90", None, str(tmp_path / "resources.json"), shared_memory_arch="sm_80,sm_86,sm_89")
    assert {row["arch"] for row in report["rows"]} == {"sm_90", "sm_80", "sm_86", "sm_89"}
    problems = _problems(report)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:80])


def test_every_benchmark_launch_compiles_for_sm90_with_the_gpu_machines_triton(tmp_path):
    """The same launches compiled by the Triton release of the project's GPU machine (installed once into a cache
    beside this one, :mod:`genkernels.bench.triton_versions`), held to the same budgets."""
    report = run_report("sm_90", None, str(tmp_path / "resources.json"), triton_version=GPU_MACHINE_TRITON)
    assert report["triton"] == GPU_MACHINE_TRITON
    problems = _problems(report)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:80])
