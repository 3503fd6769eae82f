"""The data layer: files and their row checks (files), tokenization through the on-disk cache (tokenize, cache),
batches (batches, sampling). Recipes import what they need from here."""

from launcher.data.batches import EvalShard, pad_batch
from launcher.data.files import KINDS, check_rows, first_rows, is_empty, load_table, require_columns
from launcher.data.tokenize import NOT_TOKENIZATION, data_settings, tokenize

__all__ = [
    "KINDS",
    "NOT_TOKENIZATION",
    "EvalShard",
    "check_rows",
    "data_settings",
    "first_rows",
    "is_empty",
    "load_table",
    "pad_batch",
    "require_columns",
    "tokenize",
]
