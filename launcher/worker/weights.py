"""A model built without memory, and where its values come from when a rank materializes the part it keeps.

A recipe builds its model under `empty_weights()`: parameters on the meta device (no memory), buffers real (rotary
tables and the like are computed in `__init__` and would be lost on meta). `Weights` then gives any parameter's
value, whole or a range of its rows, from `model=`:
- a folder: its safetensors files (or torch `.bin` files), read tensor by tensor with plain file reads of just the
  bytes asked for (no mmap, whose touched pages would stay in the rank's resident memory);
- random:SHAPE: each tensor drawn from its own generator seeded by (seed, name) (`random_folder.tensor_values`), so
  any rank draws any tensor alone and the values do not depend on the world size or the order.
A parameter the folder lacks or holds in another shape (a new head, a vocabulary learnt from the data) is drawn like
a random one, and a note says so. Which part each rank materializes is its strategy's business (ddp.py: all of it;
fsdp.py: its rows of each parameter; zero.py: one block at a time, partitioned at once); quantized layers are read
whole, one at a time, and quantized on load (adapters.quantize).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator

import torch

from launcher.errors import ConfigError
from launcher.worker.memory import release_freed_memory

# safetensors dtype names -> torch dtypes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Wrapper segments peft adds to a parameter's name (the folder knows the base model's names).
_WRAPPERS = ("base_model.model.",)
_SEGMENTS = (".base_layer.", ".original_module.", ".modules_to_save.default.")


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory) and their buffers real."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def has_meta(module: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def source_name(name: str) -> str:
    """The base model's name of a parameter of the wrapped model (peft's wrappers taken out)."""
    for prefix in _WRAPPERS:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    for segment in _SEGMENTS:
        name = name.replace(segment, ".")
    return name


class _SafetensorsFile:
    """Reads one tensor, or a range of its rows, from a .safetensors file with plain reads."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries = header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        entry = self.entries[key]
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        begin, end = entry["data_offsets"]
        if rows is not None and shape:
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.start + begin)
                f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out


