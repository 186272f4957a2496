"""Reporting: a table per case on the terminal, a JSON file of every row, and a markdown summary beside it.

Results go to ``./bench-results/`` in the current directory unless a path is given; ``bench/results/`` in the
repository holds the committed GPU results. Both files are rewritten after every case, each by an atomic rename, so
a run that is stopped leaves valid files with every case finished so far (``"complete": false``).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from .runner import Row

COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent / "results"  # GPU results committed to the repository
RESULTS_DIR_NAME = "bench-results"
NOT_PERFORMANCE = ("CPU run in Triton's interpreter at tiny sizes: these timings are NOT performance figures; "
                   "they only show that every case runs end to end, and the max-error column checks each provider "
                   "against the case's reference.")


def default_results_dir() -> Path:
    """``./bench-results`` in the current directory (not the installed package's folder)."""
    return Path.cwd() / RESULTS_DIR_NAME

COLUMNS = [
    ("provider", "provider", "{}"),
    ("median_ms", "ms", "{:.4f}"),
    ("speedup_vs_eager", "x eager", "{:.2f}"),
    ("speedup_vs_compile", "x compile", "{:.2f}"),
    ("gb_per_s", "GB/s", "{:.0f}"),
    ("pct_copy_bandwidth", "% copy BW", "{:.0f}%"),
    ("tflop_per_s", "TFLOP/s", "{:.1f}"),
    ("items_per_s", "items/s", "{:.1f}"),
    ("max_error", "max err", "{:.2e}"),
    ("peak_memory_mib", "peak MiB", "{:.0f}"),
]


def environment(device: torch.device, copy, matmul, interpreted: bool) -> dict:
    """The run's environment; ``copy`` and ``matmul`` are the measured :class:`~genkernels.bench.timer.Probe`s."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'host'})"
    return {
        "device": name,
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gb_per_s": copy.value,
        "copy_probe": copy.what,
        "matmul_tflop_per_s": matmul.value,
        "matmul_probe": matmul.what,
        "triton_interpreter": interpreted,
        "note": NOT_PERFORMANCE if device.type != "cuda" else "medians of CUDA-event timings (triton do_bench)",
    }


def probes_line(env: dict) -> str:
    """What the copy and matmul probes measured, e.g. ``fp32 matmul 512x512x512: 0.0312 TFLOP/s``."""
    copy_what = env.get("copy_probe", "copy")
    matmul_what = env.get("matmul_probe", "matmul")
    return (f"{copy_what}: {env['copy_bandwidth_gb_per_s']:.3g} GB/s, "
            f"{matmul_what}: {env['matmul_tflop_per_s']:.3g} TFLOP/s")


def _cell(row: Row, key: str, fmt: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "-"
    return fmt.format(value)


def format_case_table(rows: list[Row]) -> str:
    """A plain-text table of one case's rows."""
    shown = [(key, title, fmt) for key, title, fmt in COLUMNS if any(getattr(r, key) is not None for r in rows)]
    cells = [[title for _, title, _ in shown]]
    for row in rows:
        cells.append([row.failure and f"{row.provider} FAILED" or _cell(row, k, f) for k, _, f in shown[:1]]
                     + [_cell(row, k, f) for k, _, f in shown[1:]])
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    lines = [f"{rows[0].case}  {rows[0].params}" + (f"  ({rows[0].notes})" if rows[0].notes else "")]
    for index, line in enumerate(cells):
        lines.append("  " + "  ".join(text.rjust(width) for text, width in zip(line, widths)))
        if index == 0:
            lines.append("  " + "  ".join("-" * width for width in widths))
    lines += [f"  {row.provider}: {row.failure}" for row in rows if row.failure]
    return "\n".join(lines)


def format_left_out(left_out: dict, title: str) -> str:
    """``left_out`` is ``{provider: {"reason": ..., "cases": [...]}}``: one line per provider."""
    if not left_out:
        return ""
    lines = [title]
    for provider, entry in sorted(left_out.items()):
        count = len(entry["cases"])
        lines.append(f"  {provider}: {entry['reason']} ({count} case{'s' if count != 1 else ''})")
    return "\n".join(lines)


def format_markdown(env: dict, rows: list[Row], summary: Optional[dict] = None) -> str:
    """The markdown summary: environment, then one line per (case, provider), then what was left out."""
    summary = summary or {}
    lines = [f"# Benchmark results: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; {probes_line(env)}.", "",
             f"> {env['note']}", ""]
    if summary.get("complete") is False:
        lines += ["**Incomplete run**: the cases below are those finished before it stopped.", ""]
    lines += [
             "| case | provider | " + " | ".join(title for key, title, _ in COLUMNS[1:]) + " |",
             "|---|---|" + "---|" * (len(COLUMNS) - 1)]
    for row in rows:
        cells = [_cell(row, key, fmt) for key, _, fmt in COLUMNS[1:]]
        provider = f"{row.provider} (failed: {row.failure})" if row.failure else row.provider
        lines.append(f"| {row.case} | {provider} | " + " | ".join(cells) + " |")
    for key, title in (("not_available", "Not available here"), ("skipped", "Left out of this run")):
        if summary.get(key):
            lines += ["", f"## {title}", ""]
            lines += [f"- `{provider}`: {entry['reason']} ({len(entry['cases'])} cases)"
                      for provider, entry in sorted(summary[key].items())]
    if summary.get("resources"):
        lines += ["", f"Compiled-code report: `{summary['resources']}`"]
    return "\n".join(lines) + "\n"


def default_results_path(env: dict, directory: Optional[Path] = None) -> Path:
    """``<directory or ./bench-results>/<device>_<date>.json``."""
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    prefix = "cpu-interpreter" if env["triton_interpreter"] else slug
    return (directory if directory is not None else default_results_dir()) / f"{prefix}_{stamp}.json"


def resources_paths(path: Path) -> tuple[Path, Path]:
    """The compiled-code report's JSON and markdown beside the timing results at ``path``."""
    path = Path(path)
    stem = path.with_suffix("")
    return stem.with_name(stem.name + "_resources.json"), stem.with_name(stem.name + "_resources.md")


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_results(env: dict, rows: list[Row], path: Optional[Path] = None,
                  summary: Optional[dict] = None) -> tuple[Path, Path]:
    """Write the JSON of every row and the markdown summary beside it; returns both paths. ``summary`` adds what
    the run left out and whether it is complete (see the CLI); each file is replaced whole, never half-written."""
    path = Path(path) if path is not None else default_results_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"environment": env, **(summary or {}), "rows": [dataclasses.asdict(r) for r in rows]}
    _write_atomically(path, json.dumps(document, indent=1, default=str))
    markdown = path.with_suffix(".md")
    _write_atomically(markdown, format_markdown(env, rows, summary))
    return path, markdown
