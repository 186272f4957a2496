"""``python -m genkernels.bench``: run the benchmark suite, print a table per case, write JSON and markdown.

On a machine without a GPU the suite is a smoke check: the op cases run the Triton kernels in Triton's CPU
interpreter at tiny sizes (their max-error column is what counts; the timings are not performance figures), the
model cases run their eager and compile providers only (``--interpreter-models`` adds the Triton ones), and the
compiled-code report for sm_90 (registers, shared memory, instruction mix, roofline floors) follows the op tables.
Providers that cannot exist on the device are listed once as not available here.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .interpreter import configure_for_host, enable_interpreter_checks

INTERPRETED = configure_for_host()

import torch  # noqa: E402

from .registry import Case, all_cases  # noqa: E402
from .report import (  # noqa: E402
    NOT_PERFORMANCE,
    default_results_dir,
    default_results_path,
    environment,
    format_case_table,
    format_left_out,
    probes_line,
    resources_paths,
    write_results,
)
from .runner import (  # noqa: E402
    INTERPRETER_MODELS_SKIPPED,
    INTERPRETER_OPS_COMPILE_SKIPPED,
    Row,
    run_planned,
)
from .timer import copy_bandwidth_probe, matmul_probe  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_NO_CASE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_ARCH = "sm_90"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m genkernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and dtypes (on a GPU)")
    parser.add_argument("--only", metavar="PATTERN", help="run the cases whose name matches (glob or substring)")
    parser.add_argument("--providers", metavar="LIST", help="comma-separated providers, e.g. eager,triton")
    parser.add_argument("--json", metavar="PATH",
                        help="results file (default: ./bench-results/<device>_<date>.json; the report's files "
                             "go beside it as <name>_resources.json/.md)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--interpreter-models", action="store_true",
                        help="without a GPU, also run whole models (train/sample cases) through the Triton "
                             "providers in the interpreter (minutes per call)")
    report = parser.add_mutually_exclusive_group()
    report.add_argument("--resources", action="store_true",
                        help="only the compiled-code report (no timing): registers, shared memory, instruction "
                             "mix and roofline floors per kernel launch")
    report.add_argument("--no-resources", action="store_true", help="skip the compiled-code report")
    parser.add_argument("--arch", default=DEFAULT_ARCH, metavar="LIST",
                        help=f"architectures of the compiled-code report, e.g. sm_90,sm_80,sm_86,sm_89 "
                             f"(default {DEFAULT_ARCH})")
    parser.add_argument("--triton", metavar="VERSION",
                        help="compile the report with this Triton release instead of the installed one (e.g. "
                             "3.6.0, installed once into ~/.cache/genkernels; the timed cases are unaffected)")
    parser.add_argument("--plot", metavar="RESULTS_JSON",
                        help="only draw the speedup and %%-of-limit bar charts of a results file (PNG, needs "
                             "matplotlib: the plot extra) and exit; a run draws those of its own results")
    parser.add_argument("--plot-dir", metavar="DIR",
                        help="folder of the charts (default: beside the results JSON)")
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


def ordered(cases: list[Case]) -> list[Case]:
    """Op cases first, then the whole models, each in registry order."""
    return [case for case in cases if case.kind == "op"] + [case for case in cases if case.kind != "op"]


def exit_code(rows: list[Row], report_failed: bool = False) -> int:
    """1 if a provider that should work here failed (or the compiled-code report did), else 0. Providers that
    cannot exist on the device, or that the run leaves out, have no rows and never count."""
    return EXIT_FAILED if report_failed or any(row.failure for row in rows) else EXIT_OK


class Results:
    """Everything the run has measured so far, rewritten to disk after every case."""

    def __init__(self, env: dict, path: Optional[str]):
        self.env, self.rows = env, []
        self.path = Path(path) if path else default_results_path(env)
        self.not_available: dict[str, dict] = {}
        self.skipped: dict[str, dict] = {}
        self.resources: Optional[str] = None
        self.resources_error: Optional[str] = None
        self.complete = False

    def add(self, case: Case, rows: list[Row], plan) -> None:
        self.rows += rows
        for bucket, left_out in ((self.not_available, plan.not_available), (self.skipped, plan.skipped)):
            for provider, reason in left_out.items():
                bucket.setdefault(provider, {"reason": reason, "cases": []})["cases"].append(case.name)
        self.write()

    def summary(self) -> dict:
        return {"complete": self.complete, "not_available": self.not_available, "skipped": self.skipped,
                "resources": self.resources, "resources_error": self.resources_error}

    def write(self) -> tuple[Path, Path]:
        return write_results(self.env, self.rows, self.path, self.summary())


class Report:
    """The compiled-code report (:func:`genkernels.bench.resources.run_report`: a subprocess without the
    interpreter), built in a thread so that on a CPU it overlaps the cases; printed and saved (JSON and markdown at
    ``json_path``) once done."""

    def __init__(self, arch: str, only: Optional[str], json_path: Path, triton_version: Optional[str] = None):
        self.arch, self.only, self.json_path = arch, only, Path(json_path)
        self.triton_version = triton_version
        self.report: Optional[dict] = None
        self.error: Optional[str] = None
        self.seconds: Optional[float] = None
        self.printed = False
        self._thread = threading.Thread(target=self._build, name="compiled-code report", daemon=True)

    def _build(self) -> None:
        from . import resources

        start = time.perf_counter()
        try:
            self.report = resources.run_report(self.arch, self.only, str(self.json_path),
                                               triton_version=self.triton_version)
            self.json_path.with_suffix(".md").write_text(resources.format_markdown(self.report))
        except Exception as error:  # the timing results stand without it; the exit code says it failed
            self.error = f"{type(error).__name__}: {error}"
        self.seconds = time.perf_counter() - start

    def start(self) -> "Report":
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def started(self) -> bool:
        return self._thread.ident is not None

    def done(self) -> bool:
        return self.started() and not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()

    def print(self) -> None:
        """Print the report (waiting for it if need be), once."""
        from . import resources

        if self.printed:
            return
        self.wait()
        self.printed = True
        print(f"compiled-code report for {self.arch} (static figures from the compiled kernels, never speed; "
              f"roofline floor = max(bytes / bandwidth, FLOPs / peak) of the GPU-size case):")
        if self.error:
            print(f"the compiled-code report failed after {self.seconds:.0f}s: {self.error}\n", flush=True)
            return
        print(resources.format_report(self.report))
        print(f"\n(compiled-code report: {self.seconds:.0f}s; wrote {self.json_path} and "
              f"{self.json_path.with_suffix('.md')})\n", flush=True)

    def stop(self) -> None:
        """End the report's worker process group if it is still running (a stopped run)."""
        if not self.started() or self.done():
            return
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                command = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid() and b"genkernels.bench.resources" in command:
                try:
                    os.killpg(int(stat.parent.name), signal.SIGKILL)  # its own session: the worker and its pool
                except (ProcessLookupError, PermissionError):
                    pass