class _BinFile:
    """A torch .bin checkpoint, loaded memory-mapped (weights_only)."""

    def __init__(self, path: str):
        self.tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        self.entries = self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def read(self, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        t = self.tensors[key]
        return (t[rows[0] : rows[1]] if rows is not None else t).clone()


class Folder:
    """The tensors of a model folder by name: model.safetensors, sharded safetensors with their index, or .bin."""

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, _SafetensorsFile | _BinFile] = {}
        self.where: dict[str, str] = {}
        present = sorted(os.listdir(path))
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if index in present:
                with open(os.path.join(path, index)) as f:
                    self.where = dict(json.load(f)["weight_map"])
                return
        names = [n for n in present if n.endswith(".safetensors")] or [n for n in present if n == "pytorch_model.bin"]
        for file_name in names:
            for key in self._file(file_name).entries:
                self.where[key] = file_name

    def _file(self, name: str):
        if name not in self.files:
            full = os.path.join(self.path, name)
            self.files[name] = _SafetensorsFile(full) if name.endswith(".safetensors") else _BinFile(full)
        return self.files[name]

    def key(self, name: str) -> str | None:
        """The folder's key for a parameter name; a folder saved from the bare encoder (no `bert.` prefix), from a
        model with a head (one more prefix), or under another prefix (`bert.` where ours says `encoder.`) still
        matches."""
        if name in self.where:
            return name
        rest = name.partition(".")[2]
        if rest in self.where:
            return rest
        depth = name.count(".")
        candidates = [(name, depth + 1)]
        if (
            "." in rest
        ):  # a swapped prefix needs more than a leaf's name after it (`score.weight` is no `lm_head.weight`)
            candidates.append((rest, depth))
        for tail, dots in candidates:
            found = next((k for k in self.where if k.endswith("." + tail) and k.count(".") == dots), None)
            if found is not None:
                return found
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(self.where[key]).shape(key)

    def read(self, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        return self._file(self.where[key]).read(key, rows)


class Weights:
    """Values of a meta-built model's parameters, by (base model) name: from a folder, else seeded random."""

    def __init__(self, folder: str | None, *, seed: int, std: float):
        self.folder = Folder(folder) if folder else None
        if self.folder is not None and not self.folder.where:
            raise ConfigError(f"model={folder}: no safetensors or pytorch_model.bin weights in it")
        self.seed, self.std = seed, std
        self.notes: list[str] = []
        self.read_bytes = 0

    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Parameter `name` (or its rows [start, stop)), cast to `dtype`."""
        from launcher.random_folder import tensor_values

        release_freed_memory()  # the previous tensor's temporaries
        name = source_name(name)
        shape = tuple(shape)
        key = self.folder.key(name) if self.folder is not None else None
        if key is not None:
            found = self.folder.shape(key)
            if found == shape:
                t = self.folder.read(key, rows)
                self.read_bytes += t.nbytes
                return t.to(dtype)
            self._note(f"{name}: the folder holds {found}, this model needs {shape}: initialised anew")
        elif self.folder is not None:
            self._note(f"{name}: not in the folder (a new head or layer): initialised")
        t = tensor_values(name, shape, seed=self.seed, dtype=dtype, std=self.std)
        return t[rows[0] : rows[1]].clone() if rows is not None else t

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def weights_for(model: torch.nn.Module, model_path: str, *, seed: int) -> Weights:
    """Where `model`'s meta parameters come from: the folder `model_path`, or seeded values for random:SHAPE."""
    from launcher.models import is_random

    config = getattr(model, "config", None)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    return Weights(None if is_random(model_path) else model_path, seed=seed, std=std)


def load_whole(model: torch.nn.Module, model_path: str, *, seed: int) -> torch.nn.Module:
    """A model a recipe built on meta, every parameter made on the CPU in fp32: for one plain process that needs the
    whole model (reloading a saved adapter for predictions, a test comparing weights before and after)."""
    if has_meta(model):
        materialize(model, weights_for(model, model_path, seed=seed), torch.device("cpu"), lambda _: torch.float32)
    return model


def meta_parameters(
    module: torch.nn.Module, prefix: str = ""
) -> list[tuple[str, torch.nn.Module, str, torch.nn.Parameter]]:
    """(qualified name, owning module, attribute, parameter) of every meta parameter, a tied one under each name;
    `prefix` is `module`'s own name in the model (the names the weights know)."""
    out = []
    for owner_name, owner in module.named_modules(remove_duplicate=False, prefix=prefix):
        for attr, p in owner._parameters.items():
            if p is not None and p.device.type == "meta":
                out.append((f"{owner_name}.{attr}" if owner_name else attr, owner, attr, p))
    return out


def replace_meta(
    module: torch.nn.Module,
    make: Callable[[str, torch.nn.Parameter], torch.nn.Parameter],
    prefix: str = "",
    made: dict[int, torch.nn.Parameter] | None = None,
) -> int:
    """Replace each meta parameter of `module` by `make(name, meta_param)`, one at a time; a parameter tied under
    two names is made once and stays tied. `made` (meta parameter's id -> the one made for it) carries the ties
    across calls on parts of one model: a part whose parameter another part made takes that one. Returns how many
    were made by this call."""
    made = {} if made is None else made
    before = len(made)
    for name, owner, attr, p in meta_parameters(module, prefix):
        if id(p) not in made:
            made[id(p)] = make(name, p)
        owner._parameters[attr] = made[id(p)]
    return len(made) - before


def materialize(
    module: torch.nn.Module,
    weights: Weights,
    device: torch.device,
    dtype_of: Callable[[torch.nn.Parameter], torch.dtype],
    *,
    prefix: str = "",
    read: bool = True,
    made: dict[int, torch.nn.Parameter] | None = None,
) -> int:
    """Every meta parameter of `module` (named `prefix` in the model) made whole on `device`, in `dtype_of(param)`,
    one tensor at a time. With `read=False` they are only allocated (a rank that receives the values instead).
    `made`: the ties across parts of one model (replace_meta)."""

    def make(name: str, p: torch.nn.Parameter) -> torch.nn.Parameter:
        if read:
            value = weights.tensor(name, tuple(p.shape), dtype_of(p)).to(device)
        else:
            value = torch.empty(p.shape, dtype=dtype_of(p), device=device)
        return torch.nn.Parameter(value, requires_grad=p.requires_grad)

    return replace_meta(module, make, prefix, made)


def move_real(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module.to(device)` for a module with meta parameters: the real tensors move, the meta ones stay."""
    if device.type == "cpu":
        return module
    for owner in module.modules():
        for p in owner._parameters.values():
            if p is not None and p.device.type != "meta":
                p.data = p.data.to(device)
        for attr, b in owner._buffers.items():
            if b is not None and b.device.type != "meta":
                owner._buffers[attr] = b.to(device)
    return module
