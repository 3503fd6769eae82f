"""The data layer: files and their row checks (files), tokenization through the on-disk cache (tokenize, cache),
batches (batches, sampling) and the notes it leaves for the run log (notes). Recipes import what they need from
here."""

from launcher.data.batches import EvalShard, pad_batch
from launcher.data.files import (
    KINDS,
    SAMPLE,
    check_rows,
    first_rows,
    is_empty,
    load_table,
    read_split,
    require_columns,
    source_path,
)
from launcher.data.notes import note, take_notes
from launcher.data.tokenize import tokenization_settings, tokenize

__all__ = [
    "KINDS",
    "SAMPLE",
    "EvalShard",
    "check_rows",
    "first_rows",
    "is_empty",
    "load_table",
    "note",
    "pad_batch",
    "read_split",
    "require_columns",
    "source_path",
    "take_notes",
    "tokenization_settings",
    "tokenize",
]
