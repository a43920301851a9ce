"""The launcher, metrics and progress pieces without Ray (issue 14): a script run as a loop
(``sys.exit``, argv, the copy shipped with the job), the command line (a flag per Trainer
keyword and mode option, ``--config``/``--set``, usage errors exit 2), ``metrics.jsonl`` rows
from step-log records (superseded ones left out; the live writer rewrites after a new
generation), the progress display on a terminal and in a pipe, and plotting without
matplotlib."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import synctrain
from synctrain import launch, metrics
from synctrain.cli import build_parser
from synctrain.cli import main as cli_main
from synctrain.context import set_local_config
from synctrain.progress import ProgressDisplay

ROOT = Path(__file__).resolve().parents[2]


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "train.py"
    path.write_text(body)
    return path


# ---- a script as a loop ---------------------------------------------------------------------
def test_a_script_runs_as_main_with_its_argv_and_sys_exit_0_counts_as_finished(tmp_path):
    out = tmp_path / "seen.json"
    path = script(tmp_path, "import json, sys, os\n"
                            f"json.dump({{'name': __name__, 'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(out)!r}, 'w'))\n"
                            "sys.exit(0)\n")
    loop = launch.ScriptLoop.read(path, ["--lr", "0.5", "x"], None)
    argv_before = list(sys.argv)
    loop({})  # returns: finished
    assert json.loads(out.read_text()) == {"name": "__main__", "argv": ["--lr", "0.5", "x"],
                                          "cwd": str(Path.cwd())}
    assert sys.argv == argv_before


@pytest.mark.parametrize(("code", "said"), [("3", "exited with status 3"),
                                            ("'no data'", "exited with status 1: no data")])
def test_a_script_that_exits_non_zero_is_a_failure(tmp_path, code, said):
    loop = launch.ScriptLoop.read(script(tmp_path, f"import sys\nsys.exit({code})\n"), [], None)
    with pytest.raises(launch.ScriptExitError, match=said):
        loop({})


def test_a_script_not_on_the_worker_runs_from_the_source_sent_with_the_job(tmp_path):
    out = tmp_path / "ran"
    path = script(tmp_path, f"open({str(out)!r}, 'w').write(__file__)\n")
    loop = launch.ScriptLoop.read(path, [], str(tmp_path / "output"))
    path.unlink()  # as on a machine that does not have it
    loop({})
    ran_from = Path(out.read_text())
    assert ran_from.name == "train.py" and ran_from.parent != tmp_path and not ran_from.exists()
    assert "copy sent with the job" in (tmp_path / "output" / "rank-0.stderr").read_text()


def test_a_ranks_output_goes_to_its_files_and_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "MAX_OUTPUT_BYTES", 100)
    path = script(tmp_path, "import sys\nprint('hello'); print('x' * 500); print('oops', file=sys.stderr)\n")
    launch.ScriptLoop.read(path, [], str(tmp_path / "out"))({})
    stdout = (tmp_path / "out" / "rank-0.stdout").read_text()
    assert stdout.startswith("hello\n") and "output cut at 100 bytes" in stdout and len(stdout) < 200
    assert (tmp_path / "out" / "rank-0.stderr").read_text() == "oops\n"
    lines = launch.failure_output(tmp_path / "out", 0)
    assert lines == ["[rank 0] oops"]


# ---- the command line ------------------------------------------------------------------------
def test_run_help_has_a_flag_for_every_trainer_keyword_and_mode_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for name in inspect.signature(synctrain.Trainer.__init__).parameters:
        if name not in launch.NO_FLAG:
            assert f"--{name.replace('_', '-')}" in shown, name
    for name in launch.mode_options():
        assert f"--{name.replace('_', '-')}" in shown, name
    assert "--workers" in shown and "--config" in shown and "--set" in shown


def test_flags_become_trainer_keywords_and_the_rest_goes_to_the_script():
    args = build_parser().parse_args(
        ["run", "--workers", "4", "--mode", "async", "--staleness", "4", "--address", "local",
         "--no-progress", "--resources-per-worker", "CPU=2,GPU=0.5", "--use-gpu", "false",
         "--min-workers", "none", "train.py", "--workers", "9", "--lr", "0.1"])
    assert launch.trainer_kwargs(args) == {
        "num_workers": 4, "mode": "async", "staleness": 4, "ray_address": "local", "progress": False,
        "resources_per_worker": {"CPU": 2, "GPU": 0.5}, "use_gpu": False}
    assert args.script == "train.py" and args.script_args == ["--workers", "9", "--lr", "0.1"]


def test_config_file_and_set_values_make_the_scripts_config(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.1, "optim": {"name": "sgd"}}))
    config = launch.load_config(str(tmp_path / "c.json"),
                                ["lr=0.5", "optim.momentum=0.9", "tag=run-1", "layers=[4, 8]", "x=none"])
    assert config == {"lr": 0.5, "optim": {"name": "sgd", "momentum": 0.9}, "tag": "run-1",
                      "layers": [4, 8], "x": None}
    (tmp_path / "c.yaml").write_text("lr: 0.2\nsizes: [1, 2]\n")
    pytest.importorskip("yaml")
    assert launch.load_config(str(tmp_path / "c.yaml"), None) == {"lr": 0.2, "sizes": [1, 2]}


def test_yaml_without_pyyaml_is_a_clear_usage_error(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("lr: 0.2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(launch.UsageError, match="needs PyYAML.*pip install pyyaml.*JSON"):
        launch.load_config(str(tmp_path / "c.yaml"), None)


@pytest.mark.parametrize(("argv", "said"), [
    (["--workers", "2", "--set", "novalue"], "--set takes KEY=VALUE"),
    (["--workers", "2", "--config", "missing.json"], "cannot read it"),
    (["--workers", "0"], "num_workers must be an integer >= 1"),
    (["--workers", "2", "--staleness", "-1", "--mode", "async"], "staleness must be None"),
    (["--mode", "async"], "--mode configure the workers the script runs on: add --workers N"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path, capsys, argv, said):
    path = script(tmp_path, "raise SystemExit('must not run')\n")
    assert cli_main(["run", *argv, str(path)]) == 2
    assert said in capsys.readouterr().err


def test_a_bad_flag_exits_2_from_the_command(tmp_path):
    path = script(tmp_path, "print('must not run')\n")
    proc = subprocess.run([sys.executable, "-m", "synctrain.cli", "run", "--workers", "2", "--mode",
                           "lockstep", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "invalid choice: 'lockstep'" in proc.stderr and "must not run" not in proc.stdout


def test_without_workers_the_script_runs_here_and_sees_the_config(tmp_path):
    out = tmp_path / "config.json"
    path = script(tmp_path, "import json, synctrain\n"
                            f"json.dump(synctrain.get_context().config, open({str(out)!r}, 'w'))\n")
    try:
        assert cli_main(["run", "--set", "lr=0.3", str(path)]) == 0
    finally:
        set_local_config({})
    assert json.loads(out.read_text()) == {"lr": 0.3}


# ---- metrics.jsonl ---------------------------------------------------------------------------
def logged(generations, steps, reports):
    return {"generations": generations, "steps": steps, "reports": reports}


GEN1 = {"generation": 1, "start_step": 0, "time": 100.0, "members": [], "reason": "start"}
GEN2 = {"generation": 2, "start_step": 1, "time": 110.0, "members": [], "reason": "died rank 1"}


def test_rows_are_the_live_reports_with_step_generation_and_time_since_the_start():
    steps = [{"step": 1, "time": 101.0}, {"step": 2, "time": 102.0, "superseded": True},
             {"step": 2, "time": 112.5}]
    reports = [{"seq": 0, "step": 0, "generation": 1, "metrics": {"step": 0, "total_steps": 2}},
               {"seq": 1, "step": 1, "generation": 1, "metrics": {"step": 1, "loss": 2.0, "time": 7}},
               {"seq": 2, "step": 2, "generation": 1, "metrics": {"step": 2, "loss": 1.5}, "superseded": True},
               {"seq": 2, "step": 2, "generation": 2, "metrics": {"step": 2, "loss": 1.25}}]
    rows = metrics.metric_rows(reports, steps, [GEN1, GEN2])
    assert rows == [{"step": 0, "generation": 1, "time": 0.0, "total_steps": 2},
                    {"step": 1, "generation": 1, "time": 1.0, "loss": 2.0, "time_reported": 7},
                    {"step": 2, "generation": 2, "time": 12.5, "loss": 1.25}]
    assert metrics.numeric_keys(rows) == ["loss", "time_reported"]


class FakeLog:
    """A step log's ``records(kind, start, max_items)`` over lists the test changes."""

    def __init__(self):
        self.kinds = logged([], [], [])
        self.reads = []

    def records(self, kind, consistency="linearizable", *, start=0, max_items=None):
        self.reads.append((kind, consistency))
        items = self.kinds[kind][start:]
        return [dict(r) for r in (items if max_items is None else items[:max_items])]

    def close(self):
        pass


