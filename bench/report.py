"""Reporting: a table per case on the terminal, a JSON file of every row, and a markdown summary beside it."""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path
from typing import Optional

import torch

from .runner import Row

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOT_PERFORMANCE = ("CPU run in Triton's interpreter at tiny sizes: these timings are NOT performance figures; "
                   "they only show that every case runs end to end.")

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


def environment(device: torch.device, copy_gbs: float, matmul_tflops: float, interpreted: bool) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'host'})"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gb_per_s": copy_gbs,
        "matmul_tflop_per_s": matmul_tflops,
        "triton_interpreter": interpreted,
        "note": NOT_PERFORMANCE if device.type != "cuda" else "medians of CUDA-event timings (triton do_bench)",
    }


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


def format_markdown(env: dict, rows: list[Row]) -> str:
    """The markdown summary: environment, then one line per (case, provider)."""
    lines = [f"# Benchmark results: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; measured copy bandwidth "
             f"{env['copy_bandwidth_gb_per_s']:.0f} GB/s, bf16 matmul {env['matmul_tflop_per_s']:.1f} TFLOP/s.", "",
             f"> {env['note']}", "",
             "| case | provider | " + " | ".join(title for key, title, _ in COLUMNS[1:]) + " |",
             "|---|---|" + "---|" * (len(COLUMNS) - 1)]
    for row in rows:
        cells = [_cell(row, key, fmt) for key, _, fmt in COLUMNS[1:]]
        provider = f"{row.provider} (failed: {row.failure})" if row.failure else row.provider
        lines.append(f"| {row.case} | {provider} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_results_path(env: dict) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    prefix = "cpu-interpreter" if env["triton_interpreter"] else slug
    return RESULTS_DIR / f"{prefix}_{stamp}.json"


def write_results(env: dict, rows: list[Row], path: Optional[Path] = None) -> tuple[Path, Path]:
    """Write the JSON of every row and the markdown summary beside it; returns both paths."""
    path = Path(path) if path is not None else default_results_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    summary = path.with_suffix(".md")
    summary.write_text(format_markdown(env, rows))
    return path, summary
