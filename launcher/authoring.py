"""Recipe authoring: list the recipes in a folder, copy one under a new name. Pure file work (no torch import):
the description is the first line of each module's docstring, read with `ast`."""

from __future__ import annotations

import ast
import os
import re

from launcher.errors import ConfigError
from launcher.files import write_atomic

_RECIPE_NAME = re.compile(r'^(\s*recipe:\s*ClassVar\[str\]\s*=\s*)"([^"]*)"', re.MULTILINE)


def describe_recipes(folder: str) -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe module in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--dir {folder}: no such folder; run from the project root or pass --dir PATH/TO/recipes")
    out = []
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".py") or entry.startswith("_"):
            continue
        with open(os.path.join(folder, entry)) as f:
            source = f.read()
        if not _RECIPE_NAME.search(source):
            continue  # a helper module, not a recipe
        doc = ast.get_docstring(ast.parse(source)) or ""
        out.append((entry[:-3], doc.strip().splitlines()[0] if doc.strip() else "(no description)"))
    return out


def new_recipe(name: str, source_name: str, folder: str) -> str:
    """Copy `folder/source_name.py` to `folder/name.py` with its `recipe` name changed; returns the new path."""
    if not name.isidentifier():
        raise ConfigError(f"NAME {name!r}: a recipe name must be a Python identifier, e.g. my_cls")
    src = os.path.join(folder, f"{source_name}.py")
    dst = os.path.join(folder, f"{name}.py")
    if not os.path.isfile(src):
        known = ", ".join(n for n, _ in describe_recipes(folder)) if os.path.isdir(folder) else "none"
        raise ConfigError(f"--from {source_name}: no recipe {src}; recipes here: {known}")
    if os.path.exists(dst):
        raise ConfigError(f"{dst} already exists: pick another NAME or delete the file")
    with open(src) as f:
        source = f.read()
    if not _RECIPE_NAME.search(source):
        raise ConfigError(f"--from {source_name}: {src} has no `recipe: ClassVar[str] = ...` line to rename")
    text = _RECIPE_NAME.sub(lambda m: f'{m.group(1)}"{name}"', source, count=1)
    write_atomic(dst, text)
    return dst
