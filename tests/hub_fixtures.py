"""Pytest fixtures for the test Hub server.

``huggingface_hub`` reads ``HF_ENDPOINT`` at import, so the environment must be set before any test module (or
plugin) imports it. At the very top of ``tests/conftest.py``, before other imports::

    from _hub_env import setup_hub_env

    setup_hub_env()
    pytest_plugins = ["hub_fixtures"]

``setup_hub_env()`` reserves a port with ``reserve_port()`` and calls ``configure_hub_env(port, hf_home)``;
the ``hub`` fixture then binds the server to that port.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _hub_env import configure_hub_env, reserve_port, setup_hub_env
from hub_server import HubServer

__all__ = ["configure_hub_env", "hub", "reserve_port"]


@pytest.fixture(scope="session")
def hub() -> Iterator[HubServer]:
    """A running ``HubServer`` on the port ``HF_ENDPOINT`` names; tokens ``hf_alice`` / ``hf_bob``."""
    with HubServer(port=setup_hub_env()) as server:
        yield server
