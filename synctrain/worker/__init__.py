"""The worker side: the Ray actor that runs one rank (``actor``) and the step boundary (``step``)."""

from synctrain.worker.actor import DriverObjectLoadError, TrainWorker

__all__ = ["TrainWorker", "DriverObjectLoadError"]
