"""The recipe's `base.dtype`: `auto` follows what the machine runs natively."""

from __future__ import annotations

import pytest
import torch

from retrieval_head.training import setup


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_only_where_the_machine_runs_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(setup, "native_bfloat16", lambda: native)
    assert setup.base_dtype("auto") == expected
    assert setup.base_dtype("float16") == torch.float16  # a named precision is taken as given
