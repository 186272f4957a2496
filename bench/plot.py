"""Bar charts of a benchmark results file: ``python -m genkernels.bench --plot RESULTS.json``.

Two PNG files per family of cases, named ``<results stem>_<family>_<chart>.png``, beside the JSON unless a folder
is given:

* ``speedup``: per case (one group of bars) and provider (one bar each), the speedup over eager and, where the rows
  have it, over ``torch.compile`` (one panel each, log axis, a line at 1x);
* ``limit``: per case and provider, the percentage of the device's measured copy bandwidth and of its measured
  matmul peak (one panel each, where the rows have them; a line at 100%).

Failed rows and missing figures draw no bar. Charts of a CPU run say that its timings are not performance
figures. matplotlib (the ``plot`` extra) is imported only here, on its Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

SPEEDUP_PANELS = (("speedup_vs_eager", "speedup over eager (x)"),
                  ("speedup_vs_compile", "speedup over torch.compile (x)"))
LIMIT_PANELS = (("pct_copy_bandwidth", "% of measured copy bandwidth"),
                ("pct_matmul_peak", "% of measured matmul peak"))
CHARTS = (("speedup", SPEEDUP_PANELS, 1.0, True), ("limit", LIMIT_PANELS, 100.0, False))
BAR_HEIGHT_INCHES = 0.22


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (``pip install genkernels[plot]``)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def load_results(path: str | Path) -> dict:
    """The results document at ``path`` (``environment`` and ``rows``, as :func:`genkernels.bench.report.
    write_results` writes it); a ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as a benchmark results JSON: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("rows"), list) \
            or not isinstance(document.get("environment"), dict):
        raise ValueError(f"{path} is not a benchmark results file: expected a JSON object with 'environment' and "
                         "'rows' (python -m genkernels.bench --json PATH)")
    return document


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text) or "cases"


def _title(family: str, environment: dict) -> str:
    title = (f"{family}: {environment.get('device', 'unknown device')}, torch {environment.get('torch', '?')}, "
             f"triton {environment.get('triton', '?')}")
    if environment.get("device_type") != "cuda":
        title += "\nCPU run in the Triton interpreter: these timings are NOT performance figures"
    return title


def _draw(path: Path, family: str, rows: list[dict], panels: list[tuple[str, str]], reference: float,
          log_scale: bool, environment: dict, colors: dict[str, str]) -> None:
    """One figure: a panel per metric, cases down the vertical axis, a bar per provider within each case (the
    cases and providers with a figure in some panel; ``colors`` keeps each provider's colour across charts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [row for row in rows if any(row.get(key) is not None for key, _ in panels)]
    cases = list(dict.fromkeys(row["case"] for row in rows))
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    value = {(row["case"], row["provider"], key): row.get(key) for row in rows for key, _ in panels}
    group = 0.8 / len(providers)
    height = BAR_HEIGHT_INCHES * len(cases) * len(providers) + 1.8
    figure = Figure(figsize=(6.0 * len(panels) + 3.0, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axis, (key, label) in zip(axes, panels):
        shown = [reference]
        for index, provider in enumerate(providers):
            positions, widths = [], []
            for position, case in enumerate(cases):
                figure_value = value.get((case, provider, key))
                if figure_value is not None and (figure_value > 0 or not log_scale):
                    positions.append(position - 0.4 + group * (index + 0.5))
                    widths.append(figure_value)
            shown += widths
            # ratios are bars from 1x (left of it: slower), percentages bars from 0
            start = reference if log_scale else 0.0
            bars = axis.barh(positions, [width - start for width in widths], left=start, height=group,
                             color=colors[provider], label=provider)
            axis.bar_label(bars, labels=[f"{width:.3g}" for width in widths], fontsize=6, padding=2)
        axis.axvline(reference, color="black", linewidth=0.8)
        axis.margins(x=0.08)  # room for the value labels
        if log_scale:
            axis.set_xscale("log")
            decades = math.log10(max(shown) / min(shown))  # 1-2-5 ticks only where they do not crowd
            axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
            axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(label)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cases)), cases, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7, loc="best")
    figure.suptitle(_title(family, environment), fontsize=9)
    figure.savefig(path, dpi=110)


def plot_results(path: str | Path, out_dir: Optional[str | Path] = None) -> list[Path]:
    """Write the charts of the results file ``path`` (see the module docstring) to ``out_dir`` (default: the
    file's folder, created if need be); returns the PNG paths written (none for charts without a figure)."""
    path = Path(path)
    document = load_results(path)
    out_dir = Path(out_dir) if out_dir is not None else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for row in document["rows"] if isinstance(row, dict) and not row.get("failure")
            and "case" in row and "provider" in row]
    colors = {provider: f"C{index % 10}" for index, provider in enumerate(dict.fromkeys(row["provider"]
                                                                                       for row in rows))}
    written = []
    for family in dict.fromkeys(row.get("family") or "cases" for row in rows):
        family_rows = [row for row in rows if (row.get("family") or "cases") == family]
        for chart, panels, reference, log_scale in CHARTS:
            shown = [(key, label) for key, label in panels if any(row.get(key) is not None for row in family_rows)]
            if not shown:
                continue
            target = out_dir / f"{path.stem}_{_slug(family)}_{chart}.png"
            _draw(target, family, family_rows, shown, reference, log_scale, document["environment"], colors)
            written.append(target)
    return written
