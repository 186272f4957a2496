"""``python -m genkernels.bench``: run the benchmark suite, print a table per case, write JSON and markdown.

On a machine without a GPU the suite runs the Triton kernels in Triton's CPU interpreter at tiny sizes; it says so
and its timings are not performance figures.
"""
from __future__ import annotations

import argparse
import sys
import time

from .interpreter import configure_for_host, enable_interpreter_checks

INTERPRETED = configure_for_host()

import torch  # noqa: E402

from .registry import all_cases  # noqa: E402
from .report import NOT_PERFORMANCE, environment, format_case_table, write_results  # noqa: E402
from .runner import run_case  # noqa: E402
from .timer import copy_bandwidth_gbs, matmul_tflops  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m genkernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and dtypes (on a GPU)")
    parser.add_argument("--only", metavar="PATTERN", help="run the cases whose name matches (glob or substring)")
    parser.add_argument("--providers", metavar="LIST", help="comma-separated providers, e.g. eager,triton")
    parser.add_argument("--json", metavar="PATH", help="results file (default: bench/results/<device>_<date>.json)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


class Progress:
    """A one-line progress bar on stderr (a plain line per case when stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, label: str) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        text = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        sys.stderr.write(("\r\x1b[K" + text) if self.tty else text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if INTERPRETED:
        enable_interpreter_checks()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "cpu" if device.type != "cuda" else ("quick" if args.quick else "full")
    cases = all_cases(size, args.only)
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    if not cases:
        print(f"no case matches {args.only!r}; see --list", file=sys.stderr)
        return 2
    providers = args.providers.split(",") if args.providers else None
    if device.type != "cuda":
        print(f"NOTE: {NOT_PERFORMANCE}\n")
    copy_gbs, peak_tflops = copy_bandwidth_gbs(device), matmul_tflops(device)
    env = environment(device, copy_gbs, peak_tflops, INTERPRETED)
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; copy bandwidth {copy_gbs:.0f} GB/s, "
          f"matmul {peak_tflops:.1f} TFLOP/s\n")
    rows = []
    progress = Progress(len(cases))
    for case in cases:
        if progress.tty:
            progress.show(case.name)
        case_rows = run_case(case, device, providers=providers, copy_gbs=copy_gbs, matmul_tflops=peak_tflops)
        progress.done += 1
        progress.show(case.name)
        progress.finish()
        if case_rows:
            print(format_case_table(case_rows) + "\n", flush=True)
        else:
            print(f"{case.name}: has none of the providers {', '.join(providers)}\n", flush=True)
        rows += case_rows
    json_path, markdown_path = write_results(env, rows, args.json)
    print(f"wrote {json_path} and {markdown_path}")
    failures = [row for row in rows if row.failure]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
