"""launcher: fine-tune transformer models across processes and nodes from plain Python recipes."""

__version__ = "0.1.0"


def run_recipe(recipe, argv=None) -> None:
    """Run a recipe module (its `main()` calls this) under whichever launcher started the process."""
    from launcher.worker.main import run_recipe as _run

    _run(recipe, argv)


def empty_weights():
    """A context in which a recipe's `build_model` builds its model without memory (parameters on the meta
    device). The launcher then fills in the values from `model=` (a folder's weights, or random:SHAPE's seeded
    ones), each rank only the part its strategy keeps; see launcher/worker/weights.py."""
    from launcher.worker.weights import empty_weights as _empty

    return _empty()
