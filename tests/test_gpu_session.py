"""The GPU session command (genkernels.bench.gpu_session), on the CPU: its plan, its budgets, stopping a part that
runs past its budget, the results rewritten after every case, the summary table and its exit codes."""
import dataclasses
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from genkernels.bench import gpu_session as session


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_plan():
    return session.build_plan(session.DEFAULT_BUDGET_S)


def test_every_planned_pattern_resolves_to_a_case(full_plan):
    assert full_plan.missing == []
    for group in session.BENCH_GROUPS:
        found = full_plan.resolved[group.part]
        assert set(found) == set(group.patterns)
        for pattern, names in found.items():
            assert names, f"{group.part}: {pattern!r} matches no case"
        assert full_plan.cases(group.part)


def test_the_plan_covers_what_the_session_promises(full_plan):
    attention = full_plan.cases("bench.attention")
    for which in ("forward", "backward"):
        for head_dim in (64, 128):
            for seq in (4096, 16384):
                assert f"attention.{which}[bf16,d{head_dim},causal,s{seq}]" in attention
    from genkernels.bench.registry import all_cases

    kinds = {case.name: (case.family, case.kind) for case in all_cases("full")}
    model_families = {family for family, kind in kinds.values() if kind in ("train", "sample")}
    for kind, part in (("train", "bench.train"), ("sample", "bench.sample")):
        covered = {kinds[name][0] for name in full_plan.cases(part)}
        assert covered == model_families, f"{part} misses {model_families - covered}"
        assert all(kinds[name][1] == kind for name in full_plan.cases(part))
    op_families = {family for family, kind in kinds.values() if kind == "op" and family != "attention"}
    assert {kinds[name][0] for name in full_plan.cases("bench.ops")} == op_families


@pytest.mark.parametrize("total", [540.0, 300.0, 900.0, 60.0])
@pytest.mark.parametrize("only", [None, "tests", "bench", "report", "bench.attention,report", "tests,bench.ops"])
def test_budgets_add_up_to_at_most_the_total(total, only):
    parts = session.selected_parts(only)
    budgets, reserve = session.plan_budgets(total, parts)
    assert list(budgets) == parts and parts[0] == "device"
    assert all(budget > 0 for budget in budgets.values())
    assert sum(budgets.values()) + reserve <= total + 1e-6
    assert reserve >= session.KILL_GRACE_S


def test_default_budget_leaves_room_on_the_lease():
    budgets, reserve = session.plan_budgets(session.DEFAULT_BUDGET_S, session.selected_parts(None))
    assert session.DEFAULT_BUDGET_S <= 9 * 60
    assert set(budgets) == set(session.PART_NAMES)
    for group in session.BENCH_GROUPS:
        assert group.case_cap_s <= budgets[group.part]


def test_only_rejects_an_unknown_part():
    with pytest.raises(ValueError, match="benchmarks"):
        session.selected_parts("tests,benchmarks")


