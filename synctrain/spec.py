"""JobSpec: everything the driver decided about a job, handed to every worker and strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobSpec:
    """A validated, picklable description of one training job.

    ``strategy_options`` holds the mode-specific knobs, already validated by the strategy's
    ``validate_options`` (sync: shard_optimizer, grad_compression, grad_accum_steps, ...;
    async: staleness, num_ps_shards, ...).
    """

    job_id: str
    mode: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    seed: int = 0
    strategy_options: dict[str, Any] = field(default_factory=dict)
    collective_timeout_s: float = 300.0
