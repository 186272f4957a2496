"""The benchmark harness (bench/): registry, runner, report and the CLI, run at the CPU interpreter size."""
import json

import pytest
import torch

import genkernels.bench.__main__ as cli
from genkernels.bench import runner
from genkernels.bench.__main__ import exit_code, main
from genkernels.bench.providers import unavailable
from genkernels.bench.registry import Case, Workload, all_cases
from genkernels.bench.report import (
    COMMITTED_RESULTS_DIR,
    default_results_path,
    format_case_table,
    format_markdown,
    resources_paths,
)
from genkernels.bench.runner import Row, plan_providers, run_case
from genkernels.bench.timer import matmul_probe

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


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


def _toy_case(providers, reference=None, name="toy.add[1]", kind="op"):
    return Case(name, "toy", kind, {"n": 8},
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
    assert by_provider["triton"].first_call_s >= 0
    assert "toy.add[1]" in format_case_table(rows)


def test_runner_keeps_going_when_a_provider_fails():
    def broken():
        raise RuntimeError("kernel exploded")

    rows = run_case(_toy_case({"eager": lambda: torch.ones(2), "triton": broken}), CPU)
    failed = [row for row in rows if row.failure]
    assert len(failed) == 1 and "kernel exploded" in failed[0].failure and failed[0].median_ms is None
    assert "triton FAILED" in format_case_table(rows)
    assert exit_code(rows) == 1


# ---------------------------------------------------------------------------------------------------------------
# What runs where, decided before anything runs
# ---------------------------------------------------------------------------------------------------------------
def test_providers_that_cannot_exist_on_a_cpu_are_not_available():
    for name in ("sdpa_efficient", "sdpa_cudnn", "triton_cuda_graph", "cudnn"):
        assert unavailable(name, CPU), name
    for name in ("eager", "triton", "compile", "sdpa_math", "cached_eager", "cached_triton"):
        assert unavailable(name, CPU) is None, name
    # PyTorch has a CPU flash-attention kernel; where it exists the flash backend runs on the CPU
    assert (unavailable("sdpa_flash", CPU) is None) == hasattr(torch.ops.aten,
                                                                "_scaled_dot_product_flash_attention_for_cpu")
    assert unavailable("triton_cuda_graph", CUDA) is None and unavailable("sdpa_efficient", CUDA) is None


def test_plan_in_the_interpreter():
    op_names = ["triton", "eager", "compile", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"]
    plan = plan_providers("op", op_names, CPU, interpreted=True)
    assert plan.run == ["triton", "eager", "sdpa_math"]
    assert set(plan.not_available) == {"sdpa_efficient", "sdpa_cudnn"} and set(plan.skipped) == {"compile"}
    assert "compile" in plan_providers("op", op_names, CPU, requested=["compile"], interpreted=True).run

    model_names = ["eager", "triton", "triton_cuda_graph", "compile", "cached_eager", "cached_triton"]
    plan = plan_providers("sample", model_names, CPU, interpreted=True)
    assert plan.run == ["eager", "compile", "cached_eager"]
    assert set(plan.skipped) == {"triton", "cached_triton"} and set(plan.not_available) == {"triton_cuda_graph"}
    forced = plan_providers("train", model_names, CPU, interpreted=True, interpreter_models=True)
    assert forced.run == ["eager", "triton", "compile", "cached_eager", "cached_triton"]
    # on a GPU nothing is left out
    assert plan_providers("sample", model_names, CUDA).run == model_names


@pytest.fixture
def no_provider_runs(monkeypatch):
    """Replace running a case's providers with a record of which would run (no call, no timing)."""
    ran = []

    def record(case, workload, names, device, copy_gbs, matmul_tflops):
        ran.append((case.name, case.kind, list(names)))
        return [Row(case.name, case.family, case.kind, case.params, name, median_ms=1.0, max_error=0.0)
                for name in names]

    monkeypatch.setattr(runner, "_run_providers", record)
    return ran


def test_cpu_default_run_plan(tmp_path, monkeypatch, capsys, no_provider_runs):
    wanted = ("attention.decode[", "wavenet.causal_conv1d[", "diffusion.ddim_step[", "gpt.train[",
              "diffusion.unet_sample[ddim", "pixelcnn.sample[")
    picked = [case for case in all_cases("cpu") if case.name.startswith(wanted)]
    assert len(picked) == len(wanted)
    monkeypatch.setattr(cli, "all_cases", lambda size, pattern=None: picked)
    path = tmp_path / "plan.json"
    assert main(["--no-resources", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "not available here" in printed and "FAILED" not in printed
    assert printed.count("--interpreter-models runs them") == 1  # said once, in the header
    # op cases first, then the models with their eager and compile providers only
    kinds = [kind for _, kind, _ in no_provider_runs]
    assert kinds == sorted(kinds, key=lambda kind: kind != "op")
    for name, kind, names in no_provider_runs:
        if kind == "op":
            assert "triton" in names and "eager" in names and "compile" not in names, name
        else:
            assert names and not any("triton" in provider for provider in names), name
            assert set(names) <= {"eager", "compile", "cached_eager"}, name
    results = json.loads(path.read_text())
    assert results["complete"] is True
    assert {"sdpa_efficient", "sdpa_cudnn", "cudnn"} <= set(results["not_available"])
    assert results["not_available"]["cudnn"]["cases"] == [case.name for case in picked if "wavenet" in case.name]
    assert {"triton", "cached_triton", "compile"} <= set(results["skipped"])
    assert "Not available here" in path.with_suffix(".md").read_text()


def test_interpreter_models_flag_runs_the_triton_providers(tmp_path, monkeypatch, no_provider_runs):
    picked = all_cases("cpu", "gpt.train*")
    monkeypatch.setattr(cli, "all_cases", lambda size, pattern=None: picked)
    assert main(["--no-resources", "--interpreter-models", "--json", str(tmp_path / "r.json")]) == 0
    assert [names for _, _, names in no_provider_runs] == [["eager", "triton", "compile"]]


# ---------------------------------------------------------------------------------------------------------------
# Results on disk and the exit code
# ---------------------------------------------------------------------------------------------------------------
def test_a_stopped_run_leaves_valid_results_with_the_finished_cases(tmp_path, monkeypatch, capsys):
    def stopped(device):
        raise KeyboardInterrupt

    cases = [_toy_case({"eager": lambda: torch.ones(2)}, name="toy.first[1]"),
             Case("toy.second[1]", "toy", "op", {}, stopped)]
    monkeypatch.setattr(cli, "all_cases", lambda size, pattern=None: cases)
    path = tmp_path / "stopped.json"
    assert main(["--no-resources", "--json", str(path)]) == cli.EXIT_INTERRUPTED
    results = json.loads(path.read_text())
    assert results["complete"] is False
    assert [(row["case"], row["provider"]) for row in results["rows"]] == [("toy.first[1]", "eager")]
    assert "Incomplete run" in path.with_suffix(".md").read_text()
    assert not list(tmp_path.glob("*.partial"))


def test_results_default_to_bench_results_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"device": "NVIDIA H200", "date": "2026-01-02T03:04:05+00:00", "triton_interpreter": False}
    path = default_results_path(env)
    assert path.parent == tmp_path / "bench-results" and path.name == "nvidia-h200_20260102T030405.json"
    assert resources_paths(path) == (tmp_path / "bench-results" / "nvidia-h200_20260102T030405_resources.json",
                                     tmp_path / "bench-results" / "nvidia-h200_20260102T030405_resources.md")
    assert COMMITTED_RESULTS_DIR.name == "results" and COMMITTED_RESULTS_DIR.parent.name == "bench"


def test_exit_code_counts_only_providers_that_should_work():
    ok = Row("c", "f", "op", {}, "eager", median_ms=1.0)
    assert exit_code([]) == 0 and exit_code([ok]) == 0
    assert exit_code([ok, Row("c", "f", "op", {}, "triton", failure="RuntimeError: x")]) == 1
    assert exit_code([ok], report_failed=True) == 1


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    path = tmp_path / "results.json"
    assert main(["--only", "diffusion.ddim*", "--providers", "eager,triton", "--json", str(path),
                 "--no-resources"]) == 0
    printed = capsys.readouterr().out
    assert "NOT performance" in printed and "diffusion.ddim_step" in printed
    assert "fp32 matmul" in printed and "bf16 matmul" not in printed
    results = json.loads(path.read_text())
    env = results["environment"]
    assert env["triton_interpreter"] is True and "NOT performance" in env["note"]
    assert env["copy_bandwidth_gb_per_s"] > 0 and env["torch"] == torch.__version__
    rows = results["rows"]
    assert {row["provider"] for row in rows} == {"eager", "triton"}
    for row in rows:
        assert row["failure"] is None and row["median_ms"] > 0 and row["max_error"] < 1e-5
    assert "| diffusion.ddim_step" in path.with_suffix(".md").read_text()


def test_cpu_matmul_probe_says_what_it_measured():
    probe = matmul_probe(CPU)
    assert probe.what.startswith("fp32 matmul") and probe.value > 0
    assert "TFLOP/s" in str(probe) and " 0.0 " not in str(probe)


def test_cli_runs_the_compiled_code_report_after_the_op_tables(tmp_path, monkeypatch, capsys, no_provider_runs):
    calls = []

    def fake_report(arch, only, json_path, workers=None, triton_version=None):
        calls.append((arch, only, json_path) + ((triton_version,) if triton_version else ()))
        report = {"triton": "t", "arches": [arch], "rows": [], "cases": []}
        with open(json_path, "w") as file:
            json.dump(report, file)
        return report

    from genkernels.bench import resources

    monkeypatch.setattr(resources, "run_report", fake_report)
    picked = all_cases("cpu", "diffusion.ddim*") + all_cases("cpu", "gpt.train*")
    monkeypatch.setattr(cli, "all_cases", lambda size, pattern=None: picked)
    path = tmp_path / "r.json"
    assert main(["--json", str(path)]) == 0
    printed = capsys.readouterr().out
    # after the op tables (it runs beside the cases on a CPU and is printed once they and it are done)
    assert printed.index("(compiled-code report:") > printed.index("diffusion.ddim_step[")
    assert calls == [("sm_90", None, str(tmp_path / "r_resources.json"))]
    assert (tmp_path / "r_resources.md").exists()
    assert json.loads(path.read_text())["resources"] == str(tmp_path / "r_resources.json")

    calls.clear()
    only = tmp_path / "only.json"
    assert main(["--resources", "--arch", "sm_80,sm_90", "--only", "attention.*", "--json", str(only)]) == 0
    assert calls == [("sm_80,sm_90", "attention.*", str(only))] and only.with_suffix(".md").exists()

    calls.clear()
    assert main(["--resources", "--triton", "3.6.0", "--only", "attention.*", "--json", str(only)]) == 0
    assert calls == [("sm_90", "attention.*", str(only), "3.6.0")]


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
    assert main(["--only", "diffusion.ddim*", "--providers", "no-such-provider", "--json", str(path),
                 "--no-resources"]) == 0
    assert "has none of the providers no-such-provider" in capsys.readouterr().out


def test_cli_without_json_writes_into_bench_results_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "all_cases", lambda size, pattern=None: [_toy_case({"eager": lambda: torch.ones(2)})])
    assert main(["--no-resources"]) == 0
    files = sorted(path.name for path in (tmp_path / "bench-results").iterdir())
    written = [name for name in files if name.endswith((".json", ".md"))]
    assert len(written) == 2 and written[0].endswith(".json") and written[1].endswith(".md")
    assert json.loads((tmp_path / "bench-results" / written[0]).read_text())["rows"][0]["case"] == "toy.add[1]"
    charts = [name for name in files if name.endswith(".png")]  # drawn beside the JSON (matplotlib is installed)
    assert sorted(name.rsplit("_", 1)[1] for name in charts) == ["limit.png", "speedup.png"]