def test_dry_run_prints_each_part_with_its_budget_and_the_case_names(capsys, tmp_path):
    assert session.main([str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for part in session.PART_NAMES:
        assert part in text
    assert "attention.backward[bf16,d128,causal,s16384]" in text
    assert "gpt.train[gpt2-small,b8,s1024]" in text
    assert "MATCHES NO CASE" not in text
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_fails_loudly_when_a_pattern_matches_no_case(capsys, tmp_path, monkeypatch):
    renamed = session.BenchGroup("bench.ops", "ops", 10.0, ("diffusion.ddpm_step[bfloat16,16M]",
                                                            "diffusion.renamed_op[bfloat16,16M]"))
    groups = (renamed,) + session.BENCH_GROUPS[1:]
    monkeypatch.setattr(session, "BENCH_GROUPS", groups)
    monkeypatch.setattr(session, "GROUPS_BY_PART", {group.part: group for group in groups})
    assert session.main([str(tmp_path / "out"), "--dry-run", "--only", "bench.ops"]) == 3
    text = capsys.readouterr().out
    assert "diffusion.renamed_op[bfloat16,16M]  ->  MATCHES NO CASE" in text
    assert "ERROR" in text


def test_an_exact_name_selects_that_case_alone():
    class FakeCase:
        def __init__(self, name):
            self.name = name

        def matches(self, pattern):
            return pattern in self.name

    cases = [FakeCase("op[a]"), FakeCase("op[a]_fwd_bwd"), FakeCase("other[b]")]
    found = session.resolve_patterns(["op[a]", "op", "none"], cases)
    assert found == {"op[a]": ["op[a]"], "op": ["op[a]", "op[a]_fwd_bwd"], "none": []}


# ----------------------------------------------------------------------------------------------------------------
# Exit codes
# ----------------------------------------------------------------------------------------------------------------
def test_exit_code_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session, "_cuda_available", lambda: False)
    assert session.main([str(tmp_path / "out")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_exit_code_when_out_dir_is_not_writable(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session, "_cuda_available", lambda: True)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert session.main([str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_exit_code_for_a_budget_too_small(tmp_path, capsys):
    assert session.main([str(tmp_path / "out"), "--budget-s", "5", "--dry-run"]) == 2
    assert "too small" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Stopping a part at its budget
# ----------------------------------------------------------------------------------------------------------------
def test_a_part_past_its_budget_is_stopped(tmp_path):
    start = time.monotonic()
    outcome = session.run_until([sys.executable, "-c", "import time; time.sleep(300)"], time.monotonic() + 1.5,
                                log_path=tmp_path / "part.log", grace_s=1.0)
    assert outcome.stopped == "budget"
    assert outcome.returncode is None
    assert time.monotonic() - start < 200  # stopped, long before the sleep would have ended


def test_a_stopped_part_takes_its_children_with_it(tmp_path):
    pids = tmp_path / "pids"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
              f"open({str(pids)!r}, 'w').write(f'{{child.pid}}\\n')\n"
              "time.sleep(300)\n")

    def stop_once_the_child_runs():
        return "test" if pids.exists() and pids.read_text().endswith("\n") else None

    outcome = session.run_until([sys.executable, "-c", script], time.monotonic() + 600,
                                log_path=tmp_path / "part.log", on_poll=stop_once_the_child_runs, grace_s=0.5)
    assert outcome.stopped == "test"
    assert _wait_gone(int(pids.read_text()))


def test_a_part_that_ends_by_itself_is_not_stopped(tmp_path):
    log = tmp_path / "part.log"
    outcome = session.run_until([sys.executable, "-c", "print('hello'); raise SystemExit(4)"],
                                time.monotonic() + 600, log_path=log)
    assert outcome.stopped is None and outcome.returncode == 4
    assert "hello" in log.read_text()


# ----------------------------------------------------------------------------------------------------------------
# A bench group: results rewritten after every case, a case over its cap stopped, a group over its budget stopped
# ----------------------------------------------------------------------------------------------------------------
FAKE_WORKER = r"""
import json, sys, time
from pathlib import Path

events, out, names = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
mode = sys.argv[4]

def emit(**event):
    with open(events, "a") as handle:
        handle.write(json.dumps(event) + "\n")

def row(case, provider, ms):
    return {"case": case, "family": "fake", "kind": "op", "params": {}, "provider": provider, "median_ms": ms,
            "pct_copy_bandwidth": 50.0, "max_error": 0.0, "failure": None}

if mode == "hang":
    emit(event="start", case=names[0])
    time.sleep(300)
first = names[0]
emit(event="start", case=first)
emit(event="rows", case=first, rows=[row(first, "triton", 1.0)])
if first == "case-b":
    time.sleep(300)  # over its cap, after its first provider
emit(event="rows", case=first, rows=[row(first, "eager", 2.0)])
emit(event="done", case=first, seconds=0.1)
# the parent rewrites bench.json after the case: wait for it before going on
for _ in range(1200):
    try:
        written = json.loads((out / "bench.json").read_text())
        if any(c["case"] == first and c["status"] == "done" for c in written["cases"]):
            (out / f"seen-{first}").write_text("yes")
            break
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.05)
if len(names) > 1:
    emit(event="start", case=names[1])
    emit(event="rows", case=names[1], rows=[row(names[1], "triton", 1.0)])
    time.sleep(300)  # the second case hangs after its first provider: stopped at its cap
"""


def _fake_group(tmp_path, mode, names, deadline_s, cap_s):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    state = session.BenchState({"device": "fake"}, list(names), {name: "bench.fake" for name in names})
    record = session.run_bench_group(
        "bench.fake", list(names), time.monotonic() + deadline_s, cap_s, state, work_dir=tmp_path,
        on_change=lambda: session.write_bench(out, state), log_path=tmp_path / "group.log", grace_s=0.5,
        command=lambda remaining, events: [sys.executable, str(script), str(events), str(out),
                                           json.dumps(remaining), mode])
    return out, state, record


def test_results_are_written_after_every_case_and_a_case_over_its_cap_is_stopped(tmp_path):
    out, state, record = _fake_group(tmp_path, "normal", ["case-a", "case-b", "case-c"], 600, 4.0)
    # case-a's results were in bench.json while its worker still ran (the worker saw them)
    assert (out / "seen-case-a").read_text() == "yes"
    assert state.status["case-a"] == "done"
    assert state.status["case-b"].startswith("stopped: over its cap")
    assert state.status["case-c"] == "done"  # a fresh worker took the rest
    assert record["status"] == "completed" and record["cases_done"] == 2 and record["workers"] >= 2
    written = json.loads((out / "bench.json").read_text())
    rows = {(row["case"], row["provider"]): row for row in written["rows"]}
    # the stopped case keeps the provider it finished; speedups come from the medians of the same case
    assert set(rows) == {("case-a", "triton"), ("case-a", "eager"), ("case-b", "triton"), ("case-c", "triton"),
                         ("case-c", "eager")}
    assert rows[("case-a", "triton")]["speedup_vs_eager"] == 2.0
    assert [case["status"] for case in written["cases"]][0] == "done"
    assert "case-a" in (out / "bench.md").read_text()


def test_a_group_past_its_budget_is_stopped_and_the_rest_not_run(tmp_path):
    out, state, record = _fake_group(tmp_path, "hang", ["case-a", "case-b", "case-c"], 3.0, 600)
    assert record["status"] == "stopped (budget)"
    assert state.status["case-a"].startswith(("stopped: bench.fake budget", "not run: bench.fake budget"))
    assert state.status["case-b"] == state.status["case-c"] == "not run: bench.fake budget"
    written = json.loads((out / "bench.json").read_text())
    assert [case["status"] for case in written["cases"]][1:] == ["not run: bench.fake budget"] * 2


def test_a_worker_that_dies_before_any_case_is_not_restarted(tmp_path):
    state = session.BenchState({}, ["x", "y"], {"x": "bench.fake", "y": "bench.fake"})
    record = session.run_bench_group(
        "bench.fake", ["x", "y"], time.monotonic() + 600, 600, state, work_dir=tmp_path, on_change=lambda: None,
        log_path=tmp_path / "group.log",
        command=lambda remaining, events: [sys.executable, "-c", "import sys; print('no torch'); sys.exit(7)"])
    assert record["workers"] == 1
    assert state.status["x"].startswith("not run: the bench worker exited 7") and "no torch" in state.status["x"]


def test_provider_order_puts_ours_first_and_compile_last():
    names = ["eager", "triton", "compile", "sdpa_flash", "triton_cuda_graph"]
    assert session.provider_order(names) == ["triton", "eager", "sdpa_flash", "triton_cuda_graph", "compile"]
    assert session.provider_order(names, ["compile", "eager"]) == ["eager", "compile"]


# ----------------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------------
def _row(case, provider, ms=None, **fields):
    return {"case": case, "provider": provider, "median_ms": ms, "failure": None, **fields}


FAKE_ROWS = [
    _row("op.a", "eager", 2.0, pct_copy_bandwidth=40.0, max_error=0.0),
    _row("op.a", "triton", 1.0, pct_copy_bandwidth=80.0, max_error=3e-3),
    _row("op.a", "compile", 1.5, pct_copy_bandwidth=53.0, max_error=1e-3),
    _row("attn.b", "eager", 4.0, pct_matmul_peak=20.0),
    _row("attn.b", "triton", None, failure="RuntimeError: boom"),
    _row("attn.b", "sdpa_flash", 2.0, pct_matmul_peak=40.0, max_error=2e-2),
    _row("model.c", "triton", 100.0, items_per_s=640.0, item_unit="images"),
]
FAKE_CASES = [{"case": "op.a", "status": "done"}, {"case": "attn.b", "status": "done"},
              {"case": "model.c", "status": "done"}, {"case": "model.d", "status": "not run: bench.train budget"}]


def test_summary_picks_the_best_provider_and_its_speedups():
    entries = {entry["case"]: entry for entry in session.summarize(FAKE_ROWS, FAKE_CASES)}
    a = entries["op.a"]
    assert (a["best"], a["ms"], a["x_eager"], a["x_compile"], a["peak"]) == ("triton", 1.0, 2.0, 1.5, "80% BW")
    assert a["max_error"] == 3e-3 and a["triton_ms"] == 1.0
    b = entries["attn.b"]
    assert (b["best"], b["x_eager"], b["x_compile"], b["peak"], b["failed"]) == ("sdpa_flash", 2.0, None,
                                                                                  "40% MM", ["triton"])
    assert b["triton_ms"] is None
    assert entries["model.c"]["throughput"] == "640 images/s"
    assert entries["model.d"]["best"] is None and list(entries) == [case["case"] for case in FAKE_CASES]


def test_summary_table_formatting():
    entries = session.summarize(FAKE_ROWS, FAKE_CASES)
    lines = session.format_summary(entries).splitlines()
    assert lines[0].split()[:4] == ["case", "best", "ms", "x"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(FAKE_CASES)
    a, b, c, d = lines[2:]
    assert a.split()[:7] == ["op.a", "triton", "1.0000", "2.00", "1.50", "80%", "BW"]
    assert "3.0e-03" in a
    assert "sdpa_flash" in b and "failed: triton" in b and "40% MM" in b
    assert "640 images/s" in c
    assert d.startswith("model.d") and "not run: bench.train budget" in d
    markdown = session.format_summary_markdown(entries).splitlines()
    assert len(markdown) == 2 + len(FAKE_CASES) and markdown[2].startswith("| op.a | triton | 1.0000 | 2.00 |")


def test_bench_markdown_from_fake_rows(tmp_path):
    state = session.BenchState({"device": "Fake GPU", "torch": "t", "triton": "tr", "copy_bandwidth_gb_per_s": 4000.0,
                                "matmul_tflop_per_s": 700.0}, [case["case"] for case in FAKE_CASES], {})
    for case in FAKE_CASES:
        state.record(case["case"], case["status"], 1.0, [row for row in FAKE_ROWS if row["case"] == case["case"]])
    session.write_bench(tmp_path, state)
    text = (tmp_path / "bench.md").read_text()
    assert "Fake GPU" in text and "4000 GB/s" in text and "triton (failed: RuntimeError: boom)" in text
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert len(payload["rows"]) == len(FAKE_ROWS) and payload["cases"][3]["status"].startswith("not run")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no partial files left


# ----------------------------------------------------------------------------------------------------------------
# The tests part and the report part, from fake inputs
# ----------------------------------------------------------------------------------------------------------------
def test_plugin_records_each_test_as_it_finishes(tmp_path):
    (tmp_path / "test_fake.py").write_text("import pytest\n"
                                           "def test_good():\n    pass\n"
                                           "def test_bad():\n    assert 1 == 2\n"
                                           "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n")
    events = tmp_path / "events.jsonl"
    env = dict(os.environ, **{session.TEST_PROGRESS_ENV: str(events)})
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                    "-p", "genkernels.bench.gpu_session", "test_fake.py"], cwd=tmp_path, env=env,
                   capture_output=True, check=False)
    outcomes, in_flight = session.gpu_test_outcomes(session.EventReader(events).read())
    assert {nodeid.split("::")[1]: result["outcome"] for nodeid, result in outcomes.items()} == {
        "test_good": "passed", "test_bad": "failed", "test_skipped": "skipped"}
    assert in_flight is None


def test_junit_of_a_stopped_test_run(tmp_path):
    events = [{"event": "start", "nodeid": "tests/test_a.py::test_one"},
              {"event": "report", "nodeid": "tests/test_a.py::test_one", "when": "call", "outcome": "passed",
               "duration": 1.0},
              {"event": "start", "nodeid": "tests/test_a.py::test_two"},
              {"event": "report", "nodeid": "tests/test_a.py::test_two", "when": "call", "outcome": "failed",
               "duration": 2.0, "message": "assert \x1b[31m1 == 2"},
              {"event": "start", "nodeid": "tests/test_b.py::test_long"}]
    outcomes, in_flight = session.gpu_test_outcomes(events)
    assert in_flight == "tests/test_b.py::test_long"
    path = tmp_path / "tests.xml"
    session.write_junit(path, outcomes, in_flight, "stopped at the session's tests budget")
    suite = ElementTree.parse(path).getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    assert "stopped" in suite.get("name")


def test_report_join_puts_measured_medians_beside_the_floors():
    report = {"cases": [{"case": "op.a", "arch": "sm_90", "floor_ms": 0.5},
                        {"case": "op.z", "arch": "sm_90", "floor_ms": 1.0},
                        {"case": "model.c", "arch": "sm_90", "floor_ms": None}]}
    joined = session.join_measured(report, FAKE_ROWS)
    assert [entry["case"] for entry in joined] == ["op.a", "model.c"]
    assert joined[0]["best"] == "triton" and joined[0]["best_over_floor"] == 2.0
    assert joined[0]["triton_over_floor"] == 2.0 and joined[1]["best_over_floor"] is None
    assert report["cases"][0]["measured_ms"] == {"eager": 2.0, "triton": 1.0, "compile": 1.5}
    assert report["cases"][1]["measured_ms"] is None
    table = session.format_join_markdown(joined)
    assert "| op.a | sm_90 | 0.5000 | triton | 1.0000 | 2.00 |" in table


def test_the_file_runs_where_the_project_is_not_installed(tmp_path):
    """``python bench/gpu_session.py`` (the GPU machine has no install of the project) makes the package importable
    from the checkout itself: simulated by taking the installed finders away."""
    script = session.REPO_ROOT / "bench" / "gpu_session.py"
    code = ("import runpy, sys\n"
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "sys.path_hooks = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
            "sys.path = [p for p in sys.path if 'editable' not in p.lower()]\n"
            "sys.path_importer_cache.clear()\n"
            "try:\n"
            "    import genkernels.bench\n"
            "    raise SystemExit(99)  # importable without its install (a path entry): nothing to simulate\n"
            "except ImportError:\n"
            "    pass\n"
            f"sys.argv = [{str(script)!r}, {str(tmp_path / 'out')!r}, '--dry-run', '--only', 'tests']\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    if result.returncode == 99:
        pytest.skip("genkernels is importable here without its installed finder")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pytest -m gpu -n 0 -q" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# A whole session, its workers replaced by fakes
# ----------------------------------------------------------------------------------------------------------------
FAKE_PARTS = r"""
import argparse, json, sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("kind")
for flag in ("--json", "--events", "--cases-file", "--copy-gbs", "--matmul-tflops", "--providers", "--arch",
             "--only", "--workers"):
    parser.add_argument(flag)
args = parser.parse_args()

def emit(**event):
    with open(args.events, "a") as handle:
        handle.write(json.dumps(event) + "\n")

if args.kind == "device":
    info = {"name": "Fake H200", "capability": "sm_90", "sm_count": 132, "memory_gib": 139.8, "l2_mib": 60.0,
            "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0"}
    env = {"device": "Fake H200", "torch": "2.11.0", "triton": "3.6.0", "date": "today",
           "copy_bandwidth_gb_per_s": 4300.0, "matmul_tflop_per_s": 790.0}
    Path(args.json).write_text(json.dumps({"device": info, "environment": env}))
elif args.kind == "bench":
    assert args.copy_gbs == "4300.0" and args.matmul_tflops == "790.0"
    for index, name in enumerate(json.loads(Path(args.cases_file).read_text())):
        emit(event="start", case=name)
        for provider, ms in (("triton", 1.0), ("eager", 3.0), ("compile", 2.0)):
            emit(event="rows", case=name, rows=[{"case": name, "provider": provider, "median_ms": ms * (index + 1),
                                                 "pct_copy_bandwidth": 70.0 / ms, "max_error": 1e-3,
                                                 "failure": None}])
        emit(event="done", case=name, seconds=0.5)
elif args.kind == "report":
    Path(args.json).write_text(json.dumps({"triton": "3.6.0", "arches": ["sm_90"], "rows": [], "cases": [
        {"case": args.only, "arch": "sm_90", "bytes_moved": 10, "flops": None, "floor_ms": 0.5, "errors": {},
         "launches": 1}]}))
"""


def test_a_whole_session_with_fake_parts(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_parts.py"
    script.write_text(FAKE_PARTS)
    groups = tuple(dataclasses.replace(group, patterns=group.patterns[:2]) for group in session.BENCH_GROUPS)
    monkeypatch.setattr(session, "BENCH_GROUPS", groups)
    monkeypatch.setattr(session, "GROUPS_BY_PART", {group.part: group for group in groups})
    monkeypatch.setattr(session, "_cuda_available", lambda: True)
    monkeypatch.setattr(session, "_worker_command", lambda kind, *args: [sys.executable, str(script), kind, *args])
    monkeypatch.setattr(session, "gpu_test_command",
                        lambda junit, timeout: [sys.executable, "-c", "print('fake tests ran')"])
    out = tmp_path / "out"
    assert session.main([str(out), "--budget-s", "300"]) == 0
    text = capsys.readouterr().out
    planned = [name for group in groups for name in group.patterns]
    summary = text[text.index("Summary"):]
    for name in planned:
        assert name in summary
    assert "Fake H200 (sm_90, 132 SMs, 139.8 GiB" in text
    assert sorted(path.name for path in out.iterdir()) == sorted(session.FILES.values()) != []
    assert len(list(out.iterdir())) <= 8  # what the GPU machine returns
    bench = json.loads((out / "bench.json").read_text())
    assert [case["status"] for case in bench["cases"]] == ["done"] * len(planned)
    assert len(bench["rows"]) == 3 * len(planned)
    report = json.loads((out / "report.json").read_text())
    assert {entry["case"] for entry in report["measured_vs_floor"]} == set(planned)
    assert report["measured_vs_floor"][0]["best"] == "triton"
    record = json.loads((out / "session.json").read_text())
    assert all(part["status"] == "completed" for part in record["parts"].values())
    assert list(record["parts"]) == list(session.PART_NAMES)
    log = (out / "session.log").read_text()
    assert "fake tests ran" in log and "===== bench.sample" in log


def test_the_report_part_stops_its_workers_at_its_budget(tmp_path, monkeypatch):
    script = tmp_path / "fake_report.py"
    script.write_text(FAKE_PARTS.replace('elif args.kind == "report":',
                                         'elif args.kind == "report" and "slow" in args.only:\n'
                                         '    import os, time\n'
                                         '    Path(args.json + ".pid").write_text(str(os.getpid()))\n'
                                         '    time.sleep(300)\n'
                                         'elif args.kind == "report":'))
    monkeypatch.setattr(session, "_worker_command", lambda kind, *args: [sys.executable, str(script), kind, *args])
    names = ["op.a", "op.slow1", "op.slow2", "op.b"]
    report, record = session.run_report_part(names, time.monotonic() + 4, tmp_path, concurrency=2, grace_s=0.5)
    assert record["status"] == "stopped (budget)"
    assert "op.slow1" in record["stopped"]
    reported = [case["case"] for case in report["cases"]]
    assert sorted(reported + record["stopped"] + record["not_reached"] + list(record["failed"])) == sorted(names)
    for pid_file in tmp_path.glob("report-*.json.pid"):
        assert _wait_gone(int(pid_file.read_text()))
