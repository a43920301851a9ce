"""synctrain — fault-tolerant data-parallel PyTorch training on Ray.

Wrap an ordinary training loop with the helpers below and run it with :class:`Trainer`; the
same loop runs unchanged in a plain Python process, where the helpers are no-ops.
"""

from synctrain.api import (
    all_reduce,
    barrier,
    broadcast,
    get_context,
    heartbeat,
    prepare_data_loader,
    prepare_model,
    prepare_optimizer,
    register_state,
    report,
    strategy_metrics,
)
from synctrain.checkpoint import load as load_checkpoint
from synctrain.context import TrainContext
from synctrain.errors import (
    ConfigError,
    ModelMismatchError,
    ResourcesError,
    SynctrainError,
    TrainingFailedError,
    WorkerDiedError,
)
from synctrain.jobs import JobRecord, read_job
from synctrain.plots import plot_job
from synctrain.ps.errors import (
    NonFiniteGradientError,
    ParameterServerError,
    StaleJobError,
    StalenessTimeoutError,
)
from synctrain.trainer import Result, Trainer

__version__ = "0.1.0"

__all__ = [
    "Trainer",
    "Result",
    "read_job",
    "plot_job",
    "JobRecord",
    "TrainContext",
    "get_context",
    "prepare_model",
    "prepare_optimizer",
    "prepare_data_loader",
    "report",
    "all_reduce",
    "broadcast",
    "barrier",
    "strategy_metrics",
    "register_state",
    "load_checkpoint",
    "heartbeat",
    "SynctrainError",
    "ConfigError",
    "ResourcesError",
    "TrainingFailedError",
    "WorkerDiedError",
    "ModelMismatchError",
    "ParameterServerError",
    "StaleJobError",
    "StalenessTimeoutError",
    "NonFiniteGradientError",
]
