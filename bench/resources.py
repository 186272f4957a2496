"""The compiled-code report: what every benchmark launch costs, read from its machine code, without a GPU.

``python -m genkernels.bench --resources [--arch sm_90,sm_80,sm_86,sm_89] [--only PATTERN]`` captures the launches
of every benchmark case (at the size a GPU run uses: :mod:`genkernels.bench.capture`), compiles each distinct
kernel config for each architecture with Triton's bundled ``ptxas`` (in parallel; Triton caches the binaries), and
reports per kernel and config:

- registers per thread, stack frame (spill) bytes, local-memory instructions (``LDL``/``STL``), shared memory and
  whether it fits the architecture's per-CTA limit;
- CTAs per SM and what limits it (registers, shared memory, warps, the CTA cap), the grid and its waves on the
  architecture's SM count, and the wave efficiency (``ctas / (ceil(waves) * ctas_per_sm * sms)``);
- the instruction mix: warpgroup MMA (``HGMMA``), ``mma.sync`` (``HMMA``), ``FFMA``, TMA (``UTMALDG``), cp.async
  (``LDGSTS``), the widths of global loads and stores, and 64-bit integer division or remainder inside loops (from
  the PTX, where loops are the backward branches);
- joined with the case's bytes moved and FLOPs, its roofline floor ``max(bytes / bandwidth, flops / peak)`` on the
  architecture (figures in :data:`ARCH_PEAKS`). Static figures, never speed: the measured time sits beside the floor
  only when the report runs on a GPU.

Run as ``python -m genkernels.bench.resources`` it is the worker that the CLI starts: a process without Triton's
interpreter, which compiled kernels need.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

# Bandwidth (GB/s) and dense bf16 tensor-core peak (TFLOP/s) each floor is computed with. sm_90: the H200 this
# project measures on (copy bandwidth and bf16 matmul measured, GUIDE.md); the others: datasheet figures of the
# architecture's datacenter part (A100 80GB SXM, RTX A6000, L40S).
ARCH_PEAKS = {
    80: (2039.0, 312.0),
    86: (768.0, 154.8),
    89: (864.0, 362.0),
    90: (4300.0, 790.0),
}

# Shared-memory-only compiles that another architecture's compile stands for: sm_89 lowers the kernels' dots and
# async copies as sm_86 does (no fp8 here), so their shared memory is the same (equal on all 693 benchmark launches
# compiled for both with triton 3.9); the rows say which compile they come from (``compiled_as``).
SHARED_MEMORY_AS = {89: 86}

_LOAD = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)\b")
_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ----------------------------------------------------------------------------------------------------------------
# Reading one compiled kernel
# ----------------------------------------------------------------------------------------------------------------
def _access_width(suffixes: str) -> int:
    """Bytes per thread of one LDG/STG from its suffixes (``.E.128`` -> 16, ``.E.U16`` -> 2, ``.E`` -> 4)."""
    for part in suffixes.split("."):
        if part in _WIDTHS:
            return _WIDTHS[part]
    return 4


def sass_mix(sass: str) -> dict:
    """Instruction counts of a kernel's SASS (static: each instruction once, however often it runs)."""
    counts = collections.Counter()
    widths = {"LDG": collections.Counter(), "STG": collections.Counter()}
    for line in sass.splitlines():
        if "/*" not in line or ";" not in line:
            continue
        text = line.split("*/", 1)[-1].split(";", 1)[0].strip()
        if text.startswith("@"):
            text = text.split(None, 1)[-1] if " " in text else ""
        opcode = text.split(" ", 1)[0]
        base = opcode.split(".", 1)[0]
        if base in ("HGMMA", "HMMA", "FFMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDL", "STL", "LDS", "STS",
                    "IMMA", "DFMA"):
            counts[base] += 1
        match = _LOAD.match(opcode)
        if match:
            widths[match.group(1)][_access_width(match.group(2))] += 1
    return {
        "hgmma": counts["HGMMA"], "hmma": counts["HMMA"], "ffma": counts["FFMA"], "tma": counts["UTMALDG"]
        + counts["UTMASTG"], "cp_async": counts["LDGSTS"], "local_loads": counts["LDL"],
        "local_stores": counts["STL"],
        "global_load_widths": {str(k): v for k, v in sorted(widths["LDG"].items())},
        "global_store_widths": {str(k): v for k, v in sorted(widths["STG"].items())},
    }


