"""Shared fixtures. Each fixture family lives in its own plugin module."""

pytest_plugins = ["tests.fixtures_redis", "tests.fixtures_data", "tests.fixtures_bundle"]
