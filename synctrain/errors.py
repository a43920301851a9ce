"""Errors a synctrain user can meet. Each says what happened and what to do."""

from __future__ import annotations


class SynctrainError(Exception):
    """Base class of every error synctrain raises on purpose."""


class ConfigError(SynctrainError, ValueError):
    """The Trainer was given arguments it cannot run with; nothing was started."""


class ResultNotPicklableError(ConfigError, TypeError):
    """The training loop returned a value that cannot be sent back to the driver."""


class JobExistsError(ConfigError):
    """``job_name`` names a job that already exists under ``storage_path``; nothing was touched."""


class ResourcesError(SynctrainError):
    """The cluster cannot provide what the job asks for; nothing was started."""


class TrainingFailedError(SynctrainError):
    """The job failed. ``rank`` names the rank whose failure ended it; for a loop that raised,
    ``remote_traceback`` is its traceback. ``failures``: every failure of the job, as in
    ``Result.failures`` (one dict each: generation, rank, kind, step, time, recovery, recovery_s)."""

    def __init__(self, rank: int | None, remote_traceback: str, exc_type: str, *,
                 failures: list[dict] | None = None, message: str | None = None) -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exc_type = exc_type
        self.failures = list(failures or [])
        self.metrics: list[dict] = []  # rank 0's committed reports until the job failed
        super().__init__(message or (
            f"the training loop raised {exc_type} on rank {rank}; the other workers were stopped.\n"
            f"Traceback from rank {rank}:\n{remote_traceback}"
        ))


class WorkerDiedError(TrainingFailedError):
    """A worker process went away (killed, crashed, out of memory, or stalled and killed)."""

    def __init__(self, rank: int | None, detail: str, *, failures: list[dict] | None = None) -> None:
        super().__init__(rank, "", "WorkerDied", failures=failures, message=(
            f"worker of rank {rank} died while training ({detail}); the other workers were "
            "stopped. Check the worker's logs (ray logs) for the cause, e.g. out-of-memory."))


class CollectiveError(SynctrainError, RuntimeError):
    """A collective could not complete because a peer rank vanished (its process exited, its
    loop raised) or did not arrive in time. The message names that rank; its own failure is
    the cause, and the driver treats this error as secondary to it."""


class ModelMismatchError(SynctrainError, RuntimeError):
    """Ranks built models of different shapes; data-parallel training needs the same model."""
