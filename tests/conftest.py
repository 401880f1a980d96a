"""Test set-up. The Hub endpoint must be set before huggingface_hub / transformers are imported."""

from _hub_env import setup_hub_env

setup_hub_env()

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["hub_fixtures"]

torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine


@pytest.fixture(scope="session")
def embedded_agent():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (dequantized once into the cache)."""
    from retrieval_head.io.embedded import load_embedded_base

    return load_embedded_base()


@pytest.fixture(scope="session")
def embedded_teacher():
    """The embedded all-MiniLM-L6-v2 teacher."""
    from retrieval_head.io.embedded import load_teacher

    return load_teacher()
