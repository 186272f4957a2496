"""The benchmark harness (bench/): registry, runner, report and the CLI, run at the CPU interpreter size."""
import json

import pytest
import torch

from genkernels.bench.__main__ import main
from genkernels.bench.registry import Case, Workload, all_cases
from genkernels.bench.report import format_case_table, format_markdown
from genkernels.bench.runner import run_case

CPU = torch.device("cpu")


def test_registry_has_the_diffusion_cases_and_filters_by_pattern():
    names = [case.name for case in all_cases("cpu")]
    assert any(name.startswith("diffusion.ddpm_step[") for name in names)
    assert any(name.startswith("diffusion.ddim_step[") for name in names)
    only = all_cases("cpu", "diffusion.ddim*")
    assert only and all(case.name.startswith("diffusion.ddim") for case in only)
    assert all_cases("cpu", "drawn_noise") and not all_cases("cpu", "no-such-case")
    with pytest.raises(ValueError, match="size='huge'"):
        all_cases("huge")


def test_denoise_step_gpu_sizes_cover_4m_to_64m_elements():
    numels = {torch.Size(case.params["shape"]).numel() for case in all_cases("full", "diffusion.dd?m_step*")}
    assert min(numels) == 4 * 2**20 and max(numels) == 64 * 2**20


def _toy_case(providers, reference=None):
    return Case("toy.add[1]", "toy", "op", {"n": 8},
                lambda device: Workload(providers, bytes_moved=96, reference=reference, notes="toy"))


def test_runner_reports_errors_speedups_and_bandwidth():
    x = torch.arange(8.0)
    case = _toy_case({"eager": lambda: x + 1, "triton": lambda: x + 1.5}, reference=lambda: (x + 1).double())
    rows = run_case(case, CPU, copy_gbs=100.0)
    by_provider = {row.provider: row for row in rows}
    assert by_provider["eager"].max_error == 0.0
    assert by_provider["triton"].max_error == pytest.approx(0.5)
    assert by_provider["eager"].speedup_vs_eager == pytest.approx(1.0)
    assert by_provider["triton"].gb_per_s == pytest.approx(96 / (by_provider["triton"].median_ms / 1e3) / 1e9)
    assert by_provider["triton"].pct_copy_bandwidth == pytest.approx(by_provider["triton"].gb_per_s)
    assert "toy.add[1]" in format_case_table(rows)


def test_runner_keeps_going_when_a_provider_fails():
    def broken():
        raise RuntimeError("kernel exploded")

    rows = run_case(_toy_case({"eager": lambda: torch.ones(2), "triton": broken}), CPU)
    failed = [row for row in rows if row.failure]
    assert len(failed) == 1 and "kernel exploded" in failed[0].failure and failed[0].median_ms is None
    assert "triton FAILED" in format_case_table(rows)


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    path = tmp_path / "results.json"
    assert main(["--only", "diffusion.ddim*", "--providers", "eager,triton", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "NOT performance" in printed and "diffusion.ddim_step" in printed
    results = json.loads(path.read_text())
    env = results["environment"]
    assert env["triton_interpreter"] is True and "NOT performance" in env["note"]
    assert env["copy_bandwidth_gb_per_s"] > 0 and env["torch"] == torch.__version__
    rows = results["rows"]
    assert {row["provider"] for row in rows} == {"eager", "triton"}
    for row in rows:
        assert row["failure"] is None and row["median_ms"] > 0 and row["max_error"] < 1e-5
    assert "| diffusion.ddim_step" in path.with_suffix(".md").read_text()


def test_cli_lists_cases_and_rejects_unknown_patterns(capsys):
    assert main(["--list"]) == 0
    assert "diffusion.ddpm_step" in capsys.readouterr().out
    assert main(["--only", "no-such-case"]) == 2


def test_markdown_marks_failed_providers():
    rows = run_case(_toy_case({"eager": lambda: torch.ones(2)}), CPU)
    env = {"device": "CPU", "torch": "t", "triton": "t", "date": "d", "copy_bandwidth_gb_per_s": 1.0,
           "matmul_tflop_per_s": 1.0, "note": "n"}
    assert "| toy.add[1] | eager |" in format_markdown(env, rows)


def test_cli_reports_a_case_without_the_requested_providers(tmp_path, capsys):
    path = tmp_path / "results.json"
    assert main(["--only", "diffusion.ddim*", "--providers", "no-such-provider", "--json", str(path)]) == 0
    assert "has none of the providers no-such-provider" in capsys.readouterr().out
