"""Old import paths of modules that moved in 0.2, kept working for one release with a warning.

Recipes users copied import e.g. `launcher.tagger`; a finder on `sys.meta_path` hands them the module at its new
path (the same module object, so there is one copy of every class) and says where it lives now."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "launcher.datacache": "launcher.data.cache",
    "launcher.sampling": "launcher.data.sampling",
    "launcher.tagger": "launcher.tasks.tagging",
    "launcher.crf": "launcher.tasks.crf",
    "launcher.spans": "launcher.tasks.spans",
    "launcher.sft": "launcher.tasks.sft",
    "launcher.vocab": "launcher.tasks.vocab",
    "launcher.worker.metrics": "launcher.tasks.metrics",
}


class MovedWarning(FutureWarning):
    """An import path that works for one more release; the message names the new one."""


def warn_moved(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} goes away in the next release)", MovedWarning, stacklevel=4
    )


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warn_moved(spec.name, MOVED[spec.name])
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__  # the import system overwrites __spec__ with the alias's; put it back
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
