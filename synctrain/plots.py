"""``synctrain plot JOB`` / :func:`plot_job`: a job's reported values as PNG figures.

The rows come from the committed step log (:func:`synctrain.read_job`, then
:func:`synctrain.metrics.metric_rows`: the rows of ``metrics.jsonl``), so a job plots while it
runs, after it ended, and when it predates ``metrics.jsonl``. Two figures go to the job
directory's ``plots/``: ``metrics_vs_step.png`` and ``metrics_vs_time.png`` (seconds since the
job started), one panel per numeric reported value (at most :data:`MAX_PANELS`, in the order
first reported), each with one line, its axes labelled. Every panel marks where a new
generation started (grey dashes: a recovery, a resume, the job shrinking or growing) and where
a failure happened (red dots), so a jump in the loss can be read against what the job went
through.

Drawing uses matplotlib's object API with the Agg canvas: no pyplot, no global backend
change in the caller's process. Without matplotlib, :class:`PlotDependencyError` says which
extra to install.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from synctrain.errors import SynctrainError
from synctrain.metrics import is_number, metric_rows, numeric_keys

PLOTS_DIR = "plots"
#: Panels per figure; further reported values are listed in ``PlotResult.left_out``.
MAX_PANELS = 16
#: Below this many points a line also shows its points as dots.
DOTS_BELOW = 60
_MARKER_GID = "marker"  # axvlines for generations and failures (not a reported value's line)


class PlotDependencyError(SynctrainError, ImportError):
    """matplotlib, which plotting needs, is not installed."""


@dataclasses.dataclass
class PlotFigure:
    """One written figure, described from its matplotlib axes (what a reader sees)."""

    path: pathlib.Path
    x: str  # "step" or "time"
    panels: list[dict[str, Any]]  # {"xlabel", "ylabel", "lines": [label, ...], "points", "markers"}


@dataclasses.dataclass
class PlotResult:
    job_name: str
    figures: list[PlotFigure]
    keys: list[str]  # the values plotted, one panel each
    left_out: list[str] = dataclasses.field(default_factory=list)  # beyond MAX_PANELS

    @property
    def files(self) -> list[pathlib.Path]:
        return [f.path for f in self.figures]


def plot_job(name: str, storage_path: str | os.PathLike[str] | None = None) -> PlotResult:
    """Write the job's figures into its directory's ``plots/`` (see the module doc).
    JobNotFoundError for no such job; PlotDependencyError without matplotlib. A job that
    reported no numbers yet gets no figures (``figures == []``)."""
    canvas_cls, figure_cls = _matplotlib()
    from synctrain.jobs import read_job

    job = read_job(name, storage_path)
    assert job.job_dir is not None
    generations = job.records.get("generations", [])
    rows = metric_rows(job.records.get("reports", []), job.records.get("steps", []), generations)
    keys = numeric_keys(rows)
    result = PlotResult(name, [], keys[:MAX_PANELS], keys[MAX_PANELS:])
    if not rows or not keys:
        return result
    t0 = float(generations[0]["time"]) if generations else None
    marks = _marks(generations, job.failures, t0)
    out = job.job_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    for x in ("step", "time"):
        figure = figure_cls(figsize=(9, 1.2 + 2.3 * len(result.keys)), layout="constrained")
        canvas_cls(figure)
        panels = [_panel(figure.add_subplot(len(result.keys), 1, i + 1), rows, key, x, marks)
                  for i, key in enumerate(result.keys)]
        figure.suptitle(f"{name}: reported values against "
                        f"{'optimizer step' if x == 'step' else 'wall time'}")
        path = out / f"metrics_vs_{x}.png"
        figure.savefig(path, dpi=90)
        result.figures.append(PlotFigure(path, x, panels))
    return result


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(
            f"plotting needs matplotlib, which cannot be imported here ({exc}): install the "
            "extra with pip install 'synctrain[plot]' (or pip install matplotlib)") from None
    return FigureCanvasAgg, Figure


def _marks(generations: list[dict[str, Any]], failures: list[dict[str, Any]],
           t0: float | None) -> list[dict[str, Any]]:
    """Vertical marks: each generation after the first (where it started), each failure."""
    out = []
    for g in generations[1:]:
        out.append({"kind": "generation", "label": f"generation {g['generation']}",
                    "step": g.get("start_step"), "time": _since(g.get("time"), t0)})
    for f in failures:
        who = f"rank {f['rank']}" if f.get("rank") is not None else "job"
        out.append({"kind": "failure", "label": f"failure: {f.get('kind')} ({who})",
                    "step": f.get("step"), "time": _since(f.get("time"), t0)})
    return out


def _since(when: Any, t0: float | None) -> float | None:
    return float(when) - t0 if isinstance(when, (int, float)) and t0 is not None else None


def _panel(ax: Any, rows: list[dict[str, Any]], key: str, x: str,
           marks: list[dict[str, Any]]) -> dict[str, Any]:
    points = [(row[x], float(row[key])) for row in rows
              if is_number(row.get(key)) and isinstance(row.get(x), (int, float))]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, label=key, gid="value", marker="." if len(points) < DOTS_BELOW else None)
    shown_kinds: set[str] = set()
    for mark in marks:
        where = mark[x]
        if where is None:
            continue
        failure = mark["kind"] == "failure"
        ax.axvline(where, color="tab:red" if failure else "0.5", linestyle=":" if failure else "--",
                   linewidth=1.2, gid=_MARKER_GID,
                   label=mark["kind"] if mark["kind"] not in shown_kinds else "_nolegend_")
        shown_kinds.add(mark["kind"])
    ax.set_xlabel("optimizer step" if x == "step" else "time since the job started (s)")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    if shown_kinds:
        ax.legend(loc="best", fontsize="small")
    lines = [line for line in ax.get_lines() if line.get_gid() == "value"]
    return {"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "lines": [line.get_label() for line in lines],
            "points": sum(len(line.get_xdata()) for line in lines),
            "markers": sum(1 for line in ax.get_lines() if line.get_gid() == _MARKER_GID)}


__all__ = ["PlotDependencyError", "PlotFigure", "PlotResult", "plot_job"]