def test_the_live_writer_appends_and_rewrites_after_a_new_generation(tmp_path):
    log = FakeLog()
    live = metrics.LiveMetrics(tmp_path, log, poll_s=3600)
    live.poll()
    assert metrics.read_metrics(tmp_path) == []
    log.kinds["generations"].append(GEN1)
    log.kinds["steps"] += [{"step": 1, "time": 101.0}, {"step": 2, "time": 102.0}]
    log.kinds["reports"] += [{"seq": 0, "step": 1, "generation": 1, "metrics": {"loss": 2.0}},
                             {"seq": 1, "step": 2, "generation": 1, "metrics": {"loss": 1.5}}]
    live.poll()  # the first look with a generation: written whole
    log.kinds["steps"].append({"step": 3, "time": 103.0})
    log.kinds["reports"].append({"seq": 2, "step": 3, "generation": 1, "metrics": {"loss": 1.0}})
    live.poll()  # appended
    assert [r["loss"] for r in metrics.read_metrics(tmp_path)] == [2.0, 1.5, 1.0]
    for rec in log.kinds["steps"][1:] + log.kinds["reports"][1:]:  # generation 2 rolls back to step 1
        rec["superseded"] = True
    log.kinds["generations"].append(GEN2)
    log.kinds["steps"].append({"step": 2, "time": 111.0})
    log.kinds["reports"].append({"seq": 1, "step": 2, "generation": 2, "metrics": {"loss": 1.4}})
    live.poll()
    assert metrics.read_metrics(tmp_path) == [
        {"step": 1, "generation": 1, "time": 1.0, "loss": 2.0},
        {"step": 2, "generation": 2, "time": 11.0, "loss": 1.4}]
    live.stop()



