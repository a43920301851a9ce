"""Async-mode tests share the session-wide Ray instance of ``tests/conftest.py`` (``ray_session``:
started once with 4 logical CPUs, only if Ray is not already running). Nothing to add here."""
