"""Passages' keys and values computed once and reused by every answer prompt that cites them.

Documents are static, so what the LM computes over a passage can be computed at index time (or the first time the
passage is retrieved) instead of in the turn. Each passage is computed after a fixed prefix (the head's chat
rendering up to a user message's text) and moved to where an answer prompt puts it by rotating its keys: rotary
position embeddings compose (R(p + d) = R(d) R(p)), so a shifted key equals the key computed at the new position.
What does not carry over is attention from the passage to the dialogue before it: the answer reads each passage
as computed without the dialogue (as block-attention and TurboRAG do). `benchmarks/agent_rag_turn.py` measures
how often that changes the answer. Models without rotary positions (gpt2's learned positions) are refused: a
probe at construction checks that shifting reproduces the keys of a real forward at the new position.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retrieval_head.agent.history import template_prefix
from retrieval_head.core.kv_cache import cache_only, output_cache
from retrieval_head.core.templates import padding_id

if TYPE_CHECKING:
    from retrieval_head.core.model import RetrievalModel

PASSAGES_FILE = "passages.safetensors"
PASSAGE_FORMAT = "\n\nSearch result: {passage}"
"""How one passage is written into the answer prompt ({passage}: its text); each is computed (and cached) alone."""


@dataclass(frozen=True)
class PassageStates:
    """One passage's token ids and, per layer, its keys and values ([1, kv heads, tokens, head dim]) as computed at
    positions `start`, `start + 1`, ..."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int


