"""Bad input: one paragraph naming the setting and the fix, exit code 2, no worker, nothing written."""

from __future__ import annotations

import json
import sys

from tests.conftest import RECIPE, launcher_cli, run, tiny_args


def _fail(tmp_path, argv, *, witness: bool = False):
    """A refused command: in process through the launcher's entry point, or as the real command (a witness)."""
    in_process = argv[0] == "launcher" and not witness
    proc = launcher_cli(argv[1:], cwd=tmp_path) if in_process else run(argv, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"
    return proc.stderr


def _launcher(tiny_model, tiny_data, tmp_path, *extra):
    return ["launcher", "run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, tmp_path / "out", *extra)]


def test_unknown_key_lists_close_names(tiny_model, tiny_data, tmp_path):
    err = _fail(tmp_path, _launcher(tiny_model, tiny_data, tmp_path, "train.lrr=1"), witness=True)
    assert "unknown setting 'train.lrr': did you mean train.lr" in err


def test_missing_data_file_names_the_path(tiny_model, tiny_data, tmp_path):
    err = _fail(tmp_path, _launcher(tiny_model, tiny_data, tmp_path, "data.train=/no/such/train.jsonl"))
    assert "data.train=/no/such/train.jsonl: no such file" in err


def test_missing_column_lists_existing_columns(tiny_model, tiny_data, tmp_path):
    err = _fail(tmp_path, _launcher(tiny_model, tiny_data, tmp_path, "data.text_field=review"))
    assert "no column for data.text_field=review" in err and "its columns are text, label" in err


def test_empty_dataset_is_refused(tiny_model, tiny_data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _fail(tmp_path, _launcher(tiny_model, tiny_data, tmp_path, f"data.train={empty}"))
    assert f"data.train={empty}: the file is empty" in err


def test_eval_label_never_seen_in_training(tiny_model, tiny_data, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"text": "meh", "label": "neutral"}) + "\n")
    err = _fail(tmp_path, _launcher(tiny_model, tiny_data, tmp_path, f"data.eval={bad}"))
    assert "labels neutral never occur in data.train" in err


def test_all_problems_reported_together(tiny_model, tiny_data, tmp_path):
    err = _fail(tmp_path, _launcher(tiny_model, tiny_data, tmp_path, "train.lr=-1", "train.grad_accum=0"))
    assert "2 problems" in err and "train.lr=-1.0" in err and "train.grad_accum=0" in err


def test_direct_python_form_refuses_the_same_way(tiny_model, tiny_data, tmp_path):
    err = _fail(
        tmp_path, [sys.executable, RECIPE, *tiny_args(tiny_model, tiny_data, tmp_path / "out"), "strategy=zero9"]
    )
    assert "strategy=zero9: unknown strategy" in err


def test_nproc_beyond_the_gpus_is_refused(tiny_model):
    from launcher.checks import environment_problems
    from launcher.config import RunConfig
    from launcher.plan import LaunchEnv

    cfg = RunConfig(model=str(tiny_model))
    assert environment_problems(cfg, LaunchEnv(world_size=4, local_world_size=4)) == []  # CPUs take any number
    assert environment_problems(cfg, LaunchEnv(world_size=2, local_world_size=2, cuda=True, gpus=2)) == []
    problems = environment_problems(cfg, LaunchEnv(world_size=4, local_world_size=4, cuda=True, gpus=2))
    assert problems == ["4 processes on this node, but it has 2 GPU(s): one process per GPU; use --nproc 2 or fewer"]


def test_unknown_cli_flag_is_a_usage_error(tmp_path):
    proc = run(["launcher", "run", RECIPE, "--bogus"], cwd=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
