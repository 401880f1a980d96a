"""Environment for talking to the test Hub server; import and call this BEFORE importing huggingface_hub.

``huggingface_hub`` (and ``transformers`` through it) reads ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` once,
at import time, so the port must be chosen first: ``reserve_port()`` picks a free one, the server binds it
later.
Only the standard library is imported here.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit


def reserve_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the server binds it later; the window for a race is tiny)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configure_hub_env(port: int, hf_home: str | Path) -> None:
    """Point the Hub client at ``http://127.0.0.1:{port}`` with an isolated cache in ``hf_home``.

    Also drops ``HF_TOKEN`` / ``HF_HUB_OFFLINE`` inherited from the shell, so that anonymous requests really
    are anonymous and loopback is not blocked.
    """
    os.environ.update(
        {
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(hf_home),
        }
    )
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
    ):
        os.environ.pop(name, None)


def hub_port() -> int | None:
    """The port of a loopback ``HF_ENDPOINT`` already in the environment, if any."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", ""))
    return endpoint.port if endpoint.hostname == "127.0.0.1" else None


def setup_hub_env() -> int:
    """Idempotent setup: reuse a loopback ``HF_ENDPOINT`` already set (e.g. by conftest), else configure one.

    Returns the port the test server must bind. Raises if ``huggingface_hub`` was imported with another
    endpoint, which would send downloads to the real Hub.
    """
    port = hub_port()
    if port is None:
        port = reserve_port()
        configure_hub_env(port, tempfile.mkdtemp(prefix="hf-home-"))
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and os.environ["HF_ENDPOINT"] != constants.ENDPOINT:
        raise RuntimeError(
            f"huggingface_hub was imported with HF_ENDPOINT={constants.ENDPOINT!r} before setup_hub_env(); "
            "call it before importing huggingface_hub or transformers"
        )
    return port