def test_the_live_writer_reads_no_steps_when_reports_carry_their_step_time(tmp_path):
    """A fast job commits hundreds of step records a second: the live writer reads only the
    generations and reports (stale reads, no round to the other nodes), and each report's
    step time comes with it."""
    log = FakeLog()
    live = metrics.LiveMetrics(tmp_path, log, poll_s=3600)
    log.kinds["generations"].append(GEN1)
    log.kinds["steps"] += [{"step": s, "time": 100.0 + s} for s in range(1, 1001)]
    log.kinds["reports"].append({"seq": 0, "step": 500, "generation": 1, "time": 600.0,
                                 "metrics": {"loss": 2.0}})
    live.poll()  # the first look: written whole
    log.kinds["reports"].append({"seq": 1, "step": 1000, "generation": 1, "time": 1100.0,
                                 "metrics": {"loss": 1.0}})
    log.reads.clear()
    live.poll()  # appended
    assert metrics.read_metrics(tmp_path) == [
        {"step": 500, "generation": 1, "time": 500.0, "loss": 2.0},
        {"step": 1000, "generation": 1, "time": 1000.0, "loss": 1.0}]
    assert log.reads == [("generations", "stale"), ("reports", "stale")]
    live.stop()

def test_tensorboard_files_only_when_tensorboard_can_be_imported(tmp_path, monkeypatch):
    import types

    rows = [{"step": 1, "generation": 1, "time": 0.5, "loss": 2.0, "note": "x"},
            {"step": 2, "generation": 1, "time": 1.0, "loss": 1.0}]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert metrics.write_tensorboard(tmp_path, rows) is None and not (tmp_path / "tensorboard").exists()
    written = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, global_step, walltime):
            written.append((tag, value, global_step, walltime))

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert metrics.write_tensorboard(tmp_path, rows, t0=1000.0) == tmp_path / "tensorboard"
    assert written == [("dir", str(tmp_path / "tensorboard")), ("loss", 2.0, 1, 1000.5),
                       ("loss", 1.0, 2, 1001.0), "closed"]


