"""Benchmark charts (genkernels.bench.plot and ``python -m genkernels.bench --plot``)."""
import json

import pytest

from genkernels.bench import plot
from genkernels.bench.__main__ import EXIT_FAILED, EXIT_OK, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(case, family, provider, **figures):
    """A results row as genkernels.bench.report writes it (the fields the charts read, the rest None)."""
    fields = dict(case=case, family=family, kind="op", params={}, provider=provider, median_ms=1.0,
                  gb_per_s=None, pct_copy_bandwidth=None, tflop_per_s=None, pct_matmul_peak=None,
                  speedup_vs_eager=None, speedup_vs_compile=None, max_error=0.0, notes="", failure=None)
    fields.update(figures)
    return fields


def write_results(path, rows, device_type="cuda"):
    environment = {"device": "NVIDIA H200", "device_type": device_type, "torch": "2.11.0", "triton": "3.6.0"}
    path.write_text(json.dumps({"environment": environment, "complete": True, "rows": rows}))
    return path


ROWS = [
    row("diffusion.ddpm_step[bf16]", "diffusion", "eager", speedup_vs_eager=1.0, pct_copy_bandwidth=20.0),
    row("diffusion.ddpm_step[bf16]", "diffusion", "triton", speedup_vs_eager=4.2, pct_copy_bandwidth=88.0),
    row("diffusion.ddpm_step[bf16]", "diffusion", "compile", failure="RuntimeError: boom"),
    row("attention.flash[fwd]", "attention", "triton", speedup_vs_eager=3.0, pct_matmul_peak=55.0),
    row("attention.flash[fwd]", "attention", "sdpa_flash", speedup_vs_eager=2.5, pct_matmul_peak=48.0),
    row("vae.train[b64]", "vae", "triton", kind="train", speedup_vs_eager=1.4, speedup_vs_compile=1.1),
]


def test_plot_results_writes_a_png_per_family_and_chart(tmp_path):
    results = write_results(tmp_path / "run.json", ROWS)
    written = plot.plot_results(results)
    names = sorted(path.name for path in written)
    # the model family has speedups but no %-of-limit figure, so no limit chart
    assert names == ["run_attention_limit.png", "run_attention_speedup.png", "run_diffusion_limit.png",
                     "run_diffusion_speedup.png", "run_vae_speedup.png"]
    for path in written:
        assert path.parent == tmp_path and path.read_bytes()[:8] == PNG_SIGNATURE


def test_cli_plot_writes_into_the_plot_dir(tmp_path, capsys):
    results = write_results(tmp_path / "cpu.json", ROWS[:2], device_type="cpu")
    assert main(["--plot", str(results), "--plot-dir", str(tmp_path / "charts")]) == EXIT_OK
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["cpu_diffusion_limit.png",
                                                                       "cpu_diffusion_speedup.png"]
    assert "wrote charts" in capsys.readouterr().out


def test_cli_plot_refuses_a_file_that_is_not_results(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"rows": "nope"}))
    assert main(["--plot", str(tmp_path / "other.json")]) == EXIT_FAILED
    assert "not a benchmark results file" in capsys.readouterr().err
    assert main(["--plot", str(tmp_path / "missing.json")]) == EXIT_FAILED
    assert "no such results file" in capsys.readouterr().err


def test_without_matplotlib_the_run_says_so(tmp_path, capsys, monkeypatch):
    results = write_results(tmp_path / "run.json", ROWS)
    monkeypatch.setattr(plot, "matplotlib_available", lambda: False)
    assert main(["--plot", str(results)]) == EXIT_FAILED
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_load_results_names_the_unreadable_file(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        plot.load_results(tmp_path / "broken.json")
