"""Recipe authoring: list the recipes in a folder, copy one under a new name. Pure file work (no torch import):
the description is the first line of each module's docstring, read with `ast`."""

from __future__ import annotations

import ast
import keyword
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


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
"""The launcher's own recipes (the project's recipes/ folder)."""


def source_recipe(source: str, folders: list[str]) -> str:
    """The file `--from SOURCE` names: a recipe's name, looked up in `folders` in order, or the path of a .py
    file. Anything else (a path without .py, `..` tricks on a name) is refused: a name never leaves its folder."""
    if source.endswith(".py"):
        if not os.path.isfile(source):
            raise ConfigError(f"--from {source}: no such file; give a recipe's name or the path of a recipe file")
        return source
    if not source.isidentifier():
        raise ConfigError(f"--from {source!r}: give a recipe's name (e.g. lora_cls) or the path of a .py recipe file")
    for folder in folders:
        path = os.path.join(folder, f"{source}.py")
        if os.path.isfile(path):
            return path
    known = sorted({n for folder in folders if os.path.isdir(folder) for n, _ in describe_recipes(folder)})
    raise ConfigError(
        f"--from {source}: no recipe of that name in {' or '.join(folders)}; recipes: {', '.join(known) or 'none'}"
    )


def new_recipe(name: str, source: str, folder: str) -> str:
    """Copy the recipe `source` (a name, found in `folder` or among the launcher's own recipes, or a .py path) to
    `folder/name.py` with its `recipe` name changed; returns the new path."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(f"NAME {name!r}: a recipe name must be a Python identifier and not a keyword, e.g. my_cls")
    src = source_recipe(source, list(dict.fromkeys([folder, SHIPPED])))
    dst = os.path.join(folder, f"{name}.py")
    if os.path.exists(dst):
        raise ConfigError(f"{dst} already exists: pick another NAME or delete the file")
    with open(src) as f:
        text = f.read()
    if not _RECIPE_NAME.search(text):
        raise ConfigError(f"--from {source}: {src} has no `recipe: ClassVar[str] = ...` line to rename")
    os.makedirs(folder, exist_ok=True)
    write_atomic(dst, _RECIPE_NAME.sub(lambda m: f'{m.group(1)}"{name}"', text, count=1))
    return dst
