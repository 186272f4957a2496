"""The pieces of the compiled-code report that need no compile: budgets over rows, exemptions scoped by Triton
release, the partial (shared-memory-only) rows, and the cache of other Triton releases."""
from __future__ import annotations

import pytest

from genkernels.bench import triton_versions
from genkernels.bench.budgets import Exemption, check_rows
from genkernels.bench.resources import format_markdown, format_report


def _row(**overrides) -> dict:
    row = {"case": "c[x]", "provider": "triton", "arch": "sm_90", "triton": "3.9.0", "kernel": "_k_kernel",
           "config": "fp16 BLOCK=1024 w4 s3", "num_warps": 4, "num_stages": 3, "ctas": 1056, "grid": [1056, 1, 1],
           "dot_dtypes": ["fp16"], "registers": 32, "stack_bytes": 0, "local_bytes": 0, "local_loads": 0,
           "local_stores": 0, "shared_bytes": 0, "hgmma": 0, "hmma": 0, "ffma": 0, "tma": 0, "cp_async": 0,
           "global_load_widths": {"16": 2}, "global_store_widths": {"16": 1}, "div64_in_loops": 0,
           "fits_shared_memory": True, "ctas_per_sm": 8, "occupancy_limiter": "warps", "waves": 1.0,
           "wave_efficiency": 1.0}
    row.update(overrides)
    return row


def test_a_row_within_every_budget_has_no_finding():
    assert check_rows([_row()], ()) == []


def test_each_budget_catches_its_own_defect():
    cases = {"no_spills": _row(stack_bytes=8), "wide_global_access": _row(global_load_widths={"2": 4}),
             "occupancy": _row(ctas_per_sm=1), "wave_efficiency": _row(waves=1.3, wave_efficiency=0.65),
             "no_div64_in_loops": _row(div64_in_loops=2), "fits_shared_memory": _row(fits_shared_memory=False),
             "warpgroup_mma": _row(hmma=8, ctas_per_sm=2)}
    for budget, row in cases.items():
        assert budget in {finding.budget.name for finding in check_rows([row], ())}, budget


def test_an_exemption_scoped_to_a_triton_release_covers_that_release_only():
    exemption = Exemption("no_spills", "_k_*", "spills under this release only", triton="3.6.*")
    old, new = _row(stack_bytes=32, triton="3.6.0"), _row(stack_bytes=32, triton="3.9.0")
    assert [f.exemption for f in check_rows([old], (exemption,))] == [exemption]
    assert [f.exemption for f in check_rows([new], (exemption,))] == [None]


def test_shared_memory_only_rows_face_only_the_shared_memory_budget():
    partial = {key: value for key, value in _row().items()
               if key in ("case", "provider", "arch", "triton", "kernel", "config", "num_warps", "num_stages",
                          "ctas", "grid", "dot_dtypes")}
    fits = dict(partial, arch="sm_86", shared_bytes=64 * 1024, shared_memory_only=True, fits_shared_memory=True)
    too_big = dict(fits, shared_bytes=115 * 1024, fits_shared_memory=False)
    assert check_rows([fits], ()) == []
    assert [f.budget.name for f in check_rows([too_big], ())] == ["fits_shared_memory"]
    report = {"triton": "3.9.0", "arches": ["sm_90"], "shared_memory_arches": ["sm_86"], "rows": [fits, too_big],
              "cases": [], "findings": []}
    assert "DOES NOT FIT" in format_report(report) and "sm_86 shared memory" in format_markdown(report)


def test_other_triton_releases_are_named_by_full_version(tmp_path, monkeypatch):
    monkeypatch.setenv("GENKERNELS_CACHE", str(tmp_path))
    for bad in ("3.6", "latest", "3.6.0; rm -rf /", 36):
        with pytest.raises(ValueError, match="triton version"):
            triton_versions.triton_path(bad)


def test_an_installed_release_is_found_in_the_cache_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("GENKERNELS_CACHE", str(tmp_path))
    folder = tmp_path / "triton-3.6.0"
    (folder / "triton").mkdir(parents=True)
    (folder / "triton" / "__init__.py").write_text("__version__ = '3.6.0'\n")
    (folder / "triton-3.6.0.dist-info").mkdir()

    def no_pip(*args, **kwargs):
        raise AssertionError("pip should not run for a cached release")

    monkeypatch.setattr(triton_versions.subprocess, "run", no_pip)
    assert triton_versions.triton_path("3.6.0") == str(folder)


def test_a_release_pip_cannot_install_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GENKERNELS_CACHE", str(tmp_path))

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for triton==0.0.1"

    monkeypatch.setattr(triton_versions.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(RuntimeError, match=r"(?s)triton==0\.0\.1.*No matching distribution"):
        triton_versions.triton_path("0.0.1")
    assert not any(tmp_path.iterdir())  # nothing half-installed is left behind
