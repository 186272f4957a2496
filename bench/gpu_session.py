"""``python -m genkernels.bench.gpu_session OUT_DIR``: what one session on the GPU machine measures, in one command
that fits its lease (the machine is lent for 15 minutes, start-up included; this command takes at most
``--budget-s``, 540 s by default).

On an H100/H200 it runs these parts in order, each in a process of its own with a time budget. A part that runs out
of its budget is stopped and reported as stopped; it never eats the time of the parts after it, and the whole
command never runs past its total budget. Time a part leaves unused passes on to the parts after it.

- ``device``: the device (name, torch and triton versions, SM count, memory, L2) and its own limits measured in
  this run: a large device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s). Always runs.
- ``tests``: the GPU-marked tests, ``pytest -m gpu -n 0 -q``, JUnit XML into OUT_DIR (when the part is stopped,
  the XML is written from what finished, the test in flight counted as an error).
- ``bench.ops``, ``bench.attention``, ``bench.train``, ``bench.sample``: the benchmark cases that matter most
  (:data:`BENCH_GROUPS`): every op family at one full size; attention forward and backward, head dims 64 and 128,
  causal, at 4k and 16k tokens; the training step and the sampling of each model family. Each case also has a cap
  of its own, so one slow case does not stop its group. The results JSON and markdown in OUT_DIR are rewritten
  after every case: a session cut short leaves what finished.
- ``report``: the compiled-code report for sm_90 (:func:`genkernels.bench.resources.run_report`) of the planned
  cases, with the measured medians joined beside the roofline floors.

A summary table comes last (per case: best provider, ms, speedup vs eager and vs compile, % of copy bandwidth or
of matmul peak, max error). ``--dry-run`` (any machine) prints the plan: each part's budget and the case names each
planned pattern resolves to, failing when a pattern matches no case (a renamed case is noticed). ``--only`` runs a
subset of the parts (``tests``, ``bench``, ``report``, or one bench group such as ``bench.attention``).

Files in OUT_DIR (seven; the GPU machine returns at most eight): ``session.json`` (the plan and every part's
outcome), ``session.log`` (the output of every part's processes: pytest, the device and bench workers, and each
failing report worker's tail), ``bench.json`` and ``bench.md``, ``tests.xml``, ``report.json`` and ``report.md``.

Exit status: 0 when the command ran to its end (parts stopped at their budget and failing providers are reported
in the files and the summary, not in the status); 2 when it could not run (no CUDA GPU without ``--dry-run``,
OUT_DIR not writable, a budget too small); 3 when ``--dry-run`` finds a planned pattern that matches no case.

Where the project is not installed (the GPU machine gets a copy of the checkout and has no network), run the file
itself, ``python bench/gpu_session.py OUT_DIR``: it makes ``genkernels`` importable from the checkout, for itself and
for every process it starts.

The module imports nothing beyond the standard library at import time: it also serves as the small pytest plugin
(``-p genkernels.bench.gpu_session``) that records each GPU test's outcome as it finishes.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 540.0
REPORT_ARCH = "sm_90"
# Seconds a stopped part gets between SIGTERM and SIGKILL, and how often a running part is looked at.
KILL_GRACE_S = 5.0
POLL_S = 0.2
# Each part's share of the total budget, in seconds at the default budget of 540 s; the reserve covers the grace
# of the last stopped part, the files and the summary. Selected parts share the whole budget (see plan_budgets).
RESERVE_S = 20.0
SHARES = {
    "device": 20.0,
    "tests": 100.0,
    "bench.ops": 85.0,
    "bench.attention": 95.0,
    "bench.train": 85.0,
    "bench.sample": 70.0,
    "report": 65.0,
}
PART_NAMES = tuple(SHARES)
SELECTABLE = ("tests", "bench", "report") + tuple(name for name in PART_NAMES if name.startswith("bench."))
TEST_PROGRESS_ENV = "GENKERNELS_GPU_SESSION_TEST_PROGRESS"
FILES = {"session": "session.json", "bench_json": "bench.json", "bench_md": "bench.md", "tests_xml": "tests.xml",
         "log": "session.log", "report_json": "report.json", "report_md": "report.md"}


@dataclasses.dataclass(frozen=True)
class BenchGroup:
    part: str  # "bench.ops"
    title: str
    case_cap_s: float  # one case (set-up, first calls, timing of every provider) is stopped after this long
    patterns: tuple[str, ...]  # case names or patterns (``Case.matches``); an exact name selects that case alone


# The cases that matter most, in the order they run (a group stopped at its budget keeps the ones before).
BENCH_GROUPS = (
    BenchGroup("bench.ops", "every op family at one full size", 45.0, (
        "diffusion.ddpm_step[bfloat16,16M]",
        "diffusion.group_norm_silu[fwd,bfloat16,32x256x64x64]",
        "flows.affine_coupling[bfloat16,sigmoid,64x24x64x64]",
        "pixelcnn.masked_conv2d[bfloat16,64x128x32x32,7x7A]",
        "vae_gan_ops.reparameterize_kl[bfloat16,256x16x64x64]",
        "vae_gan_ops.bias_act[bfloat16,64x512x32x32]",
        "wavenet.causal_conv1d[bfloat16,16x64->128x16000,k2,d256]",
        "wavenet.residual_layer[bfloat16,b16,r64,d64,s256,t16000,dil256]",
        "diffusion.ddim_step[bfloat16,16M]",
        "diffusion.q_sample[bfloat16,64x4x128x128]",
        "diffusion.diffusion_loss[fwd+bwd,bfloat16,64x4x128x128]",
        "diffusion.group_norm_silu[fwd+bwd,bfloat16,32x256x64x64]",
        "flows.affine_coupling_fwd_bwd[bfloat16,sigmoid,64x24x64x64]",
        "cross_entropy.cross_entropy[fwd+bwd,gpt2,bfloat16,8192x50257]",
        "cross_entropy.linear_cross_entropy[fwd+bwd,gpt2-small,bfloat16,8192x768x50257]",
        "sampling.categorical[gpt2,filtered,8x50257]",
    )),
    BenchGroup("bench.attention", "attention fwd/bwd, d64/d128, causal, 4k and 16k; decode", 60.0, (
        "attention.forward[bf16,d64,causal,s4096]",
        "attention.forward[bf16,d128,causal,s4096]",
        "attention.backward[bf16,d64,causal,s4096]",
        "attention.backward[bf16,d128,causal,s4096]",
        "attention.forward[bf16,d64,causal,s16384]",
        "attention.forward[bf16,d128,causal,s16384]",
        "attention.backward[bf16,d64,causal,s16384]",
        "attention.backward[bf16,d128,causal,s16384]",
        "attention.decode[bf16,cache8192]",
        "attention.decode_append[bf16,cache8192,ragged]",
        "attention.sdpa_fwd_bwd[bf16,d64,key_padding,s4096]",
        "attention.sdpa_fwd_bwd[bf16,d64,dropout0.1,s4096]",
    )),
    BenchGroup("bench.train", "the training step of each model family", 60.0, (
        "gpt.train[gpt2-small,b8,s1024]",
        "diffusion.unet_train[cifar10-32,b128]",
        "vae_gan.vae.train[bf16,3x64x64,b128]",
        "vae_gan.dcgan.train_step[bf16,3x64x64,b128]",
        "flows.realnvp-cifar.train[b64]",
        "flows.glow-cifar-k32.train[b64]",
        "pixelcnn.train[c3,h96,b7,32x32,n32]",
        "wavenet.train[1x10,b16,t16000]",
        "hf.unet_train[ddpm-cifar10-32,b64]",
        "hf.gpt2_train[gpt2,b8,s1024]",
    )),
    BenchGroup("bench.sample", "the sampling of each model family", 60.0, (
        "gpt.generate[gpt2-small,b8,p128,n128]",
        "diffusion.unet_sample[ddim50,cifar10-32,n64]",
        "vae_gan.vae.sample[bf16,3x64x64,b128]",
        "vae_gan.dcgan.sample[bf16,3x64x64,b128]",
        "flows.realnvp-cifar.sample[b64]",
        "flows.glow-cifar-k32.sample[b64]",
        "pixelcnn.sample[c1,h32,b5,28x28,n16]",
        "wavenet.sample[rf1024,b16,n2048]",
        "hf.unet_sample[ddim10,ddpm-cifar10-32,n64]",
        "hf.gpt2_generate[gpt2,b8,p128,n128]",
    )),
)
GROUPS_BY_PART = {group.part: group for group in BENCH_GROUPS}


# ----------------------------------------------------------------------------------------------------------------
# The plan: budgets and the cases each pattern resolves to
# ----------------------------------------------------------------------------------------------------------------
def selected_parts(only: Optional[str]) -> list[str]:
    """The parts to run, in order (``device`` always), from ``--only`` (comma-separated; ``bench`` is every
    bench group)."""
    if not only:
        return list(PART_NAMES)
    wanted = set()
    for item in (text.strip() for text in only.split(",")):
        if item not in SELECTABLE:
            raise ValueError(f"--only {only!r}: {item!r} is not one of {', '.join(SELECTABLE)}")
        wanted |= {name for name in PART_NAMES if name == item or name.startswith(item + ".")}
    return ["device"] + [name for name in PART_NAMES if name in wanted]


def plan_budgets(total_s: float, parts: list[str]) -> tuple[dict[str, float], float]:
    """``({part: budget_s}, reserve_s)``: the reserve, the device part's share, and the rest of the total split over
    the other selected parts in proportion to :data:`SHARES`. The budgets and the reserve add up to ``total_s``."""
    scale = total_s / DEFAULT_BUDGET_S
    reserve = max(KILL_GRACE_S * 2, RESERVE_S * scale)
    if total_s - reserve < 15:
        raise ValueError(f"--budget-s {total_s:g}: too small (at least {reserve + 15:g} s)")
    available = total_s - reserve
    budgets = {"device": min(SHARES["device"] * scale, available / 2)}
    others = [name for name in parts if name != "device"]
    weight = sum(SHARES[name] for name in others)
    for name in others:
        budgets[name] = (available - budgets["device"]) * SHARES[name] / weight
    if not others:
        budgets["device"] = available
    return budgets, reserve


def resolve_patterns(patterns: Iterable[str], cases) -> dict[str, list[str]]:
    """``{pattern: [case name, ...]}``: a pattern equal to a case's name selects that case alone; any other
    pattern selects every case it matches (``Case.matches``: a glob or a substring)."""
    names = {case.name for case in cases}
    resolved = {}
    for pattern in patterns:
        resolved[pattern] = [pattern] if pattern in names else [case.name for case in cases if case.matches(pattern)]
    return resolved


@dataclasses.dataclass
class Plan:
    total_s: float
    reserve_s: float
    budgets: dict[str, float]  # part -> seconds, in running order
    resolved: dict[str, dict[str, list[str]]]  # bench part -> {pattern: case names}
    missing: list[tuple[str, str]]  # (bench part, pattern) that match no case

    def cases(self, part: str) -> list[str]:
        """The case names of one bench group, in plan order, each once."""
        seen = {}
        for names in self.resolved.get(part, {}).values():
            for name in names:
                seen.setdefault(name, None)
        return list(seen)

    def all_cases(self) -> list[str]:
        seen = {}
        for part in self.budgets:
            for name in self.cases(part):
                seen.setdefault(name, part)
        return list(seen)


def build_plan(total_s: float = DEFAULT_BUDGET_S, only: Optional[str] = None, cases=None) -> Plan:
    """The plan of a session: the budgets of the selected parts and the cases of each selected bench group,
    resolved against the registry at size "full" (or against ``cases``). The report covers every planned case,
    also those of bench groups not selected."""
    parts = selected_parts(only)
    budgets, reserve = plan_budgets(total_s, parts)
    if cases is None:
        from .registry import all_cases

        cases = all_cases("full")
    needed = [group for group in BENCH_GROUPS if group.part in parts or "report" in parts]
    resolved = {group.part: resolve_patterns(group.patterns, cases) for group in needed}
    missing = [(part, pattern) for part, found in resolved.items() for pattern, names in found.items() if not names]
    return Plan(total_s, reserve, budgets, resolved, missing)


def format_plan(plan: Plan) -> str:
    lines = [f"GPU session plan: total budget {plan.total_s:.0f} s = parts {sum(plan.budgets.values()):.0f} s "
             f"+ reserve {plan.reserve_s:.0f} s (stopping, files, summary); time a part leaves unused passes on"]
    descriptions = {
        "device": "device, torch/triton versions, SMs, memory; copy GB/s and bf16 matmul TFLOP/s measured",
        "tests": f"pytest -m gpu -n 0 -q (JUnit XML: OUT_DIR/{FILES['tests_xml']})",
        "report": f"run_report({REPORT_ARCH!r}) of the {len(plan.all_cases())} planned cases, several at a time, "
                  "measured medians joined beside the roofline floors",
    }
    for part, budget in plan.budgets.items():
        group = GROUPS_BY_PART.get(part)
        if group is None:
            lines.append(f"  {part:16} {budget:5.0f} s  {descriptions[part]}")
            continue
        lines.append(f"  {part:16} {budget:5.0f} s  {group.title}: {len(plan.cases(part))} cases, each stopped "
                     f"after {min(group.case_cap_s, budget):.0f} s")
        for pattern, names in plan.resolved[part].items():
            if not names:
                lines.append(f"      {pattern}  ->  MATCHES NO CASE")
            elif names == [pattern]:
                lines.append(f"      {pattern}")
            else:
                lines.append(f"      {pattern}  ->  {', '.join(names)}")
    for part, pattern in plan.missing:
        lines.append(f"ERROR: {part}: the pattern {pattern!r} matches no case at size 'full' (renamed?)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Running one part: a process group of its own, stopped at its deadline
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    returncode: Optional[int]
    seconds: float
    stopped: Optional[str] = None  # why it was stopped; None when it exited by itself


def _kill_groups(processes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to each process's group, SIGKILL after ``grace_s`` (one grace for all of them); every group is
    killed either way (children such as compile workers never outlive their part)."""
    if grace_s > 0:
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        end = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()