_PTX_LABEL = re.compile(r"^\s*(\$[\w$]+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$[\w$]+);")
_PTX_DIV64 = re.compile(r"\b(?:div|rem)\.(?:s|u)64\b")


def div64_in_loops(ptx: str) -> int:
    """64-bit integer divisions and remainders that sit inside a loop of the PTX (between a label and a later
    branch back to it)."""
    lines = ptx.splitlines()
    labels = {}
    for index, line in enumerate(lines):
        match = _PTX_LABEL.match(line)
        if match:
            labels[match.group(1)] = index
    loops = []
    for index, line in enumerate(lines):
        match = _PTX_BRANCH.search(line)
        if match and labels.get(match.group(1), index + 1) <= index:
            loops.append((labels[match.group(1)], index))
    return sum(1 for index, line in enumerate(lines)
               if _PTX_DIV64.search(line) and any(start <= index <= end for start, end in loops))


def resource_usage(cubin_path: str) -> dict:
    """Registers, stack frame and local memory of the one function in a cubin (``cuobjdump -res-usage``)."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0))}


def _stop_after_llvm_ir(*args):
    """A Triton stage hook that ends compilation at the LLVM IR, where shared memory has been allocated: the PTX and
    ``ptxas`` stages (most of the time of a compile) are skipped. Called with no arguments it returns the key that
    keeps these partial compiles apart from full ones in Triton's cache."""
    if not args:
        return "genkernels-shared-memory-only", "1"
    _backend, stages, _options, _language, _capability = args

    def name_only(llvm_ir, metadata):
        metadata["name"] = re.search(r"define [^@]*@([\w$.]+)\(", llvm_ir).group(1)
        return ""

    stages["ptx"] = name_only
    stages["cubin"] = lambda _ptx, _metadata: b""


def compile_and_read(launch, shared_memory_only: bool = False) -> dict:
    """Compile one captured launch for its architecture and read its resources and instruction mix; with
    ``shared_memory_only``, compile only as far as the shared-memory allocation and read that alone."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(launch.kernel(), launch.signature, launch.constexprs, launch.attrs)
    previous_hook = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = _stop_after_llvm_ir if shared_memory_only else previous_hook
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", launch.arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    finally:
        knobs.runtime.add_stages_inspection_hook = previous_hook
    if shared_memory_only:
        return {"shared_bytes": int(compiled.metadata.shared), "shared_memory_only": True}
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = resource_usage(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    return {**usage, "shared_bytes": int(compiled.metadata.shared), **sass_mix(sass),
            "div64_in_loops": div64_in_loops(compiled.asm["ptx"])}


def _compile_safely(job) -> dict:
    launch, shared_memory_only = job
    try:
        return compile_and_read(launch, shared_memory_only)
    except Exception as error:  # one kernel that fails to compile is a row of the report, not the end of it
        return {"compile_error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"}


# ----------------------------------------------------------------------------------------------------------------
# Occupancy and waves
# ----------------------------------------------------------------------------------------------------------------
def occupancy(registers: int, shared_bytes: int, num_warps: int, limits) -> tuple[int, str]:
    """CTAs of one kernel resident per SM and what limits it. Registers are allocated per warp in units of 256
    (per thread rounded up to 8); every CTA reserves 1 KB of shared memory beyond its own on sm_80 and later."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    candidates = {
        "registers": limits.registers_per_sm // (per_warp * num_warps),
        "shared memory": limits.shared_memory_per_sm // (shared_bytes + 1024) if shared_bytes else 10**9,
        "warps": limits.max_warps_per_sm // num_warps,
        "CTA limit": limits.max_ctas_per_sm,
    }
    limiter = min(candidates, key=candidates.get)
    return candidates[limiter], limiter


