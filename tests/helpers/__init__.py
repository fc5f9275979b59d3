"""Helpers shared by the tests (not part of the installed package). tests/ is on `sys.path` while the
suite runs (tests/conftest.py's folder; the multi-process tests' forkserver gets it through PYTHONPATH),
so tests and their workers import them as `helpers.<module>`."""