def _kill_group(process: subprocess.Popen, grace_s: float) -> None:
    _kill_groups([process], grace_s)


def run_until(command: list[str], deadline: float, *, log_path: Path, env: Optional[dict] = None,
              cwd: Optional[Path] = None, on_poll: Optional[Callable[[], Optional[str]]] = None,
              grace_s: float = KILL_GRACE_S) -> Outcome:
    """Run ``command`` (its output appended to ``log_path``) until it exits or ``time.monotonic()`` reaches
    ``deadline``; ``on_poll()`` is called while it runs and may return a reason to stop it early."""
    start = time.monotonic()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True)
        stopped = None
        try:
            while process.poll() is None:
                reason = on_poll() if on_poll is not None else None
                if reason is None and time.monotonic() >= deadline:
                    reason = "budget"
                if reason is not None:
                    stopped = reason
                    break
                try:
                    process.wait(POLL_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            _kill_group(process, grace_s if stopped else 0)
    return Outcome(None if stopped else process.returncode, time.monotonic() - start, stopped)


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - chars))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


class EventReader:
    """Reads the JSON lines a worker appends to a file, each complete line once."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


def _emit(path: Path, **event) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(event, default=str) + "\n")
        handle.flush()


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def _worker_env() -> dict:
    """The environment of a part's process: compiled kernels (never Triton's interpreter), unbuffered output."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _worker_command(kind: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "genkernels.bench.gpu_session", "--worker", kind, *arguments]


