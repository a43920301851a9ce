"""Errors a synctrain user can meet. Each says what happened and what to do."""

from __future__ import annotations


class SynctrainError(Exception):
    """Base class of every error synctrain raises on purpose."""


class ConfigError(SynctrainError, ValueError):
    """The Trainer was given arguments it cannot run with; nothing was started."""


class ResourcesError(SynctrainError):
    """The cluster cannot provide what the job asks for; nothing was started."""


class TrainingFailedError(SynctrainError):
    """A rank's training loop raised. ``rank`` names it; ``remote_traceback`` is its traceback."""

    def __init__(self, rank: int, remote_traceback: str, exc_type: str) -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exc_type = exc_type
        super().__init__(
            f"the training loop raised {exc_type} on rank {rank}; the other workers were stopped.\n"
            f"Traceback from rank {rank}:\n{remote_traceback}"
        )


class WorkerDiedError(SynctrainError):
    """A worker process went away (killed, crashed, out of memory) while the job ran."""

    def __init__(self, rank: int, detail: str) -> None:
        self.rank = rank
        super().__init__(
            f"worker of rank {rank} died while training ({detail}); the other workers were "
            "stopped. Check the worker's logs (ray logs) for the cause, e.g. out-of-memory."
        )


class ModelMismatchError(SynctrainError, RuntimeError):
    """Ranks built models of different shapes; data-parallel training needs the same model."""