def waves(ctas: int, ctas_per_sm: int, sm_count: int) -> tuple[float, float]:
    """``(waves, efficiency)`` of a grid of ``ctas`` on ``sm_count`` SMs holding ``ctas_per_sm`` each."""
    slots = max(ctas_per_sm, 1) * sm_count
    count = ctas / slots
    return count, (ctas / (math.ceil(count) * slots) if ctas else 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Capturing the benchmark cases
# ----------------------------------------------------------------------------------------------------------------
def captured_providers(names: Iterable[str]) -> list[str]:
    """The providers whose launches are captured: genkernels' own (``triton``, ``cached_triton``, ...), except
    CUDA-graph replays of the same launches."""
    return [name for name in names if "triton" in name and "cuda_graph" not in name]


def capture_cases(pattern: Optional[str], arch: int) -> list[dict]:
    """For every full-size benchmark case matching ``pattern``: its launches (per provider), bytes, FLOPs and any
    reason a provider could not be captured."""
    import torch

    from .capture import capture
    from .registry import all_cases

    meta = torch.device("meta")
    results = []
    for case in all_cases("full", pattern):
        entry = {"case": case.name, "family": case.family, "kind": case.kind, "launches": [], "errors": {}}
        setup = capture(lambda: case.setup(meta), arch)
        if setup.error:
            entry["errors"]["setup"] = setup.error
            results.append(entry)
            continue
        workload = setup.result
        entry["bytes_moved"], entry["flops"] = workload.bytes_moved, workload.flops
        for provider in captured_providers(workload.providers):
            captured = capture(workload.providers[provider], arch)
            if captured.error:
                entry["errors"][provider] = captured.error
            entry["launches"] += [(provider, launch) for launch in captured.launches]
        results.append(entry)
    return results


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------
def build_report(pattern: Optional[str], arches: list[int], workers: int,
                 shared_memory_arches: Iterable[int] = ()) -> dict:
    """Capture, compile (each distinct binary once, in parallel) and join everything into report rows. The
    ``shared_memory_arches`` are compiled only as far as their shared memory (rows with ``shared_memory_only``:
    what the fits-shared-memory budget needs, at about half the cost of a full compile)."""
    import triton

    from genkernels.kernels.launch import ARCH_LIMITS

    from .budgets import check_rows

    shared_memory_arches = [arch for arch in shared_memory_arches if arch not in arches]
    cases_by_arch = {arch: capture_cases(pattern, arch) for arch in [*arches, *shared_memory_arches]}

    def binary(launch):  # the launch whose compile gives this launch's figures
        if launch.arch in shared_memory_arches and launch.arch in SHARED_MEMORY_AS:
            return dataclasses.replace(launch, arch=SHARED_MEMORY_AS[launch.arch])
        return launch

    distinct = {}
    for arch, cases in cases_by_arch.items():
        for case in cases:
            for _, launch in case["launches"]:
                distinct.setdefault(binary(launch).compile_key(), (binary(launch), arch in shared_memory_arches))
    keys = list(distinct)
    print(f"compiling {len(keys)} distinct kernel binaries with {workers} workers", file=sys.stderr, flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        compiled = {}
        for done, (key, info) in enumerate(zip(keys, pool.map(_compile_safely, [distinct[k] for k in keys])), 1):
            compiled[key] = info
            if done % 20 == 0 or done == len(keys):
                print(f"  compiled {done}/{len(keys)}", file=sys.stderr, flush=True)
    rows, cases_out = [], []
    for arch, cases in cases_by_arch.items():
        limits = ARCH_LIMITS[arch]
        bandwidth, peak = ARCH_PEAKS[arch]
        for case in cases:
            floors = [value for value in ((case.get("bytes_moved") or 0) / (bandwidth * 1e9),
                                          (case.get("flops") or 0) / (peak * 1e12)) if value]
            cases_out.append({"case": case["case"], "arch": f"sm_{arch}", "bytes_moved": case.get("bytes_moved"),
                              "flops": case.get("flops"), "floor_ms": max(floors) * 1e3 if floors else None,
                              "errors": case["errors"], "launches": len(case["launches"])})
            seen = set()
            for provider, launch in case["launches"]:
                key = (provider, launch.compile_key(), launch.grid)
                if key in seen:
                    continue
                seen.add(key)
                info = compiled[binary(launch).compile_key()]
                row = {"case": case["case"], "provider": provider, "arch": f"sm_{arch}",
                       "triton": triton.__version__, "kernel": launch.kernel_name,
                       "module": launch.kernel_module.rsplit(".", 1)[-1],
                       "config": launch.config_label(), "num_warps": launch.num_warps,
                       "num_stages": launch.num_stages, "grid": list(launch.grid), "ctas": launch.ctas,
                       "dot_dtypes": launch.pointer_dtypes(),
                       **info}
                if binary(launch).arch != arch:
                    row["compiled_as"] = f"sm_{binary(launch).arch}"
                if "compile_error" not in info:
                    row["fits_shared_memory"] = info["shared_bytes"] <= limits.shared_memory_per_cta
                if "compile_error" not in info and not info.get("shared_memory_only"):
                    per_sm, limiter = occupancy(info["registers"], info["shared_bytes"], launch.num_warps, limits)
                    row["ctas_per_sm"], row["occupancy_limiter"] = per_sm, limiter
                    row["waves"], row["wave_efficiency"] = waves(launch.ctas, per_sm, limits.sm_count)
                rows.append(row)
    findings = [{"budget": f.budget.name, "rule": f.budget.rule, "kernel": f.row["kernel"], "case": f.row["case"],
                 "arch": f.row["arch"], "exempt": f.exemption.reason if f.exemption else None}
                for f in check_rows(rows)]
    return {"triton": triton.__version__, "arches": [f"sm_{a}" for a in arches],
            "shared_memory_arches": [f"sm_{a}" for a in shared_memory_arches], "rows": rows, "cases": cases_out,
            "findings": findings}


def summarize_findings(report: dict) -> list[str]:
    """One line per (budget, kernel, verdict): how many launches miss the budget, and the exemption's reason or
    VIOLATED."""
    grouped = collections.Counter((f["budget"], f["kernel"], f["exempt"]) for f in report.get("findings", []))
    lines = []
    for (budget, kernel, exempt), count in sorted(grouped.items(), key=lambda item: (item[0][2] is not None,
                                                                                      item[0][:2])):
        verdict = f"exempt: {exempt}" if exempt else "VIOLATED"
        lines.append(f"{budget}: {kernel} ({count} launch{'es' if count > 1 else ''}): {verdict}")
    return lines


def _widths(counter: dict) -> str:
    return ",".join(f"{k}x{v}" for k, v in counter.items()) or "-"


def format_report(report: dict) -> str:
    """The report as a plain-text table, one line per (case, kernel launch)."""
    header = (f"{'case':44} {'kernel':34} {'arch':6} {'regs':>4} {'stack':>5} {'smem':>6} {'CTA/SM':>6} "
              f"{'limit':9} {'grid':>8} {'waves':>6} {'eff':>5} {'HGMMA':>5} {'HMMA':>5} {'FFMA':>6} "
              f"{'LDG B x n':18} {'STG B x n':14} {'div64':>5}")
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        if "compile_error" in row:
            lines.append(f"{row['case'][:44]:44} {row['kernel'][:34]:34} {row['arch']:6} "
                         f"COMPILE ERROR {row['compile_error']}")
            continue
        if row.get("shared_memory_only"):
            lines.append(f"{row['case'][:44]:44} {row['kernel'][:34]:34} {row['arch']:6} {'':>4} {'':>5} "
                         f"{row['shared_bytes'] // 1024:>5}K (shared memory only: "
                         f"{'fits' if row['fits_shared_memory'] else 'DOES NOT FIT'}"
                         f"{', compiled as ' + row['compiled_as'] if 'compiled_as' in row else ''})")
            continue
        lines.append(
            f"{row['case'][:44]:44} {row['kernel'][:34]:34} {row['arch']:6} {row['registers']:>4} "
            f"{row['stack_bytes']:>5} {row['shared_bytes'] // 1024:>5}K {row['ctas_per_sm']:>6} "
            f"{row['occupancy_limiter'][:9]:9} {row['ctas']:>8} {row['waves']:>6.2f} {row['wave_efficiency']:>5.2f} "
            f"{row['hgmma']:>5} {row['hmma']:>5} {row['ffma']:>6} {_widths(row['global_load_widths'])[:18]:18} "
            f"{_widths(row['global_store_widths'])[:14]:14} {row['div64_in_loops']:>5}")
    lines.append("")
    for case in report["cases"]:
        floor = f"{case['floor_ms']:.4f} ms" if case["floor_ms"] else "-"
        errors = "; ".join(f"{k}: {v}" for k, v in case["errors"].items())
        lines.append(f"{case['case'][:60]:60} {case['arch']:6} floor {floor:>14}"
                     + (f"   not captured: {errors}" if errors else ""))
    lines += ["", "Budgets (genkernels.bench.budgets):"] + ["  " + line for line in summarize_findings(report)]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    shared_only = report.get("shared_memory_arches") or []
    title = ", ".join(report["arches"] + [f"{arch} shared memory" for arch in shared_only])
    lines = [f"# Compiled-code report (triton {report['triton']}, {title})", "",
             "Static figures from the compiled code (registers, stack, shared memory, occupancy, waves, instruction "
             "mix) and roofline floors; not measured speed.", "",
             "| case | kernel | arch | config | regs | stack B | smem KB | CTAs/SM (limit) | grid | waves (eff) | "
             "HGMMA | HMMA | FFMA | LDG bytes x count | STG bytes x count | div64 in loops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "compile_error" in row:
            lines.append(f"| {row['case']} | {row['kernel']} | {row['arch']} | {row['config']} | compile error: "
                         f"{row['compile_error']} |||||||||||")
            continue
        if row.get("shared_memory_only"):
            lines.append(f"| {row['case']} | {row['kernel']} | {row['arch']} | {row['config']} | | | "
                         f"{row['shared_bytes'] / 1024:.1f} ({'fits' if row['fits_shared_memory'] else 'does not fit'}"
                         f"; shared memory only{', compiled as ' + row['compiled_as'] if 'compiled_as' in row else ''}) "
                         f"|||||||||")
            continue
        lines.append(
            f"| {row['case']} | {row['kernel']} | {row['arch']} | {row['config']} | {row['registers']} | "
            f"{row['stack_bytes']} | {row['shared_bytes'] / 1024:.1f} | {row['ctas_per_sm']} "
            f"({row['occupancy_limiter']}) | {row['ctas']} | {row['waves']:.2f} ({row['wave_efficiency']:.2f}) | "
            f"{row['hgmma']} | {row['hmma']} | {row['ffma']} | {_widths(row['global_load_widths'])} | "
            f"{_widths(row['global_store_widths'])} | {row['div64_in_loops']} |")
    lines += ["", "| case | arch | bytes moved | FLOPs | roofline floor | not captured |", "|---|---|---|---|---|---|"]
    for case in report["cases"]:
        floor = f"{case['floor_ms']:.4f} ms" if case["floor_ms"] else "-"
        errors = "; ".join(f"{k}: {v}" for k, v in case["errors"].items())
        lines.append(f"| {case['case']} | {case['arch']} | {case['bytes_moved'] or '-'} | {case['flops'] or '-'} | "
                     f"{floor} | {errors} |")
    lines += ["", "## Budgets", ""] + [f"- {line}" for line in summarize_findings(report)]
    return "\n".join(lines) + "\n"


def parse_arches(text: str) -> list[int]:
    """``"sm_90,sm_80"`` -> ``[90, 80]``."""
    from genkernels.kernels.launch import ARCH_LIMITS

    arches = []
    for part in text.split(","):
        part = part.strip().lower().removeprefix("sm_").removesuffix("a")
        if not part.isdigit() or int(part) not in ARCH_LIMITS:
            raise ValueError(f"--arch {text!r}: {part!r} is not one of "
                             f"{', '.join(f'sm_{a}' for a in sorted(ARCH_LIMITS))}")
        arches.append(int(part))
    return arches


def run_worker(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genkernels.bench.resources")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--only", default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shared-memory-arch", default="")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    shared_only = parse_arches(args.shared_memory_arch) if args.shared_memory_arch else []
    report = build_report(args.only, parse_arches(args.arch), args.workers, shared_only)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def run_report(arch: str, only: Optional[str], json_path: str, workers: Optional[int] = None,
               triton_version: Optional[str] = None, shared_memory_arch: Optional[str] = None) -> dict:
    """Build the report in a fresh process without Triton's interpreter (compiled kernels are needed) and return
    it; the JSON is left at ``json_path``. ``triton_version`` compiles with that Triton release instead of the
    installed one (installed once into a cache: :mod:`genkernels.bench.triton_versions`); the architectures of
    ``shared_memory_arch`` (e.g. ``"sm_80,sm_86"``) are compiled as far as their shared memory only. Raises
    ``RuntimeError`` with the worker's error output if it fails."""
    parse_arches(arch)
    if shared_memory_arch:
        parse_arches(shared_memory_arch)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_version is not None:
        from .triton_versions import triton_path

        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_path(triton_version), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, "-m", "genkernels.bench.resources", "--arch", arch, "--json", json_path,
               "--workers", str(workers or os.cpu_count() or 1)] + (["--only", only] if only else []) \
        + (["--shared-memory-arch", shared_memory_arch] if shared_memory_arch else [])
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate()
    finally:
        # the compile workers never outlive the report, whatever stops it
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the compiled-code report failed:\n{stderr[-4000:]}")
    return json.loads(Path(json_path).read_text())


if __name__ == "__main__":
    sys.exit(run_worker())