# ----------------------------------------------------------------------------------------------------------------
# The benchmark: rows, case statuses, the files rewritten after every case, the summary
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchState:
    environment: dict
    order: list[str]  # every planned case of the selected groups, in running order
    groups: dict[str, str]  # case -> bench part
    status: dict[str, str] = dataclasses.field(default_factory=dict)  # case -> "done", "stopped (...)", ...
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)
    recorded: list[str] = dataclasses.field(default_factory=list)  # cases in the order they were recorded

    def record(self, case: str, status: str, seconds: Optional[float] = None, rows: Iterable[dict] = ()) -> None:
        self.status[case] = status
        self.recorded.append(case)
        if seconds is not None:
            self.seconds[case] = round(seconds, 1)
        self.add_rows(case, rows)

    def add_rows(self, case: str, rows: Iterable[dict]) -> None:
        """Add rows of ``case`` (a worker reports them provider by provider) and set the speedups of all its rows
        over ``eager`` and ``compile`` from their medians."""
        rows = list(rows)
        if not rows:
            return
        self.rows += rows
        mine = [row for row in self.rows if row.get("case") == case]
        medians = {row["provider"]: row["median_ms"] for row in mine if row.get("median_ms") and not row.get("failure")}
        for row in mine:
            if row.get("median_ms") and not row.get("failure"):
                for provider, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                    if provider in medians:
                        row[key] = medians[provider] / row["median_ms"]

    def case_list(self) -> list[dict]:
        return [{"case": name, "group": self.groups.get(name), "status": self.status.get(name, "pending"),
                 "seconds": self.seconds.get(name)} for name in self.order]


def write_bench(out_dir: Path, state: BenchState) -> None:
    """Rewrite ``bench.json`` (the environment, every row, every planned case's status) and ``bench.md``."""
    payload = {"environment": state.environment, "cases": state.case_list(), "rows": state.rows}
    _write_atomic(out_dir / FILES["bench_json"], json.dumps(payload, indent=1, default=str))
    _write_atomic(out_dir / FILES["bench_md"], format_bench_markdown(state))


def _pct_peak(row: dict) -> Optional[str]:
    if row.get("pct_copy_bandwidth") is not None:
        return f"{row['pct_copy_bandwidth']:.0f}% BW"
    if row.get("pct_matmul_peak") is not None:
        return f"{row['pct_matmul_peak']:.0f}% MM"
    return None


