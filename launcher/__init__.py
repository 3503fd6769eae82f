"""launcher: fine-tune transformer models across processes and nodes from plain Python recipes."""

__version__ = "0.1.0"


def run_recipe(recipe, argv=None) -> None:
    """Run a recipe module (its `main()` calls this) under whichever launcher started the process."""
    from launcher.worker.main import run_recipe as _run

    _run(recipe, argv)


def _install_moved_paths() -> None:
    from launcher._moved import install

    install()


_install_moved_paths()
