"""The real-server fixtures (tests/server_fixtures.py), shared with tests/browser."""

from server_fixtures import demo_models, object_info, server, server_loras  # noqa: F401