def summarize(rows: list[dict], cases: list[dict]) -> list[dict]:
    """One entry per planned case (``cases``: ``{"case", "status"}``, in order): the best provider by median and
    its ms, its speedups over ``eager`` and ``compile`` (from the medians of the same run), its % of the copy
    bandwidth (``BW``) or of the matmul peak (``MM``), its max error and throughput; ``triton``'s ms beside it, and
    the providers that failed."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row.get("case"), []).append(row)
    entries = []
    for case in cases:
        name = case["case"]
        case_rows = by_case.get(name, [])
        timed = [row for row in case_rows if not row.get("failure") and row.get("median_ms")]
        medians = {row["provider"]: row["median_ms"] for row in timed}
        entry = {"case": name, "status": case.get("status", "pending"), "best": None, "ms": None,
                 "x_eager": None, "x_compile": None, "peak": None, "max_error": None, "throughput": None,
                 "triton_ms": medians.get("triton"),
                 "failed": [row.get("provider") for row in case_rows if row.get("failure")]}
        if timed:
            best = min(timed, key=lambda row: row["median_ms"])
            entry.update(best=best["provider"], ms=best["median_ms"], peak=_pct_peak(best),
                         max_error=best.get("max_error"))
            if "eager" in medians:
                entry["x_eager"] = medians["eager"] / best["median_ms"]
            if "compile" in medians:
                entry["x_compile"] = medians["compile"] / best["median_ms"]
            if best.get("items_per_s"):
                entry["throughput"] = f"{best['items_per_s']:.4g} {best.get('item_unit') or 'items'}/s"
        entries.append(entry)
    return entries


SUMMARY_COLUMNS = (
    ("case", "case", "{}"), ("best", "best", "{}"), ("ms", "ms", "{:.4f}"), ("x_eager", "x eager", "{:.2f}"),
    ("x_compile", "x compile", "{:.2f}"), ("peak", "% peak", "{}"), ("max_error", "max err", "{:.1e}"),
    ("throughput", "throughput", "{}"), ("triton_ms", "triton ms", "{:.4f}"), ("note", "status / failed", "{}"),
)


def _summary_cells(entry: dict, note_chars: int = 100) -> list[str]:
    note = "" if entry["status"] == "done" else entry["status"]
    if entry["failed"]:
        note = (note + "; " if note else "") + "failed: " + ",".join(entry["failed"])
    if len(note) > note_chars:
        note = note[:note_chars - 3] + "..."
    values = dict(entry, note=note)
    return ["-" if values[key] in (None, "") else fmt.format(values[key]) for key, _, fmt in SUMMARY_COLUMNS]


def format_summary(entries: list[dict]) -> str:
    """The summary as a plain-text table."""
    cells = [[title for _, title, _ in SUMMARY_COLUMNS]] + [_summary_cells(entry, 60) for entry in entries]
    widths = [max(len(line[i]) for line in cells) for i in range(len(SUMMARY_COLUMNS))]
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(text.ljust(width) if i in (0, 1, len(widths) - 1) else text.rjust(width)
                               for i, (text, width) in enumerate(zip(line, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_summary_markdown(entries: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in SUMMARY_COLUMNS) + " |",
             "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(_summary_cells(entry, 200)) + " |" for entry in entries]
    return "\n".join(lines)


ROW_COLUMNS = (("median_ms", "ms", "{:.4f}"), ("p20_ms", "p20", "{:.4f}"), ("p80_ms", "p80", "{:.4f}"),
               ("gb_per_s", "GB/s", "{:.0f}"), ("pct_copy_bandwidth", "% copy BW", "{:.0f}"),
               ("tflop_per_s", "TFLOP/s", "{:.1f}"), ("pct_matmul_peak", "% matmul", "{:.0f}"),
               ("items_per_s", "items/s", "{:.4g}"), ("max_error", "max err", "{:.2e}"),
               ("peak_memory_mib", "peak MiB", "{:.0f}"))


def format_bench_markdown(state: BenchState) -> str:
    env = state.environment
    copy_gbs, tflops = env.get("copy_bandwidth_gb_per_s"), env.get("matmul_tflop_per_s")
    lines = [f"# GPU session benchmark: {env.get('device', 'unknown device')}", "",
             f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, {env.get('date', '')}; measured "
             f"copy bandwidth {copy_gbs:.0f} GB/s, bf16 matmul {tflops:.1f} TFLOP/s."
             if copy_gbs and tflops else f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; the "
             "device's limits were not measured.", "",
             "Medians of CUDA-event timings; speedups from the medians of the same run; `% peak` is of the copy "
             "bandwidth (BW) or of the bf16 matmul peak (MM) measured in this run.", "",
             "## Summary", "", format_summary_markdown(summarize(state.rows, state.case_list())), "",
             "## Every row", "",
             "| case | provider | " + " | ".join(title for _, title, _ in ROW_COLUMNS) + " |",
             "|---|---|" + "---|" * len(ROW_COLUMNS)]
    for row in state.rows:
        cells = ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in ROW_COLUMNS]
        provider = row.get("provider", "?") + (f" (failed: {row['failure']})" if row.get("failure") else "")
        lines.append(f"| {row.get('case')} | {provider} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bench_command(case_names: list[str], events: Path, environment: dict,
                   providers: Optional[str]) -> list[str]:
    cases_file = events.with_suffix(".cases.json")
    cases_file.write_text(json.dumps(case_names))
    arguments = ["--cases-file", str(cases_file), "--events", str(events)]
    for key, flag in (("copy_bandwidth_gb_per_s", "--copy-gbs"), ("matmul_tflop_per_s", "--matmul-tflops")):
        if environment.get(key):
            arguments += [flag, str(environment[key])]
    if providers:
        arguments += ["--providers", providers]
    return _worker_command("bench", *arguments)


def run_bench_group(part: str, case_names: list[str], deadline: float, case_cap_s: float, state: BenchState,
                    *, work_dir: Path, on_change: Callable[[], None],
                    command: Callable[[list[str], Path], list[str]], log_path: Path,
                    env: Optional[dict] = None, grace_s: float = KILL_GRACE_S) -> dict:
    """Run one bench group's cases in a worker process (``command(cases, events_path)``), recording each case as
    its worker reports it and calling ``on_change()`` after every case. A case running past ``case_cap_s`` is
    stopped and a fresh worker takes the rest; at ``deadline`` the group is stopped, the case in flight marked
    stopped and the others not run. Returns the part's record."""
    remaining = list(case_names)
    start, workers, stopped = time.monotonic(), 0, None
    while remaining:
        if time.monotonic() >= deadline:
            stopped = "budget"
            break
        events_path = work_dir / f"{part}-{workers}.jsonl"
        workers += 1
        reader = EventReader(events_path)
        flight: dict = {}

        def absorb() -> None:
            for event in reader.read():
                name = event.get("case")
                if event.get("event") == "start":
                    flight.update(case=name, since=time.monotonic())
                elif event.get("event") == "rows":
                    state.add_rows(name, event.get("rows", ()))
                    on_change()
                elif event.get("event") in ("done", "failed"):
                    status = "done" if event["event"] == "done" else f"failed: {event.get('error', '?')}"
                    state.record(name, status, event.get("seconds"), event.get("rows", ()))
                    if name in remaining:
                        remaining.remove(name)
                    flight.clear()
                    on_change()

        def poll() -> Optional[str]:
            absorb()
            if flight and time.monotonic() - flight["since"] >= case_cap_s:
                return "case cap"
            return None

        before = len(remaining)
        outcome = run_until(command(list(remaining), events_path), deadline, log_path=log_path, env=env,
                            on_poll=poll, grace_s=grace_s)
        absorb()  # what the worker wrote before it exited or was stopped
        case = flight.get("case")
        if outcome.stopped == "budget":
            stopped = "budget"
            if case in remaining:
                state.record(case, f"stopped: {part} budget", time.monotonic() - flight["since"])
                remaining.remove(case)
            break
        if case in remaining:  # stopped at the case cap, or the worker died in it
            reason = (f"stopped: over its cap of {case_cap_s:.0f} s" if outcome.stopped
                      else f"crashed: worker exit {outcome.returncode}; {_last_line(_log_tail(log_path))}")
            state.record(case, reason, time.monotonic() - flight["since"])
            remaining.remove(case)
            on_change()
        elif len(remaining) == before:  # the worker ran no case at all: another one would do the same
            for name in remaining:
                state.record(name, f"not run: the bench worker exited {outcome.returncode} before any case "
                                   f"({_last_line(_log_tail(log_path))})")
            remaining.clear()
    for name in remaining:
        state.record(name, f"not run: {part} budget")
    on_change()
    statuses = [state.status.get(name, "") for name in case_names]
    return {"part": part, "status": "stopped (budget)" if stopped else "completed",
            "seconds": round(time.monotonic() - start, 1), "workers": workers,
            "cases_done": sum(status == "done" for status in statuses),
            "cases_failed": sum(status.startswith(("failed", "crashed")) for status in statuses),
            "cases": len(case_names)}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


