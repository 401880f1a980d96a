"""Import paths of 0.1.0 that moved when the package was regrouped into rooms (CHANGELOG.md): they keep
working for one release and warn with the new path. `retrieval_head.sentence_transformers_modules` is named
by every saved head's `modules.json`, so it stays, without a warning."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

_P = "retrieval_head."
MOVED: dict[str, tuple[str, ...]] = {
    "config": ("core.config",),
    "head": ("core.head",),
    "pooling": ("core.pooling",),
    "templates": ("core.templates",),
    "layer_states": ("core.layer_states",),
    "kv_cache": ("core.kv_cache",),
    "quantization": ("core.quantization",),
    "encode": ("core.encode",),
    "model": ("core.model", "core.base"),
    "encode_adapter": ("adapters.encode_adapter", "adapters.recorded"),
    "persistence": ("io.folder", "core.config"),
    "saving": ("io.save",),
    "loading": ("io.load",),
    "hub": ("io.hub",),
    "modelcard": ("io.modelcard",),
    "auto": ("io.auto",),
    "defaults": ("io.embedded",),
    "cache": ("io.tensor_cache",),
    "fingerprint": ("retrieval.fingerprint",),
    "index": ("retrieval.index",),
    "data": ("retrieval.data",),
    "features": ("training.features",),
    "losses": ("training.losses",),
    "training.teacher_cache": ("retrieval.teacher",),
    "training.evaluation": ("training.split_evaluation",),
    "training.encode_adapter": ("training.adapter_distillation",),
}
"""old path -> new module(s), both under `retrieval_head.`; the first holds most names."""
STABLE = {"sentence_transformers_modules": "io.sentence_transformers_modules"}


class _Alias(types.ModuleType):
    """An old path: each name is looked up in the modules it moved to (the same objects, not copies)."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name)
        self._targets = targets

    def __getattr__(self, name: str) -> object:
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {self._targets[0]!r}) has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname[len(_P):] if fullname.startswith(_P) else None
        if old in MOVED or old in STABLE:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        old = spec.name[len(_P):]
        if old in STABLE:
            return _Alias(spec.name, (_P + STABLE[old],))
        targets = tuple(_P + t for t in MOVED[old])
        warnings.warn(f"{spec.name} moved to {targets[0]} (retrieval-head 0.2, CHANGELOG.md); the old path goes in "
                      "the next release.", DeprecationWarning, stacklevel=2)
        return _Alias(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the alias reads the new modules on first use."""


def install() -> None:
    """Put the alias finder on `sys.meta_path` once (after the normal finders: real modules always win)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