class PassageCache:
    """Keys and values of passages for a `SearchFirstAgent`'s answer prompts, computed once per passage text.

    Args:
        model: the agent's `RetrievalModel` (its base computes the passages; its renderer gives the prefix).
        passage_format: how a passage is written in the prompt; must contain '{passage}'.
        max_passages: how many passages are kept in memory (least recently used dropped first); None: all.
    """

    def __init__(self, model: RetrievalModel, passage_format: str = PASSAGE_FORMAT,
                 max_passages: int | None = 4096) -> None:
        if "{passage}" not in passage_format:
            raise ValueError("passage_format must contain '{passage}'")
        if max_passages is not None and max_passages <= 0:
            raise ValueError(f"max_passages must be positive or None, got {max_passages}")
        self.model, self.tokenizer = model, model.tokenizer
        self.passage_format, self.max_passages = passage_format, max_passages
        self.prefix_ids: list[int] = template_prefix(model)[1]
        self.inv_freq = rotary_frequencies(model.base_model)
        self._store: OrderedDict[str, PassageStates] = OrderedDict()
        self.computed_passages = self.computed_tokens = self.reused_passages = 0
        self.probe = check_shift(self)
        """The last layer's keys of a fixed probe: what a saved cache is checked against (the same base, adapter
        and precision compute the same keys)."""

    def __len__(self) -> int:
        return len(self._store)

    def segment(self, passage: str) -> str:
        """The passage as the prompt writes it."""
        return self.passage_format.format(passage=passage)

    def states(self, passages: Sequence[str], batch_size: int = 8) -> list[PassageStates]:
        """Each passage's states, computing (in batches) only those not cached yet."""
        keys = [self._key(p) for p in passages]
        missing = list(dict.fromkeys(p for p, key in zip(passages, keys, strict=True) if key not in self._store))
        for i in range(0, len(missing), batch_size):
            self._compute(missing[i : i + batch_size])
        self.reused_passages += len(passages) - len(missing)
        found = []
        for key in keys:
            self._store.move_to_end(key)
            found.append(self._store[key])
        self._evict()
        return found

    def build(self, passages: Sequence[str], batch_size: int = 8, show_progress_bar: bool = False) -> None:
        """Compute the passages ahead of the turns that cite them (at index time)."""
        from tqdm.auto import tqdm

        todo = list(dict.fromkeys(p for p in passages if self._key(p) not in self._store))
        for i in tqdm(range(0, len(todo), batch_size), desc="Passages", disable=not show_progress_bar):
            self._compute(todo[i : i + batch_size])
            self._evict()

    def extend(self, cache: Any, states: Sequence[PassageStates], position: int) -> list[int]:
        """Append the passages' keys and values to `cache` (which covers positions < `position`), each rotated to
        where it follows; returns their token ids in order."""
        ids: list[int] = []
        keys, values = [], []
        for passage in states:  # every layer of a passage turns by the same angle: one rotation of them all
            rotation = self._rotation(position + len(ids) - passage.start, passage.keys[0])
            keys.append(rotate(torch.stack(passage.keys), *rotation).unbind(0))
            values.append(passage.values)
            ids += passage.ids
        if states:
            for layer in range(len(states[0].keys)):  # one append per layer
                cache.update(torch.cat([k[layer] for k in keys], dim=-2),
                             torch.cat([v[layer] for v in values], dim=-2), layer)
        return ids

    def save(self, folder: str | Path) -> Path:
        """Write every cached passage to `folder`/passages.safetensors (atomically: a failed save leaves the folder
        as it was), with what `load` checks: the passage format, the prefix and the base's probe keys."""
        from safetensors.torch import save_file

        from retrieval_head.io.folder import write_folder_atomically

        tensors = {"probe": self.probe.contiguous()}
        entries = []
        for key, states in self._store.items():
            tensors[f"{key}.keys"] = torch.stack(states.keys).cpu().contiguous()
            tensors[f"{key}.values"] = torch.stack(states.values).cpu().contiguous()
            entries.append([key, states.ids, states.start])
        meta = {"passage_format": self.passage_format, "prefix_ids": json.dumps(self.prefix_ids),
                "entries": json.dumps(entries)}
        return write_folder_atomically(folder, lambda staging: save_file(tensors, staging / PASSAGES_FILE, meta))

    def load(self, folder: str | Path) -> int:
        """Add the passages saved in `folder` (by `save`); returns how many. Refused when they were computed by
        another base, adapter or precision, or with another passage format or prefix: they would be wrong here."""
        from safetensors import SafetensorError, safe_open

        file = Path(folder) / PASSAGES_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no saved passage cache in {folder} (expected {PASSAGES_FILE}; write one with "
                                    "PassageCache.save)")
        unreadable = (SafetensorError, KeyError, OSError, json.JSONDecodeError)
        try:
            with safe_open(str(file), framework="pt") as saved:
                meta = saved.metadata() or {}
                self._check_saved(file, meta, saved.get_tensor("probe"))
                entries = json.loads(meta["entries"])
                device = self.model.device
                loaded = [(key, ids, start, saved.get_tensor(f"{key}.keys").to(device),
                           saved.get_tensor(f"{key}.values").to(device)) for key, ids, start in entries]
        except unreadable as err:
            raise ValueError(f"{file}: not a readable passage cache ({type(err).__name__}: {err}); rebuild it with "
                             "SearchFirstAgent.prepare_passages and PassageCache.save") from err
        for key, ids, start, keys, values in loaded:
            self._store[key] = PassageStates(ids, list(keys.unbind(0)), list(values.unbind(0)), start)
            self._store.move_to_end(key)
            self._evict()
        return min(len(loaded), len(self._store))

    def _check_saved(self, file: Path, meta: dict[str, str], probe: torch.Tensor) -> None:
        if meta.get("passage_format") != self.passage_format:
            raise ValueError(f"{file}: saved with passage_format {meta.get('passage_format')!r}, this cache writes "
                             f"{self.passage_format!r}; build it with the same format or rebuild the passages")
        if json.loads(meta.get("prefix_ids", "null")) != self.prefix_ids:
            raise ValueError(f"{file}: its passages follow another prefix (another chat template or system prompt); "
                             "rebuild them for this model")
        if probe.shape != self.probe.shape or probe.dtype != self.probe.dtype or not torch.allclose(
                probe.float(), self.probe.float(), atol=1e-3, rtol=1e-2):
            raise ValueError(f"{file}: its passages were computed by another base, adapter or precision "
                             f"(probe keys {tuple(probe.shape)} {probe.dtype} differ from this model's "
                             f"{tuple(self.probe.shape)} {self.probe.dtype}); rebuild them for this model")

    # --- internals ---------------------------------------------------------------------------------------------
    def _key(self, passage: str) -> str:
        return hashlib.sha1(self.segment(passage).encode("utf-8")).hexdigest()

    def _compute(self, passages: list[str]) -> None:
        """One right-padded forward of prefix + passage per row; each keeps its own tokens' keys and values."""
        prefix, base = self.prefix_ids, self.model.base_model
        rows = [self.tokenizer(self.segment(p), add_special_tokens=False)["input_ids"] for p in passages]
        width = len(prefix) + max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), padding_id(self.tokenizer), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(rows):
            input_ids[row, : len(prefix) + len(ids)] = torch.tensor(prefix + ids)
            mask[row, : len(prefix) + len(ids)] = 1
        device = self.model.device
        with torch.inference_mode():
            out = base(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=True,
                       **cache_only(base))
        layers = output_cache(out).layers
        a = len(prefix)
        for row, (passage, ids) in enumerate(zip(passages, rows, strict=True)):
            b = a + len(ids)
            self._store[self._key(passage)] = PassageStates(
                ids, [layer.keys[row : row + 1, :, a:b].clone() for layer in layers],
                [layer.values[row : row + 1, :, a:b].clone() for layer in layers], a)
            self.computed_passages += 1
            self.computed_tokens += len(ids)

    def _evict(self) -> None:
        while self.max_passages is not None and len(self._store) > self.max_passages:
            self._store.popitem(last=False)

    def _rotation(self, shift: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = shift * self.inv_freq.to(device=like.device, dtype=torch.float64)
        angle = torch.cat([angle, angle])
        return angle.cos().float(), angle.sin().float()


def rotary_frequencies(base: nn.Module) -> torch.Tensor:
    """The inverse frequencies of the base's one rotary position embedding, or a ValueError naming why none fits."""
    found = [m for m in base.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len(found) != 1:
        kind = "no rotary position embedding" if not found else f"{len(found)} rotary position embeddings"
        raise ValueError(f"a PassageCache moves passages by rotating their keys, and this base has {kind}; use the "
                         "SearchFirstAgent without a passage_cache (it computes the passages in the turn)")
    rope_type = getattr(found[0], "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"{rope_type!r} rotary scaling changes with the sequence length, so a passage's keys cannot "
                         "be moved; use the SearchFirstAgent without a passage_cache")
    return found[0].inv_freq.detach().float().cpu()


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys moved by the rotation (cos, sin) over the last dimension (rotate-half layout, as llama writes it)."""
    half = keys.shape[-1] // 2
    x = keys.float()
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + turned * sin).to(keys.dtype)


def check_shift(passages: PassageCache, shift: int = 7) -> torch.Tensor:
    """Refuse a base whose keys do not move by rotation: a probe's keys computed at positions p, shifted, must
    equal, in every layer, the same probe's keys computed at p + shift. Returns the probe's last-layer keys."""
    base = passages.model.base_model
    ids = passages.tokenizer("probe of positions", add_special_tokens=False)["input_ids"][:4] or [0]
    ids_t = torch.tensor([ids], device=passages.model.device)
    runs = []
    with torch.inference_mode():
        for offset in (0, shift):
            positions = torch.arange(offset, offset + len(ids), device=ids_t.device)[None]
            runs.append(output_cache(base(input_ids=ids_t, position_ids=positions, use_cache=True,
                                          **cache_only(base))).layers)
    cos, sin = passages._rotation(shift, runs[0][0].keys)
    tolerance = 1e-4 if runs[0][0].keys.dtype == torch.float32 else 3e-2
    for here, there in zip(*runs, strict=True):
        if here.keys.shape[-1] != cos.shape[-1] or not torch.allclose(
                rotate(here.keys, cos, sin).float(), there.keys.float(), atol=tolerance, rtol=tolerance):
            raise ValueError(f"{type(base).__name__}'s keys do not move with a rotation of their positions (no rotary "
                             "position embedding over the whole head in the rotate-half layout); use the "
                             "SearchFirstAgent without a passage_cache")
    return runs[0][-1].keys.detach().cpu().clone()


__all__ = ["PASSAGES_FILE", "PASSAGE_FORMAT", "PassageCache", "PassageStates"]
