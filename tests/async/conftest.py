"""One Ray instance for the whole async test session (started only if none is running)."""

from __future__ import annotations

import logging

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session():
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