# ----------------------------------------------------------------------------------------------------------------
# The GPU tests, and the pytest plugin that records each outcome as it finishes
# ----------------------------------------------------------------------------------------------------------------
def pytest_runtest_logstart(nodeid, location):  # noqa: ARG001  (pytest hook; active only inside a session)
    path = os.environ.get(TEST_PROGRESS_ENV)
    if path:
        _emit(Path(path), event="start", nodeid=nodeid, t=time.time())


def pytest_runtest_logreport(report):  # pytest hook; active only inside a session
    path = os.environ.get(TEST_PROGRESS_ENV)
    if not path:
        return
    if report.when == "call" or report.outcome != "passed":
        message = ""
        if report.outcome != "passed":
            message = str(getattr(report, "longrepr", "") or "")[-2000:]
        _emit(Path(path), event="report", nodeid=report.nodeid, when=report.when, outcome=report.outcome,
              duration=round(report.duration, 3), message=message)


def gpu_test_outcomes(events: list[dict]) -> tuple[dict[str, dict], Optional[str]]:
    """``({nodeid: {"outcome", "duration", "message"}}, nodeid in flight)`` from the plugin's events."""
    outcomes: dict[str, dict] = {}
    started = []
    for event in events:
        nodeid = event.get("nodeid")
        if event.get("event") == "start":
            started.append(nodeid)
            continue
        when, outcome = event.get("when"), event.get("outcome")
        if outcome == "skipped":
            result = "skipped"
        elif outcome == "failed":
            result = "failed" if when == "call" else "error"
        else:
            result = "passed"
        previous = outcomes.get(nodeid)
        if previous is None or previous["outcome"] == "passed":  # a failing teardown overrides a passed call
            outcomes[nodeid] = {"outcome": result, "duration": event.get("duration", 0.0),
                                "message": event.get("message", "")}
    in_flight = next((nodeid for nodeid in reversed(started) if nodeid not in outcomes), None)
    return outcomes, in_flight


def _xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold (terminal colour codes in pytest's reports)."""
    return "".join(c for c in text if c in "\t\n\r" or (" " <= c and c not in "\ufffe\uffff"))


def write_junit(path: Path, outcomes: dict[str, dict], in_flight: Optional[str], note: str) -> None:
    """A JUnit XML of the finished tests, for a test run stopped before pytest wrote its own; the test in flight
    is an error."""
    suite = ElementTree.Element("testsuite", name=f"pytest -m gpu ({note})")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    items = list(outcomes.items()) + ([(in_flight, {"outcome": "error", "duration": 0.0, "message": note})]
                                      if in_flight else [])
    for nodeid, result in items:
        module, _, name = nodeid.rpartition("::")
        case = ElementTree.SubElement(suite, "testcase", classname=module.replace("/", ".").removesuffix(".py"),
                                      name=name or nodeid, time=f"{result['duration']:.3f}")
        counts["tests"] += 1
        tag = {"failed": "failure", "error": "error", "skipped": "skipped"}.get(result["outcome"])
        if tag:
            counts[{"failure": "failures", "error": "errors", "skipped": "skipped"}[tag]] += 1
            message = _xml_text(result["message"])
            element = ElementTree.SubElement(case, tag, message=message[:200])
            element.text = message
    for key, value in counts.items():
        suite.set(key, str(value))
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def gpu_test_command(junit_path: Path, per_test_timeout_s: Optional[float]) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider",
               "-p", "genkernels.bench.gpu_session", f"--junitxml={junit_path}", "tests"]
    if per_test_timeout_s:
        command[-1:-1] = [f"--timeout={int(per_test_timeout_s)}"]
    return command


def run_tests(out_dir: Path, deadline: float, work_dir: Path) -> dict:
    import importlib.util

    junit = out_dir / FILES["tests_xml"]
    log = out_dir / FILES["log"]
    events = work_dir / "tests.jsonl"
    allowed = deadline - time.monotonic()
    timeout = max(45.0, allowed / 2) if importlib.util.find_spec("pytest_timeout") else None
    env = dict(_worker_env(), **{TEST_PROGRESS_ENV: str(events)})
    if junit.exists():
        junit.unlink()
    outcome = run_until(gpu_test_command(junit, timeout), deadline, log_path=log, env=env, cwd=REPO_ROOT)
    outcomes, in_flight = gpu_test_outcomes(EventReader(events).read())
    counts = {key: sum(result["outcome"] == key for result in outcomes.values())
              for key in ("passed", "failed", "error", "skipped")}
    record = {"part": "tests", "seconds": round(outcome.seconds, 1), "returncode": outcome.returncode, **counts,
              "failing": sorted(nodeid for nodeid, result in outcomes.items()
                                if result["outcome"] in ("failed", "error"))}
    if outcome.stopped:
        record["status"] = "stopped (budget)"
        record["in_flight"] = in_flight
    elif outcome.returncode in (0, 1, 5):  # passed, some failed, none collected
        record["status"] = "completed"
    else:
        record["status"] = f"failed (pytest exit {outcome.returncode})"
        record["log_tail"] = _log_tail(log, 1500)
    if not junit.exists():  # pytest stopped, or it ended before writing its XML
        write_junit(junit, outcomes, in_flight, "stopped at the session's tests budget" if outcome.stopped
                    else f"pytest exit {outcome.returncode} without a JUnit XML")
    return record