def write_plots(json_path: Path, plot_dir: Optional[str]) -> bool:
    """Draw the charts of the results at ``json_path`` (:mod:`genkernels.bench.plot`) and say where they went, or
    say that matplotlib is missing; returns whether they were drawn."""
    from . import plot

    if not plot.matplotlib_available():
        print("no charts: matplotlib is not installed (pip install 'genkernels[plot]')")
        return False
    written = plot.plot_results(json_path, plot_dir)
    print("wrote charts " + ", ".join(map(str, written)) if written else f"no charts: {json_path} has no figures")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        if not Path(args.plot).is_file():
            print(f"--plot {args.plot}: no such results file", file=sys.stderr)
            return EXIT_FAILED
        try:
            return EXIT_OK if write_plots(Path(args.plot), args.plot_dir) else EXIT_FAILED
        except ValueError as error:  # not a results file
            print(f"--plot: {error}", file=sys.stderr)
            return EXIT_FAILED
    if INTERPRETED:
        enable_interpreter_checks()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.resources:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = Path(args.json) if args.json else default_results_dir() / f"resources_{stamp}.json"
        report = Report(args.arch, args.only, path, args.triton).start()
        try:
            report.print()
        except KeyboardInterrupt:
            report.stop()
            return EXIT_INTERRUPTED
        return EXIT_FAILED if report.error else EXIT_OK
    size = "cpu" if device.type != "cuda" else ("quick" if args.quick else "full")
    cases = ordered(all_cases(size, args.only))
    if args.list:
        print("\n".join(case.name for case in cases))
        return EXIT_OK
    if not cases:
        print(f"no case matches {args.only!r}; see --list", file=sys.stderr)
        return EXIT_NO_CASE
    providers = args.providers.split(",") if args.providers else None
    if device.type != "cuda":
        print(f"NOTE: {NOT_PERFORMANCE}")
        if not args.interpreter_models and any(case.kind != "op" for case in cases):
            print(f"NOTE: {INTERPRETER_MODELS_SKIPPED}.")
        if providers is None and any(case.kind == "op" for case in cases):
            print(f"NOTE: {INTERPRETER_OPS_COMPILE_SKIPPED}.")
        print()
    copy, matmul = copy_bandwidth_probe(device), matmul_probe(device)
    env = environment(device, copy, matmul, INTERPRETED)
    probes = probes_line(env) + (" (host figures, not the roofline of anything here)" if device.type != "cuda"
                                 else "")
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; {probes}\n")
    results = Results(env, args.json)
    progress = Progress(len(cases))
    report = None
    if not args.no_resources:
        # on a CPU the report's subprocess overlaps the cases (their timings are no figures there); on a GPU it
        # starts after the last op case, so that nothing competes with the timed ones
        report = Report(args.arch, args.only, resources_paths(results.path)[0], args.triton)
        if device.type != "cuda":
            report.start()
    try:
        for index, case in enumerate(cases):
            if progress.tty:
                progress.show(case.name)
            outcome = run_planned(case, device, providers=providers, copy_gbs=copy.value,
                                  matmul_tflops=matmul.value, interpreted=INTERPRETED,
                                  interpreter_models=args.interpreter_models)
            results.add(case, outcome.rows, outcome.plan)
            progress.done += 1
            progress.show(case.name)
            progress.finish()
            if outcome.rows:
                print(format_case_table(outcome.rows) + "\n", flush=True)
            elif not (outcome.plan.not_available or outcome.plan.skipped):
                print(f"{case.name}: has none of the providers {', '.join(providers or [])}\n", flush=True)
            else:
                left_out = sorted({**outcome.plan.not_available, **outcome.plan.skipped})
                print(f"{case.name}: nothing to run here (left out: {', '.join(left_out)})\n", flush=True)
            # the report comes after the op tables: printed at the first case boundary after them where it is done
            ops_done = index + 1 == len(cases) or cases[index + 1].kind != "op"
            if report is not None and ops_done:
                if not report.started():
                    report.start().wait()
                if report.done() and not report.printed:
                    report.print()
                    results.resources_error = report.error
                    results.resources = None if report.error else str(report.json_path)
                    results.write()
        if report is not None and not report.printed:
            report.print()
            results.resources_error = report.error
            results.resources = None if report.error else str(report.json_path)
    except KeyboardInterrupt:
        if report is not None:
            report.stop()
        json_path, markdown_path = results.write()
        print(f"\nstopped: wrote the {len(results.rows)} rows finished so far to {json_path} and {markdown_path}")
        return EXIT_INTERRUPTED
    results.complete = True
    json_path, markdown_path = results.write()
    for key, title in (("not_available", "not available here (these providers cannot exist on this device):"),
                       ("skipped", "left out of this run:")):
        text = format_left_out(getattr(results, key), title)
        if text:
            print(text + "\n")
    failures = [row for row in results.rows if row.failure]
    if failures:
        print(f"{len(failures)} provider(s) FAILED: " + ", ".join(f"{row.case} {row.provider}" for row in failures))
    print(f"wrote {json_path} and {markdown_path}")
    write_plots(json_path, args.plot_dir)
    return exit_code(results.rows, results.resources_error is not None)


if __name__ == "__main__":
    sys.exit(main())
