"""The worker side: the Ray actor that runs one rank (``actor``) and the step boundary (``step``)."""

from synctrain.worker.actor import DriverObjectLoadError, TrainWorker, _free_port

__all__ = ["TrainWorker", "DriverObjectLoadError", "_free_port"]