# ----------------------------------------------------------------------------------------------------------------
# The compiled-code report, several cases at a time, joined with the measured medians
# ----------------------------------------------------------------------------------------------------------------
def run_report_part(case_names: list[str], deadline: float, work_dir: Path, *, concurrency: Optional[int] = None,
                    grace_s: float = KILL_GRACE_S, log_path: Optional[Path] = None) -> tuple[dict, dict]:
    """``(report, record)``: ``run_report`` for each planned case (its exact name as the pattern), in worker
    processes ``concurrency`` at a time, merged; cases not reached by the deadline are listed in the record."""
    cpus = os.cpu_count() or 2
    concurrency = concurrency or max(1, min(8, cpus // 2))
    compile_workers = max(1, cpus // concurrency)
    pending = list(case_names)
    running: list[tuple[str, subprocess.Popen, Path, Path]] = []
    report = {"triton": None, "arches": [REPORT_ARCH], "rows": [], "cases": []}
    failed, start, stopped = {}, time.monotonic(), []
    env = _worker_env()

    def collect(name: str, process: subprocess.Popen, json_path: Path, worker_log: Path) -> None:
        if process.returncode == 0 and json_path.exists():
            part = json.loads(json_path.read_text())
            report["triton"] = part.get("triton")
            report["rows"] += part.get("rows", [])
            report["cases"] += [case for case in part.get("cases", []) if case not in report["cases"]]
        else:
            tail = _log_tail(worker_log)
            failed[name] = _last_line(tail)
            if log_path is not None:
                with open(log_path, "a") as log:
                    log.write(f"--- report of {name}: exit {process.returncode}\n{tail}\n")

    try:
        while pending or running:
            for item in list(running):
                if item[1].poll() is not None:
                    running.remove(item)
                    _kill_group(item[1], 0)
                    collect(*item)
            if time.monotonic() >= deadline:
                break
            while pending and len(running) < concurrency:
                name = pending.pop(0)
                index = len(case_names) - len(pending)
                json_path, worker_log = work_dir / f"report-{index}.json", work_dir / f"report-{index}.log"
                command = _worker_command("report", "--json", str(json_path), "--arch", REPORT_ARCH, "--only", name,
                                          "--workers", str(compile_workers))
                with open(worker_log, "ab") as log:
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                running.append((name, process, json_path, worker_log))
            time.sleep(POLL_S)
    finally:
        stopped += [name for name, _, _, _ in running]
        _kill_groups([process for _, process, _, _ in running], grace_s)
    record = {"part": "report", "seconds": round(time.monotonic() - start, 1),
              "status": "stopped (budget)" if stopped or pending else "completed",
              "cases_reported": len(report["cases"]), "failed": failed,
              "stopped": stopped, "not_reached": pending}
    return report, record


def join_measured(report: dict, rows: list[dict]) -> list[dict]:
    """Per report case (and arch) with a roofline floor: the measured medians of every provider beside it, and
    how far the best and ``triton`` are above the floor. Also sets ``measured_ms`` on the report's cases."""
    medians: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("median_ms") and not row.get("failure"):
            medians.setdefault(row["case"], {})[row["provider"]] = row["median_ms"]
    joined = []
    for case in report.get("cases", []):
        measured = medians.get(case["case"])
        case["measured_ms"] = measured
        if not measured:
            continue
        best = min(measured, key=measured.get)
        floor = case.get("floor_ms")
        joined.append({"case": case["case"], "arch": case.get("arch"), "floor_ms": floor, "best": best,
                       "best_ms": measured[best], "triton_ms": measured.get("triton"),
                       "best_over_floor": measured[best] / floor if floor else None,
                       "triton_over_floor": measured["triton"] / floor if floor and "triton" in measured else None})
    return joined


def format_join_markdown(joined: list[dict]) -> str:
    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    lines = ["| case | arch | roofline floor ms | best | best ms | best / floor | triton ms | triton / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in joined:
        lines.append(f"| {entry['case']} | {entry['arch']} | {cell(entry['floor_ms'], '{:.4f}')} | {entry['best']} | "
                     f"{entry['best_ms']:.4f} | {cell(entry['best_over_floor'], '{:.2f}')} | "
                     f"{cell(entry['triton_ms'], '{:.4f}')} | {cell(entry['triton_over_floor'], '{:.2f}')} |")
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict, joined: list[dict], record: dict) -> None:
    from .resources import format_markdown

    payload = dict(report, measured_vs_floor=joined, session=record)
    _write_atomic(out_dir / FILES["report_json"], json.dumps(payload, indent=1, default=str))
    try:
        body = format_markdown(report)
    except Exception as error:  # a report whose format changed still leaves its JSON and the join
        body = f"# Compiled-code report\n\n(not formatted: {type(error).__name__}: {error})\n"
    notes = [f"- {name}: failed: {why}" for name, why in record.get("failed", {}).items()]
    notes += [f"- {name}: stopped at the report's budget" for name in record.get("stopped", [])]
    notes += [f"- {name}: not reached within the report's budget" for name in record.get("not_reached", [])]
    text = (body + "\n## Measured medians beside the roofline floors\n\n" + format_join_markdown(joined) + "\n"
            + ("\n## Not reported\n\n" + "\n".join(notes) + "\n" if notes else ""))
    _write_atomic(out_dir / FILES["report_md"], text)


# ----------------------------------------------------------------------------------------------------------------
# Workers (``--worker KIND``): the processes the parts run in
# ----------------------------------------------------------------------------------------------------------------
def _device_worker(args) -> int:
    from .interpreter import configure_for_host

    configure_for_host()
    import torch
    import triton

    from .timer import copy_bandwidth_gbs, matmul_tflops

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__}
    _write_atomic(Path(args.json), json.dumps({"device": info}))  # what is known if the measurements hang
    copy_gbs, tflops = copy_bandwidth_gbs(device), matmul_tflops(device)
    try:
        from .report import environment

        env = environment(device, copy_gbs, tflops, False)
    except Exception:  # the report module changed: the same fields, written here
        env = {"device": props.name, "device_type": "cuda", "torch": torch.__version__,
               "triton": triton.__version__, "copy_bandwidth_gb_per_s": copy_gbs, "matmul_tflop_per_s": tflops,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    env.update(sm_count=info["sm_count"], memory_gib=info["memory_gib"], l2_mib=info["l2_mib"],
               capability=info["capability"], cuda=info["cuda"])
    _write_atomic(Path(args.json), json.dumps({"device": info, "environment": env}, default=str))
    return 0


def provider_order(names: Iterable[str], wanted: Optional[list[str]] = None) -> list[str]:
    """The order a case's providers run in: ours first, then the eager reference and the peers, ``compile``
    (whose first call compiles, the slowest) last, so a case stopped at its cap keeps the rows before."""
    names = [name for name in names if wanted is None or name in wanted]
    first = [name for name in ("triton", "eager") if name in names]
    last = [name for name in names if name == "compile"]
    return first + [name for name in names if name not in first and name not in last] + last


def _once(function):
    """``function`` computed on its first call only (a case's fp64 reference, shared by its providers)."""
    if function is None:
        return None
    kept = []

    def call():
        if not kept:
            kept.append(function())
        return kept[0]
    return call


def _bench_worker(args) -> int:
    from .interpreter import configure_for_host

    configure_for_host()
    import gc

    import torch

    from .registry import all_cases
    from .runner import run_case

    events = Path(args.events)
    wanted = json.loads(Path(args.cases_file).read_text())
    cases = {case.name: case for case in all_cases("full")}
    device = torch.device("cuda")
    providers = args.providers.split(",") if args.providers else None
    for name in wanted:
        _emit(events, event="start", case=name)
        start = time.perf_counter()
        try:
            case = cases[name]
            workload = case.setup(device)  # once: every provider is run on the same inputs
            workload = dataclasses.replace(workload, reference=_once(workload.reference))
            shared = dataclasses.replace(case, setup=lambda _device, built=workload: built)
            for provider in provider_order(workload.providers, providers):
                rows = run_case(shared, device, providers=[provider], copy_gbs=args.copy_gbs,
                                matmul_tflops=args.matmul_tflops)
                _emit(events, event="rows", case=name,
                      rows=[dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row) for row in rows])
        except Exception as error:
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
            print(f"{name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            _emit(events, event="failed", case=name, error=message, seconds=time.perf_counter() - start)
            if any(word in message.lower() for word in ("cuda", "accelerator", "out of memory")):
                return 3  # a fresh process for the next case: a CUDA error can poison this one
        else:
            _emit(events, event="done", case=name, seconds=time.perf_counter() - start)
        workload = shared = None
        gc.collect()
        torch.cuda.empty_cache()
    return 0


def _report_worker(args) -> int:
    from .resources import run_report

    # SIGTERM (the part's budget) unwinds run_report, whose own clean-up kills its compile processes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_report(args.arch, args.only, args.json, workers=args.workers)
    return 0


def worker_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m genkernels.bench.gpu_session --worker")
    parser.add_argument("--worker", choices=("device", "bench", "report"), required=True)
    parser.add_argument("--json")
    parser.add_argument("--events")
    parser.add_argument("--cases-file")
    parser.add_argument("--copy-gbs", type=float)
    parser.add_argument("--matmul-tflops", type=float)
    parser.add_argument("--providers")
    parser.add_argument("--arch", default=REPORT_ARCH)
    parser.add_argument("--only")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    return {"device": _device_worker, "bench": _bench_worker, "report": _report_worker}[args.worker](args)


# ----------------------------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    from .interpreter import configure_for_host

    configure_for_host()
    import torch

    return torch.cuda.is_available()


def _writable(out_dir: Path) -> Optional[str]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None


def _format_device(info: dict, env: dict) -> str:
    text = (f"{info.get('name', '?')} ({info.get('capability', '?')}, {info.get('sm_count', '?')} SMs, "
            f"{info.get('memory_gib', '?')} GiB, L2 {info.get('l2_mib', '?')} MiB); torch {info.get('torch', '?')} "
            f"(CUDA {info.get('cuda', '?')}), triton {info.get('triton', '?')}")
    if env.get("copy_bandwidth_gb_per_s"):
        text += (f"; measured copy {env['copy_bandwidth_gb_per_s']:.0f} GB/s, bf16 matmul "
                 f"{env['matmul_tflop_per_s']:.1f} TFLOP/s")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m genkernels.bench.gpu_session",
                                     description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the results go (created if missing)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"the whole command's wall-clock budget in seconds (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (budgets, resolved case names) and exit; needs no GPU")
    parser.add_argument("--only", metavar="PART[,PART]",
                        help=f"run a subset of the parts: {', '.join(SELECTABLE)} (the device part always runs)")
    parser.add_argument("--providers", metavar="LIST", help="benchmark only these providers, e.g. eager,triton")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv)
    args = parse_args(argv)
    started = time.monotonic()
    try:
        parts = selected_parts(args.only)
        plan_budgets(args.budget_s, parts)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        plan = build_plan(args.budget_s, args.only)
        print(format_plan(plan))
        print(f"\nOUT_DIR would be {Path(args.out_dir).resolve()}; nothing was run.")
        if plan.missing:
            print(f"error: {len(plan.missing)} planned pattern(s) match no case: "
                  + ", ".join(pattern for _, pattern in plan.missing), file=sys.stderr)
            return 3
        return 0
    out_dir = Path(args.out_dir).resolve()  # absolute: the tests part runs in the checkout's root
    problem = _writable(out_dir)
    if problem:
        print(f"error: OUT_DIR {out_dir} is not writable: {problem}", file=sys.stderr)
        return 2
    if not _cuda_available():
        print("error: no CUDA GPU here; this command runs on the GPU machine (use --dry-run to see its plan)",
              file=sys.stderr)
        return 2
    plan = build_plan(args.budget_s, args.only)
    print(format_plan(plan), flush=True)
    return Session(plan, out_dir, started, providers=args.providers).run()


class Session:
    def __init__(self, plan: Plan, out_dir: Path, started: float, providers: Optional[str] = None):
        self.plan, self.out_dir, self.started, self.providers = plan, out_dir, started, providers
        self.records: dict[str, dict] = {}
        self.device_info: dict = {}
        self.printed = 0  # bench cases reported on the terminal
        bench_parts = [part for part in plan.budgets if part in GROUPS_BY_PART]
        order = [name for part in bench_parts for name in plan.cases(part)]
        groups = {name: part for part in bench_parts for name in plan.cases(part)}
        self.bench = BenchState({}, order, groups)
        # deadline of each part: the schedule's cumulative budgets, so time left unused passes on; the time the
        # planning took (importing the registry) comes off every part in proportion
        now = time.monotonic()
        scale = max(0.0, plan.total_s - plan.reserve_s - (now - started)) / sum(plan.budgets.values())
        self.deadlines, elapsed = {}, 0.0
        for part, budget in plan.budgets.items():
            elapsed += budget * min(1.0, scale)
            self.deadlines[part] = now + elapsed

    def write_session(self) -> None:
        payload = {"budget_s": self.plan.total_s, "reserve_s": self.plan.reserve_s,
                   "elapsed_s": round(time.monotonic() - self.started, 1), "budgets_s": self.plan.budgets,
                   "device": self.device_info, "parts": self.records,
                   "planned": {part: found for part, found in self.plan.resolved.items()},
                   "unresolved_patterns": self.plan.missing}
        _write_atomic(self.out_dir / FILES["session"], json.dumps(payload, indent=1, default=str))

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f} s] {text}", flush=True)

    def run(self) -> int:
        for part, pattern in self.plan.missing:
            self.say(f"WARNING: {part}: the pattern {pattern!r} matches no case; it is left out")
        self.write_session()
        with tempfile.TemporaryDirectory(prefix="gpu-session-") as work:
            work_dir = Path(work)
            for part in self.plan.budgets:
                allowed = self.deadlines[part] - time.monotonic()
                self.say(f"{part}: up to {allowed:.0f} s")
                with open(self.out_dir / FILES["log"], "a") as log:
                    log.write(f"\n===== {part} (up to {allowed:.0f} s, at {time.monotonic() - self.started:.0f} s "
                              "of the session) =====\n")
                try:
                    if allowed < 1:  # the parts before ran over (each by its stopping grace at most)
                        record = self.skip_part(part)
                    else:
                        record = self.run_part(part, work_dir)
                except Exception as error:  # a part that breaks is reported; the parts after it still run
                        record = {"part": part, "status": f"failed: {type(error).__name__}: {error}"}
                record["allowed_s"] = round(allowed, 1)
                self.records[part] = record
                self.say(f"{part}: {record['status']}" + self.part_detail(record))
                self.write_session()
        entries = summarize(self.bench.rows, self.bench.case_list())
        if entries:
            print("\nSummary (best provider per case; speedups from the same run's medians)", flush=True)
            print(format_summary(entries))
        print(f"\nparts: " + ", ".join(f"{part} {record['status']}" for part, record in self.records.items()))
        print(f"files in {self.out_dir.resolve()}: "
              + ", ".join(sorted(path.name for path in self.out_dir.iterdir() if not path.name.startswith("."))))
        print(f"total {time.monotonic() - self.started:.0f} s of a budget of {self.plan.total_s:.0f} s", flush=True)
        return 0

    @staticmethod
    def part_detail(record: dict) -> str:
        if record.get("part") == "tests":
            return (f" ({record.get('passed', 0)} passed, {record.get('failed', 0)} failed, "
                    f"{record.get('error', 0)} errors, {record.get('skipped', 0)} skipped)")
        if "cases_done" in record:
            return f" ({record['cases_done']}/{record['cases']} cases done, {record['cases_failed']} failed)"
        if record.get("part") == "report":
            return f" ({record.get('cases_reported', 0)} cases reported)"
        return ""

    def skip_part(self, part: str) -> dict:
        for name in self.plan.cases(part) if part in GROUPS_BY_PART else []:
            self.bench.record(name, f"not run: no time left for {part}")
        if part in GROUPS_BY_PART:
            write_bench(self.out_dir, self.bench)
        return {"part": part, "status": "not run (no time left)"}

    def run_part(self, part: str, work_dir: Path) -> dict:
        deadline = self.deadlines[part]
        if part == "device":
            return self.run_device(deadline, work_dir)
        if part == "tests":
            return run_tests(self.out_dir, deadline, work_dir)
        if part == "report":
            return self.run_report(deadline, work_dir)
        group = GROUPS_BY_PART[part]

        def on_change() -> None:
            write_bench(self.out_dir, self.bench)
            for name in self.bench.recorded[self.printed:]:
                seconds = self.bench.seconds.get(name)
                self.say(f"  {name}: {self.bench.status[name]}" + (f" ({seconds:.0f} s)" if seconds else ""))
            self.printed = len(self.bench.recorded)

        return run_bench_group(
            part, self.plan.cases(part), deadline, min(group.case_cap_s, self.plan.budgets[part]), self.bench,
            work_dir=work_dir, on_change=on_change, log_path=self.out_dir / FILES["log"], env=_worker_env(),
            command=lambda names, events: _bench_command(names, events, self.bench.environment, self.providers))

    def run_device(self, deadline: float, work_dir: Path) -> dict:
        json_path, log_path = work_dir / "device.json", self.out_dir / FILES["log"]
        outcome = run_until(_worker_command("device", "--json", str(json_path)), deadline, log_path=log_path,
                            env=_worker_env())
        found = json.loads(json_path.read_text()) if json_path.exists() else {}
        self.device_info = found.get("device", {})
        self.bench.environment = found.get("environment") or {
            "device": self.device_info.get("name", "unknown"), "torch": self.device_info.get("torch"),
            "triton": self.device_info.get("triton"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "note": "the device's limits were not measured (the device part did not finish)"}
        if self.device_info:
            print(f"device: {_format_device(self.device_info, self.bench.environment)}", flush=True)
        record = {"part": "device", "seconds": round(outcome.seconds, 1)}
        if outcome.stopped:
            record["status"] = "stopped (budget)"
        elif outcome.returncode:
            record["status"] = f"failed (exit {outcome.returncode})"
            record["log_tail"] = _log_tail(log_path, 1500)
            print(record["log_tail"], flush=True)
        else:
            record["status"] = "completed"
        if self.bench.order:
            write_bench(self.out_dir, self.bench)
        return record

    def run_report(self, deadline: float, work_dir: Path) -> dict:
        names = self.plan.all_cases()
        rows = self.bench.rows
        if not any(part in GROUPS_BY_PART for part in self.plan.budgets):
            earlier = self.out_dir / FILES["bench_json"]  # --only report: join an earlier session's medians
            if earlier.exists():
                try:
                    rows = json.loads(earlier.read_text()).get("rows", [])
                except ValueError:
                    rows = []
        measured = {row.get("case") for row in rows if row.get("median_ms")}
        names = [name for name in names if name in measured] + [name for name in names if name not in measured]
        report, record = run_report_part(names, deadline, work_dir, log_path=self.out_dir / FILES["log"])
        joined = join_measured(report, rows)
        write_report(self.out_dir, report, joined, record)
        return record


def _bootstrap_package() -> None:
    """Run as a file (``python bench/gpu_session.py``) where the project is not installed, as on the GPU machine:
    make ``genkernels`` importable, for this process and the ones it starts, as a namespace of symbolic links to
    this checkout's ``kernels``, ``models`` and ``bench``."""
    try:
        import genkernels.bench  # noqa: F401  (installed: nothing to do)
        return
    except ImportError:
        pass
    import atexit
    import shutil

    for name in [name for name in sys.modules if name == "genkernels" or name.startswith("genkernels.")]:
        del sys.modules[name]  # a half-found namespace from the failed import
    root = Path(tempfile.mkdtemp(prefix="genkernels-path-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "genkernels").mkdir()
    for name in ("kernels", "models", "bench"):
        (root / "genkernels" / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])


if __name__ == "__main__":
    if not __package__:  # python bench/gpu_session.py: run the module inside its package
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        _bootstrap_package()
        from genkernels.bench.gpu_session import main as package_main

        sys.exit(package_main())
    sys.exit(main())
