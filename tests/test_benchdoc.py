"""`synctrain bench all` and docs/benchmarks.md (synctrain/benchdoc.py): the doc composed from a
results directory, the plan covering every script, and a failing benchmark failing the run.

No Ray and no real benchmark: the results are small files written here, and the benchmarks the
runner starts are stand-in scripts in a temporary ``benchmarks/`` (the hidden --benchmarks-dir).
"""

from __future__ import annotations

import json
import os
import platform
import re
import textwrap
from pathlib import Path

import pytest

from synctrain import benchdoc
from synctrain.benchdoc import PLAN, recorded_run, write_benchmarks_doc
from synctrain.cli import main as cli_main

TABLE = "| a | b |\n|---|---|\n| 1 | 2 |\n"


def _result(directory: Path, name: str, title: str, data: dict | None = None, plot: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.md").write_text(f"# {title}\n\nsome words\n\n{TABLE}")
    if data is not None:
        (directory / f"{name}.json").write_text(json.dumps(data))
    if plot:
        (directory / f"{name}.png").write_bytes(b"\x89PNG fake")


def _sections(doc: str) -> dict[str, str]:
    parts = re.split(r"^## (\S+)\n", doc, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    _result(out, "throughput", "Sync throughput",
            {"machine": {"when": "2026-01-02 03:04:05 UTC", "cpus": 2, "python": "3.11.7", "gpu": None}})
    _result(out, "convergence", "Convergence on digits",
            {"meta": {"machine": "Linux-x86_64", "cpus": 2, "ray": "2.60.0", "load_avg_1m": 2.13}}, plot=True)
    _result(out, "convergence_conv", "Convergence, convnet", {"meta": {"cpus": 2}}, plot=True)
    _result(out, "mystery", "Something new")
    return out


def test_the_doc_has_a_section_per_result_in_plan_order_with_when_where_and_its_plots(results, tmp_path):
    doc_path = write_benchmarks_doc(results, tmp_path / "docs" / "benchmarks.md")
    doc = doc_path.read_text()
    sections = _sections(doc)
    assert list(sections) == ["throughput", "convergence", "convergence_conv", "mystery"]
    assert sections["throughput"].startswith(f"\n*{PLAN['throughput'].what}*")
    assert "- Ran: 2026-01-02 03:04:05 UTC on 2 CPUs, Python 3.11.7, no GPU" in sections["throughput"]
    assert "### Sync throughput" in sections["throughput"] and TABLE in sections["throughput"]
    assert "Linux-x86_64, 2 CPUs, ray 2.60.0, load average 2.1" in sections["convergence"]
    # no date in the JSON and not in git: the file's time, said so
    assert re.search(r"- Ran: \d{4}-\d\d-\d\d \d\d:\d\d UTC \(file time\)", sections["convergence"])
    # each plot under its own result, linked relative to the doc
    assert "![convergence](../results/convergence.png)" in sections["convergence"]
    assert "convergence_conv.png" not in sections["convergence"]
    assert "![convergence_conv](../results/convergence_conv.png)" in sections["convergence_conv"]
    assert "not in the plan" in sections["mystery"]
    not_run = next(line for line in doc.splitlines() if line.startswith("Not run"))
    for name in ("ps_throughput", "raft_core", "coordinator_bench", "steplog_overhead"):
        assert f"`{name}`" in not_run
    assert "`gpu_checks` (needs a CUDA GPU" in not_run
    assert "Smoke-size" not in doc


def test_the_header_says_how_when_and_on_what_machine(results, tmp_path):
    doc = write_benchmarks_doc(results, tmp_path / "b.md", command="synctrain bench all --no-run").read_text()
    header = doc.split("\n## ", 1)[0]
    assert re.search(r"- Generated: \d{4}-\d\d-\d\d \d\d:\d\d UTC by `synctrain bench all --no-run`", header)
    machine = next(line for line in header.splitlines() if line.startswith("- Generated on: "))
    assert f"{os.cpu_count()} cores" in machine
    assert f"Python {platform.python_version()}" in machine
    assert re.search(r"torch \S+, ray \S+; GPU: .+$", machine)
    if Path("/proc/cpuinfo").is_file():
        assert "GiB memory" in machine


def test_a_quick_doc_says_its_figures_are_smoke_size(results, tmp_path):
    doc = write_benchmarks_doc(results, tmp_path / "b.md", quick=True).read_text()
    assert "**Smoke-size figures** (`--quick`)" in doc and "**not** the published figures" in doc
    assert "`convergence_conv_adam` (full runs only)" in doc
    assert "bench all --quick` runs: `python benchmarks/convergence.py --quick --out" in doc


@pytest.mark.parametrize("data, when, where", [
    ({"meta": {"python": "3.11.7", "machine": "x86_64", "processor": "unknown", "cpus": 2,
               "load_average_1m": 5.55}}, None, "x86_64, 2 CPUs, Python 3.11.7, load average 5.5"),
    ({"machine": "x86_64, 2 cores, Python 3.11.7", "config": {}}, None, "x86_64, 2 cores, Python 3.11.7"),
    ({"machine": {"when": "2026-12-01 16:17:40 UTC", "torch": "2.13.0+cpu", "gpu": "NVIDIA H200"}},
     "2026-12-01 16:17:40 UTC", "torch 2.13.0+cpu, GPU NVIDIA H200"),
    ({"meta": {"load_avg_start": [6.69, 9.9, 16.6]}}, None, "load average 6.7"),
    ({"rows": []}, None, None),
])
def test_recorded_run_reads_each_shape_the_results_use(data, when, where):
    assert recorded_run(data) == (when, where)


def test_the_plan_covers_every_benchmark_script():
    scripts = {p.name for p in benchdoc.BENCHMARKS_DIR.iterdir()
               if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    planned = {run.script for run in PLAN.values()}
    assert scripts - planned == set(), "add these scripts to PLAN in synctrain/benchdoc.py"
    assert planned - scripts == set(), "PLAN names scripts that are gone"
    assert "all.py" not in scripts  # `synctrain bench all` is the runner
    for name, run in PLAN.items():
        text = (benchdoc.BENCHMARKS_DIR / run.script).read_text()
        for args in (run.full, run.quick):
            if args is None:
                continue
            if "--name" in args:  # the result file the row expects is the one the script writes
                assert args[args.index("--name") + 1] == name
            # a quick run must never write into the published benchmarks/results
            assert run.results_global or any("{out}" in a for a in args), name
        if run.results_global:
            assert re.search(rf"^{run.results_global} = |import .*\b{run.results_global}\b", text, re.M), name


def test_cli_no_run_writes_the_doc_from_a_results_directory(tmp_path, capsys):
    _result(tmp_path, "raft_core", "Raft core throughput", {"meta": {"cpus": 2}})
    assert cli_main(["bench", "all", "--no-run", "--out", str(tmp_path), "--doc", str(tmp_path / "b.md")]) == 0
    doc = (tmp_path / "b.md").read_text()
    assert list(_sections(doc)) == ["raft_core"]  # the doc itself, b.md, is not a result
    assert f"by `synctrain bench all --no-run --out {tmp_path} --doc {tmp_path / 'b.md'}`" in doc
    assert cli_main(["bench", "all", "--no-run", "--only", "raft_core"]) == 2
    assert cli_main(["bench", "all", "--no-run", "--out", str(tmp_path / "nowhere")]) == 2
    assert cli_main(["bench", "all", "--only", "nosuch", "--out", str(tmp_path)]) == 2
    assert "no benchmark 'nosuch'" in capsys.readouterr().err


def test_bench_name_args_still_runs_one_script():
    assert cli_main(["bench", "raft", "--help"]) == 0  # the old short name, its own flags


def _stand_ins(root: Path) -> Path:
    """A benchmarks/ with three stand-ins: one that fails, one that writes its results through
    the redirected global, one that exits 0 without writing anything."""
    bench = root / "benchmarks"
    bench.mkdir()
    (bench / "raft_core.py").write_text("import sys\nprint('boom: the stand-in fails')\nsys.exit(3)\n")
    (bench / "digest_cost.py").write_text(textwrap.dedent("""\
        import json, sys
        from pathlib import Path
        RESULTS_DIR = Path(__file__).resolve().parent / "results"
        def main():
            assert sys.argv[1:] == ["--steps", "5"], sys.argv
            (RESULTS_DIR / "digest_cost.md").write_text("# Fake digest cost\\n\\n| x |\\n|---|\\n| 1 |\\n")
            (RESULTS_DIR / "digest_cost.json").write_text(json.dumps({"machine": {"when": "2030-01-01"}}))
        """))
    (bench / "ps_throughput.py").write_text("print('measured nothing')\n")
    return bench


def test_a_failing_benchmark_fails_the_run_and_is_named_in_the_doc(tmp_path, monkeypatch):
    bench, out, doc_path = _stand_ins(tmp_path), tmp_path / "work" / "out", tmp_path / "b.md"
    _result(out, "raft_core", "Raft core, an earlier run")
    os.utime(out / "raft_core.md", (1e9, 1e9))
    monkeypatch.chdir(out.parent)  # --out is relative to here; the benchmarks run in the repo root
    code = cli_main(["bench", "all", "--quick", "--only", "raft,digest_cost,ps_throughput",
                     "--benchmarks-dir", str(bench), "--out", "out", "--doc", str(doc_path)])
    assert code == 1
    record = json.loads((out / benchdoc.RUN_RECORD).read_text())
    assert {n: e["status"] for n, e in record["runs"].items()} == {
        "ps_throughput": "failed", "digest_cost": "ok", "raft_core": "failed"}
    assert not (bench / "results").exists()  # the redirect: nothing in the stand-in's own results
    doc = doc_path.read_text()
    assert "**failed: ps_throughput, raft_core**" in doc
    sections = _sections(doc)
    assert "**The last run failed** (exit status 3): the figures below are from an earlier run." \
        in sections["raft_core"]
    assert "exited 0 but wrote no ps_throughput.md" in sections["ps_throughput"]
    assert "measured nothing" in sections["ps_throughput"]  # its output's last lines
    assert "### Fake digest cost" in sections["digest_cost"] and "- Ran: 2030-01-01" in sections["digest_cost"]
    # the record outlives the run: --no-run still says what failed
    assert cli_main(["bench", "all", "--no-run", "--out", str(out), "--doc", str(doc_path)]) == 0
    assert "**failed: ps_throughput, raft_core**" in doc_path.read_text()


def test_a_script_that_writes_no_table_has_its_output_kept_as_one(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "gpu_checks.sh").write_text('echo "quick=$GPU_CHECKS_QUICK into $1"; test -d "$1"\n')
    entry = benchdoc.run_one("gpu_checks", out_dir=tmp_path, quick=True, benchmarks_dir=bench)
    assert entry["status"] == "ok", entry
    table = (tmp_path / "gpu_checks.md").read_text()
    assert f"quick=1 into {tmp_path}/gpu_checks" in table and "exit status 0" in table


def test_a_benchmark_that_runs_out_of_time_is_killed_and_failed(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "throughput.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    entry = benchdoc.run_one("throughput", out_dir=tmp_path, quick=True, benchmarks_dir=bench, timeout_s=1)
    assert entry["status"] == "failed" and entry["reason"] == "ran out of its 1 s"
    assert entry["output_tail"] == ["started"] and entry["seconds"] < 30
