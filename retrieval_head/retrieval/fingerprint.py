"""`TeacherFingerprint`: what identifies the embedding space a head maps into and an index was built in."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from retrieval_head.core.errors import RetrievalHeadError

logger = logging.getLogger(__name__)

# Fixed probe sentences; changing them changes every checksum, so never edit this list.
PROBE_SENTENCES: tuple[str, ...] = (
    "What is the capital of France?",
    "The mitochondria is the powerhouse of the cell.",
    "Does the hotel have free parking and wifi?",
    "A quick brown fox jumps over the lazy dog.",
)
CHECKSUM_DECIMALS = 4
# Fields that decide whether two embedding spaces are the same; teacher_id/revision are names only.
IDENTITY_FIELDS: tuple[str, ...] = ("dim", "similarity_fn_name", "normalized", "probe_checksum")


class TeacherMismatchError(RetrievalHeadError, ValueError):
    """Raised when an artefact (index, head, config) belongs to a different teacher than expected."""


def probe_checksum(embeddings: np.ndarray, decimals: int = CHECKSUM_DECIMALS) -> str:
    """sha256 of embeddings rounded to `decimals` places (so float noise below that does not change it)."""
    rounded = np.round(np.asarray(embeddings, dtype=np.float64), decimals) + 0.0  # +0.0 turns -0.0 into 0.0
    text = "\n".join(" ".join(f"{value:.{decimals}f}" for value in row) for row in np.atleast_2d(rounded))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _default_teacher_id(model: Any) -> str:
    """Best-effort name of a SentenceTransformer: model card base model, else the backbone's name_or_path."""
    card = getattr(model, "model_card_data", None)
    for attr in ("base_model", "model_id"):
        value = getattr(card, attr, None)
        if value:
            return str(value)
    try:
        first = model[0]
        config = getattr(getattr(first, "auto_model", None), "config", None)
        if config is not None and getattr(config, "_name_or_path", None):
            return str(config._name_or_path)
    except (TypeError, IndexError, KeyError):
        pass
    return "unknown"


@dataclass(frozen=True)
class TeacherFingerprint:
    """Identity of a teacher's embedding space: name, revision, size, similarity, normalisation, checksum."""

    teacher_id: str
    revision: str | None
    dim: int
    similarity_fn_name: str
    normalized: bool
    probe_checksum: str

    @classmethod
    def from_sentence_transformer(
        cls, model: Any, teacher_id: str | None = None, revision: str | None = None
    ) -> TeacherFingerprint:
        """Fingerprint a SentenceTransformer (or anything with `encode` + `similarity_fn_name`)."""
        embeddings = np.asarray(
            model.encode(list(PROBE_SENTENCES), convert_to_numpy=True, normalize_embeddings=False),
            dtype=np.float64,
        )
        norms = np.linalg.norm(embeddings, axis=1)
        card = getattr(model, "model_card_data", None)
        return cls(
            teacher_id=teacher_id or _default_teacher_id(model),
            revision=revision if revision is not None else getattr(card, "base_model_revision", None),
            dim=int(embeddings.shape[1]),
            similarity_fn_name=str(getattr(model, "similarity_fn_name", None) or "cosine"),
            normalized=bool(np.allclose(norms, 1.0, atol=1e-3)),
            probe_checksum=probe_checksum(embeddings),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the form stored in the head config and the index metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherFingerprint:
        """Inverse of `to_dict`; unknown keys are dropped with a warning, missing ones raise."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("Ignoring unknown TeacherFingerprint keys %s (from a newer version?)", unknown)
        missing = sorted(names - set(data) - {"revision"})
        if missing:
            raise ValueError(f"TeacherFingerprint dict lacks {missing}; got keys {sorted(data)}")
        kwargs = {k: data.get(k) for k in names}
        kwargs["dim"] = int(kwargs["dim"])
        kwargs["normalized"] = bool(kwargs["normalized"])
        return cls(**kwargs)

    def differences(self, other: TeacherFingerprint) -> dict[str, tuple[Any, Any]]:
        """Differing identity fields (dim, similarity, normalisation, checksum): name -> (self, other)."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in IDENTITY_FIELDS
            if getattr(self, name) != getattr(other, name)
        }

    def describe(self) -> str:
        """Short human-readable name, e.g. `sentence-transformers/all-MiniLM-L6-v2@abc123`."""
        return self.teacher_id + (f"@{self.revision}" if self.revision else "")

    def check_matches(self, other: TeacherFingerprint, what: str = "index") -> None:
        """Raise `TeacherMismatchError` unless `other` (the `what`'s teacher) is the same space as `self`.

        Only the identity fields count: the same weights under another name (a local path vs a Hub id) match,
        with a debug log line; a different checksum means different embeddings, whatever the names say.
        """
        diffs = self.differences(other)
        if not diffs:
            if (self.teacher_id, self.revision) != (other.teacher_id, other.revision):
                logger.debug(
                    "Teacher names differ (%s vs %s) but embeddings match", self.describe(), other.describe()
                )
            return
        detail = "; ".join(f"{name}: expected {a!r}, {what} has {b!r}" for name, (a, b) in diffs.items())
        raise TeacherMismatchError(
            f"The {what} was built with teacher {other.describe()!r}, but the expected teacher is "
            f"{self.describe()!r}; they differ in {detail}. "
            "Vectors from different teachers are not comparable. "
            f"Fix: rebuild the {what} with the expected teacher (e.g. DocumentIndex.build(teacher, corpus)), "
            f"or load the head that was trained against {other.describe()!r}."
        )
