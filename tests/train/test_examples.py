"""The examples a user copies from do what their docstrings promise, on small settings.

* ``examples/char_lm.py``: the language model's validation loss falls well below the unigram
  baseline (a model that ignores the context) in both modes;
* ``examples/regression.py``: the regression converges in both modes, and its LR scheduler is
  in the job's checkpoints (registered with ``synctrain.register_state``);
* ``examples/digits.py --kill-worker-at STEP``: rank 1 kills itself, the job recovers once and
  finishes every step, and the script says so.

The examples' own command lines are called in this process (``main(argv)``), so the jobs run
on the session's Ray.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

import synctrain

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)  # workers cannot import examples/ by name
    return module


# A smaller setting than the example's defaults (measured: see the docstring of char_lm.py):
# one layer, 150 steps of 2 x 16 windows of 32 characters from 200k characters.
CHAR_LM_SMALL = ["--chars", "200000", "--steps", "150", "--eval-every", "75", "--block-size", "32",
                 "--stride", "32", "--layers", "1", "--embd", "32", "--heads", "2", "--batch-size", "16",
                 "--sample-chars", "40"]
#: The small setting reached 2.23 (sync) and 2.12 (async) on the 2-core machine; the unigram
#: baseline of its text is 2.96. BEAT_UNIGRAM_BY under the baseline is learning from context.
BEAT_UNIGRAM_BY = 0.45


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_char_lm_beats_the_unigram_baseline(ray_session, mode, capsys):
    char_lm = load("char_lm")
    run = char_lm.main([*CHAR_LM_SMALL, "--mode", mode])
    val_losses = [m["val_loss"] for m in run["metrics"] if "val_loss" in m]
    assert [m["step"] for m in run["metrics"] if "val_loss" in m] == [75, 150]
    assert val_losses[-1] == pytest.approx(run["output"]["val_loss"])
    assert val_losses[-1] < run["unigram_loss"] - BEAT_UNIGRAM_BY, (val_losses, run["unigram_loss"])
    assert val_losses[1] < val_losses[0]
    out = capsys.readouterr().out
    assert f"{mode}, 2 worker(s), 150 steps: validation loss" in out
    assert "sample:\ndef " in out and len(run["output"]["sample"]) == len("def ") + 40


def test_char_lm_corpus_is_the_same_text_every_time():
    char_lm = load("char_lm")
    train, val = char_lm.load_corpus(50_000)
    again, _ = char_lm.load_corpus(50_000)
    assert len(train) + len(val) == 50_000 and torch.equal(train, again)
    assert char_lm.decode(train[:200].tolist()) in char_lm.stdlib_text(1000)
    windows = char_lm.Windows(train, 8, 4)
    x, y = windows[3]
    assert torch.equal(x[1:], y[:-1]) and torch.equal(x, train[12:20])
    assert len(windows) == (len(train) - 9) // 4 + 1
    last_x, last_y = windows[len(windows) - 1]
    assert len(last_x) == len(last_y) == 8  # no short window at the end


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_regression_converges_with_a_registered_scheduler(ray_session, mode):
    regression = load("regression")
    run = regression.main(["--mode", mode, "--epochs", "6", "--batch-size", "128",  # 96 steps
                           "--checkpoint-every", "40"])
    result = run["result"]
    # measured on the 2-core machine: R² 0.93 (sync), 0.89 (async); the defaults reach 0.98
    assert run["output"]["test_r2"] > 0.8, result.metrics[-1]
    lrs = [m["lr"] for m in result.metrics if "lr" in m]
    assert max(lrs) > 5 * lrs[-1]  # the one-cycle schedule ran up and down
    assert all(m["grad_norm"] > 0 for m in result.metrics if "grad_norm" in m)
    saved = synctrain.load_checkpoint(result.checkpoint)  # the last one: step 80
    assert saved["step"] == 80
    assert saved["registered"]["lr_scheduler"]["last_epoch"] == 80  # stepped with each opt.step()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.fault
def test_digits_kill_worker_at_recovers_once(ray_session, capsys):
    digits = load("digits")
    args = digits.parse_args(["--epochs", "3", "--kill-worker-at", "30", "--job-name", "digits-kill-30"])
    result = digits.run(args)
    [failure] = result.failures
    assert (failure["rank"], failure["kind"], failure["generation"]) == (1, "died", 1)
    assert [g["generation"] for g in result.generations] == [1, 2]
    assert result.generations[1]["start_step"] >= 29  # sync: healed from the survivor, not step 0
    steps_per_epoch = -(-1438 // 64)
    assert [s["step"] for s in result.steps] == list(range(1, 3 * steps_per_epoch + 1))
    assert [m["epoch"] for m in result.metrics if "epoch" in m] == [0, 1, 2]
    out = capsys.readouterr().out
    assert "failure: rank 1 died at step" in out and "generation 2 from step" in out
    assert "1 failure(s) survived" in out


def test_digits_kill_worker_at_needs_a_rank_to_kill(capsys):
    digits = load("digits")
    for argv in (["--mode", "local", "--kill-worker-at", "5"], ["--workers", "1", "--kill-worker-at", "5"]):
        with pytest.raises(SystemExit) as exc:
            digits.parse_args(argv)
        assert exc.value.code == 2
    assert "--kill-worker-at needs" in capsys.readouterr().err
