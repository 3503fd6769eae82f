"""The process environment every launcher process and rank shares: offline hub, quiet libraries, one copy of
each warning."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """No hub lookups for local files, one copy of each warning, no per-library progress bars."""
    # Local files need no hub, and a hub lookup on a closed network waits for a timeout. HF_HUB_OFFLINE=0
    # lets workers download models by hub id.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' "Loading weights" bar and the hub's: the launcher says its phases itself, and off a terminal a
    # bar is a line of carriage returns.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_nvidia() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extension_build_dir(sys.prefix))
    _own_ninja_first()
    defer_deepspeed_autotuner()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("once", category=UserWarning)
    # bitsandbytes' CPU backend probes for an optional hub kernel package on import and warns when absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Hugging Face's `kernels` says on every load, offline, that it skips a publisher check nobody asked for.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # ... and its 8-bit matmul logs the same cast warning on every call: show each such message once.
    once = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, OncePerMessage) for f in once.filters):
        once.addFilter(OncePerMessage())


def extension_build_dir(prefix: str) -> str:
    """Where this Python environment's DeepSpeed ops (CPU Adam, the shared-memory collectives) are compiled: a folder
    of its own. Torch's default, ~/.cache/torch_extensions, is shared by every environment of the user, and two
    environments' builds differ (each names its own include paths), so each environment's first run rebuilt the
    library the other had built, in place, while ranks of the other could be loading it: a CI checkout and a developer
    tree on one machine lost a rank to SIGABRT that way (the build logs showed the library rebuilt by each in turn)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(os.path.realpath(prefix).encode()).hexdigest()[:12]
    return os.path.join(cache, "torch_extensions", f"env-{tag}")


def _own_ninja_first() -> None:
    """Put this environment's `ninja` (the pip package torch's op builds use) first on PATH, as an activated
    environment has it. A process whose PATH found the system's ninja instead (another version, hence other
    command hashes in the build log) rebuilt, in place, the library the other ninja had built: every launch form
    must build alike."""
    own = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(own, "ninja")):
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != own:
        os.environ["PATH"] = own + os.pathsep + path


class _DeferredAutotuner(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the package `deepspeed.autotuning` without running its `__init__`, whose one line imports the
    autotuner and, through it, mlflow: 2-3 s of every ZeRO rank's start (deepspeed's runtime config imports
    `deepspeed.autotuning.config`), for a tool the launcher never runs. The package's modules import as usual, and
    `deepspeed.autotuning.Autotuner` (DeepSpeed's own runner uses it) is imported when first asked for."""

    NAME = "deepspeed.autotuning"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None:
            spec.loader = self
        return spec

    def create_module(self, spec):
        return None  # the default module, with __path__ from the spec: its submodules are found as usual

    def exec_module(self, module) -> None:
        def __getattr__(name: str):
            if name == "Autotuner":
                from deepspeed.autotuning.autotuner import Autotuner

                return Autotuner
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__


def defer_deepspeed_autotuner() -> None:
    """Install `_DeferredAutotuner` once, before anything imports deepspeed (a no-op once it has)."""
    if _DeferredAutotuner.NAME in sys.modules or any(isinstance(f, _DeferredAutotuner) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferredAutotuner())


class OncePerMessage(logging.Filter):
    """Let each distinct log message through the first time only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _has_nvidia() -> bool:
    return os.path.exists("/dev/nvidiactl")