# ---- the progress display --------------------------------------------------------------------
def test_not_on_a_terminal_the_display_writes_a_line_every_n_steps():
    out = io.StringIO()
    shown = ProgressDisplay(True, "job-1", stream=out)
    assert not shown.tty
    shown.show([{"step": 0, "total_steps": 40}], {"step": 0, "started": True, "epoch": 0, "samples": 0})
    for step in range(1, 41):
        shown.show([{"step": step, "loss": 1.0 / step}],
                   {"step": step, "started": True, "epoch": step // 20, "samples": 16 * step,
                    "staleness_mean": 0.5})
        if step == 25:
            shown.note("failure", "died (rank 1, step 25): heal from peer")
    shown.close()
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if ": step " in line]
    assert len(steps) == 21  # step 0, then every 2 steps (40 / 20)
    assert steps[-1].startswith("job-1: step 40/40 (100%)")
    assert "loss=0.025" in steps[-1] and "epoch=2" in steps[-1] and "samples/s=" in steps[-1]
    assert "staleness=0.5" in steps[-1] and "failures=1" in steps[-1]
    assert "synctrain: job-1: died (rank 1, step 25): heal from peer" in lines


def test_on_a_terminal_the_display_is_a_bar_with_the_values_and_notes_above_it():
    out = io.StringIO()
    bar = ProgressDisplay(True, "job-2", stream=out, tty=True)
    bar.show([{"step": 0, "total_steps": 40}], None)
    bar.show([{"step": 10, "loss": 0.5}], {"step": 10, "started": True, "epoch": 1, "samples": 0})
    bar.note("recovered", "recovered in 2.0 s")
    text = str(bar._bar)
    assert "10/40" in text and "loss=0.5" in text and "epoch=1" in text and "recovered=1" in text
    bar.show([], {"step": 4, "started": True})  # a recovery redid steps: the bar goes back
    assert bar._bar.n == 4
    bar.close()
    assert "synctrain: job-2: recovered in 2.0 s" in out.getvalue() and "\r" in out.getvalue()


# ---- plots -----------------------------------------------------------------------------------
def test_plotting_without_matplotlib_names_the_extra(monkeypatch):
    from synctrain.plots import PlotDependencyError, plot_job

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlotDependencyError, match=r"pip install 'synctrain\[plot\]'"):
        plot_job("any-job")


def test_resume_runs_a_workers_launch_again_with_its_flags(tmp_path, monkeypatch):
    path = script(tmp_path, "print('x')\n")
    job = tmp_path / "store" / "job-1"
    job.mkdir(parents=True)
    launched = {"script": str(path), "args": ["--lr", "0.1"], "cwd": str(tmp_path), "address": None,
                "launcher": ["--workers", "2", "--mode", "async", "--set", "lr=0.2", "--job-name", "old"]}
    (job / "job.json").write_text(json.dumps({"name": "job-1", "state": "failed", "launch": launched}))
    seen = {}

    def fake_launch(args, script_path):
        seen.update(kwargs=launch.trainer_kwargs(args), script=script_path,
                    script_args=args.script_args, config=launch.load_config(args.config, args.set))
        return 0

    monkeypatch.setattr(launch, "launch", fake_launch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SYNCTRAIN_JOB_NAME", raising=False)
    monkeypatch.delenv("SYNCTRAIN_STORAGE_PATH", raising=False)
    assert cli_main(["resume", "job-1", "--storage-path", str(tmp_path / "store")]) == 0
    assert seen == {"kwargs": {"num_workers": 2, "mode": "async", "job_name": "job-1"}, "script": path,
                    "script_args": ["--lr", "0.1"], "config": {"lr": 0.2}}
