"""A run's directory and numbers: one run per directory, no silent overwrite, finite settings and losses, clear
refusals of bad paths and model folders (each defect found reproduced by a test here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from launcher.errors import ConfigError
from launcher.job import LaunchEnv
from launcher.overrides import apply_overrides
from launcher.plan import PLAN_FILE, build_plan
from launcher.recipe import Recipe
from launcher.rundir import claim, release_claims
from tests.conftest import BIN, RECIPE, ROOT, launcher_cli, run, tiny_args

ONE = LaunchEnv(now=1_700_000_000)


@pytest.fixture(scope="module")
def recipe():
    return Recipe.load(RECIPE)


# ------------------------------------------------------------------------------------------ settings


def test_a_key_given_twice_is_refused_naming_both_values(recipe):
    with pytest.raises(ConfigError) as e:
        apply_overrides(recipe.Config(), ["train.lr=1e-3", "seed=1", "train.lr=1e-4", "strategy=zero3", "strategy=ddp"])
    assert e.value.problems == [
        "train.lr is given twice (train.lr=1e-3 and train.lr=1e-4): keep the one you mean",
        "strategy is given twice (strategy=zero3 and strategy=ddp): keep the one you mean",
    ]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN"])
def test_every_float_setting_refuses_non_finite_values(recipe, value):
    for key in ("train.lr", "train.warmup_ratio", "train.max_grad_norm", "adapter.dropout"):
        with pytest.raises(ConfigError, match=f"{key}={value}: expected a finite number"):
            apply_overrides(recipe.Config(), [f"{key}={value}"])


def test_non_finite_and_twice_given_settings_stop_the_command_line_with_exit_2(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    for extra, expected in [
        (["train.lr=inf"], "train.lr=inf: expected a finite number"),
        (["train.lr=nan"], "train.lr=nan: expected a finite number"),
        (["seed=1", "seed=2"], "seed is given twice (seed=1 and seed=2)"),
    ]:
        proc = launcher_cli(
            ["run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out), *extra], cwd=tmp_path
        )
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_bad_output_dirs_are_refused_before_anything_is_written(recipe, tiny_model, tiny_data, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    unwritable = "/proc/launcher-test/run" if os.geteuid() == 0 else str(tmp_path / "ro" / "run")
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
    cases = {
        str(afile): "this is a file, not a folder",
        str(afile / "run"): f"{afile} is a file, so no folder can be made under it",
        unwritable: "cannot write in",
    }
    for out, expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            build_plan(recipe, tiny_args(tiny_model, tiny_data, tmp_path)[:-1] + [f"output_dir={out}"], ONE)
    # The same through the command line, --dry-run included: exit 2, one line, nothing written anywhere.
    before = sorted(p.name for p in tmp_path.iterdir())
    for dry in ([], ["--dry-run"]):
        args = [*tiny_args(tiny_model, tiny_data, tmp_path)[:-1], f"output_dir={afile / 'run'}"]
        proc = launcher_cli(["run", RECIPE, "--nproc", "2", *dry, *args], cwd=tmp_path)
        assert proc.returncode == 2 and "is a file, so no folder" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_model_folders_without_config_weights_or_tokenizer_are_named(recipe, tiny_model, tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in os.listdir(tiny_model):
        if not name.endswith(".safetensors"):
            (no_weights / name).write_bytes((tiny_model / name).read_bytes())
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_model / name).read_bytes())
    cases = {
        empty: "has no config.json, so it is not a model folder",
        no_weights: r"has no weights \(model.safetensors or pytorch_model.bin\)",
        no_tokenizer: "has no tokenizer",
    }
    for folder, expected in cases.items():
        args = [a for a in tiny_args(tiny_model, tiny_data, tmp_path / "out") if not a.startswith("model=")]
        with pytest.raises(ConfigError, match=expected):
            build_plan(recipe, [*args, f"model={folder}"], ONE)
    # A recipe that builds its model from the config and its own tokenizer needs neither weights nor tokenizer.
    ner = Recipe.load(str(ROOT / "recipes" / "lora_ner.py"))
    settings = [f"model={no_weights}", "model_init=config", "adapter=full", "tokenizer=chars", "data.max_length=128"]
    plan = build_plan(ner, settings, ONE)
    assert plan.config.model == str(no_weights)
    proc = run([sys.executable, RECIPE, *args, f"model={empty}"], cwd=tmp_path)
    assert proc.returncode == 2 and "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ run directories


def test_default_run_directories_are_unique_within_one_second(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = claim(build_plan(recipe, [], ONE))  # the lock is held by this process until it exits
    second = claim(build_plan(recipe, [], ONE))
    assert first.config.output_dir == "runs/lora_cls-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(ONE.now))
    assert second.config.output_dir == first.config.output_dir + "-2"
    written = json.loads((tmp_path / second.config.output_dir / PLAN_FILE).read_text())
    assert written["config"]["output_dir"] == second.config.output_dir


def test_a_named_directory_holding_a_run_is_refused_unless_overwrite(recipe, tmp_path):
    out = tmp_path / "run"
    claim(build_plan(recipe, [f"output_dir={out}"], ONE))
    with pytest.raises(ConfigError, match="another run is in progress there"):
        claim(build_plan(recipe, [f"output_dir={out}"], ONE))  # the first claim's lock is still held


def test_overwrite_replaces_only_the_earlier_runs_files(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    claim(build_plan(recipe, [f"output_dir={out}"], ONE))
    release_claims()  # as if that run's process had ended
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"output_dir={out} already holds a run .* add overwrite=true"):
        claim(build_plan(recipe, [f"output_dir={out}"], ONE))
    assert (out / "adapter").exists()
    # The dry run names what the run will delete; the run deletes exactly that, and says so.
    dry = launcher_cli(["run", RECIPE, "--dry-run", f"output_dir={out}", "overwrite=true"], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    said = f"overwrite=true will delete the earlier run's config.json, metrics.jsonl, adapter in {out}"
    assert said in dry.stdout and (out / "adapter").exists()
    claim(build_plan(recipe, [f"output_dir={out}", "overwrite=true"], ONE))
    assert sorted(p.name for p in out.iterdir()) == [".lock", PLAN_FILE, "notes.txt"]
    assert json.loads((out / PLAN_FILE).read_text())["config"]["overwrite"] is True
    assert "deleting the earlier run's config.json, metrics.jsonl, adapter" in capsys.readouterr().err
    release_claims()


def _refused_untouched(recipe, out, settings, expected, tmp_path):
    """`settings` into `out` are refused (in process, and as the command line's exit 2 with --dry-run and without)
    naming `expected`, and no file under `tmp_path` changes."""

    def files():
        return {
            str(p): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(tmp_path.rglob("*"))
        }

    before = files()
    with pytest.raises(ConfigError, match=expected):
        claim(build_plan(recipe, [f"output_dir={out}", *settings], ONE))
    for dry in (["--dry-run"], []):
        proc = launcher_cli(["run", RECIPE, *dry, f"output_dir={out}", *settings], cwd=tmp_path)
        assert proc.returncode == 2 and re.search(expected, proc.stderr) and "Traceback" not in proc.stderr, proc.stderr
    after = files()
    if str(out / ".lock") not in before:
        assert after.pop(str(out / ".lock")) == (False, b"")  # the refusal's own lock: empty, ours
    assert after == before


def test_overwrite_never_clears_a_folder_no_launcher_run_wrote(recipe, tmp_path):
    """Another program's config.json, model/, checkpoints/ and logs/: overwrite=true refuses the folder and deletes
    nothing (a model folder's config.json is not a plan)."""
    out = tmp_path / "theirs"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"theirs")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "c.pt").write_bytes(b"theirs")
    (out / "logs").mkdir()
    (out / "logs" / "app.log").write_text("theirs")
    (out / PLAN_FILE).write_text('{"model_type": "bert", "hidden_size": 8}')
    _refused_untouched(recipe, out, ["overwrite=true"], "holds a config.json that no launcher run wrote", tmp_path)


def test_files_named_like_a_runs_outputs_without_a_plan_are_refused(recipe, tmp_path):
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    (out / "adapter").mkdir()
    for name in ("metrics.jsonl", "summary.json", "eval_predictions.jsonl", "logs/rank0.log", "adapter/README.md"):
        (out / name).write_text(f"my own {name}")
    expected = "holds metrics.jsonl, summary.json, eval_predictions.jsonl, adapter, logs, named like a run's outputs"
    _refused_untouched(recipe, out, [], expected, tmp_path)
    # Slurm's output of the batch job that runs into this folder is the launcher's: not a reason to refuse.
    batch = tmp_path / "batch"
    (batch / "logs").mkdir(parents=True)
    (batch / "logs" / "slurm-42.out").write_text("launcher sbatch: job 42 start 0")
    claim(build_plan(recipe, [f"output_dir={batch}"], ONE))
    assert (batch / "logs" / "slurm-42.out").read_text() == "launcher sbatch: job 42 start 0"
    release_claims()


@pytest.mark.parametrize("name", ["metrics.jsonl", "logs", ".lock"])
def test_a_symbolic_link_where_a_run_writes_is_refused_and_its_target_untouched(recipe, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / ("folder" if name == "logs" else "file")
    if name == "logs":
        target.mkdir()
        (target / "rank0.log").write_text("precious")
    else:
        target.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(target)
    expected = rf"{re.escape(name)} (\(to {re.escape(str(target))}\) )?is a symbolic link"
    _refused_untouched(recipe, out, [], expected, tmp_path)


def _launch(args, cwd, **kw):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_two_launches_into_one_directory_one_refuses_the_other_keeps_its_settings(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    first = tiny_args(tiny_model, tiny_data, out, "train.max_steps=150", "seed=1", "train.lr=2e-3")
    a = _launch(["launcher", "run", RECIPE, "--nproc", "2", *first], tmp_path)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and a.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    second = tiny_args(tiny_model, tiny_data, out, "train.max_steps=3", "seed=2", "train.lr=5e-4")
    b = launcher_cli(["run", RECIPE, "--nproc", "2", *second], cwd=tmp_path)
    stdout, stderr = a.communicate(timeout=300)
    assert b.returncode == 2 and f"output_dir={out}: another run is in progress there" in b.stderr, b.stderr
    assert a.returncode == 0, stdout[-2000:] + stderr[-2000:]
    plan = json.loads((out / PLAN_FILE).read_text())["config"]
    assert (plan["seed"], plan["train"]["lr"], plan["train"]["max_steps"]) == (1, 2e-3, 150)
    assert json.loads((out / "summary.json").read_text())["steps"] == 150


def test_a_finished_run_is_not_overwritten_in_place(tiny_model, tiny_data, tmp_path):
    """Direct form (rank 0 claims): a second run into a finished run's directory stops; overwrite=true replaces it
    wholly (no old adapter beside the new model, one run in metrics and TensorBoard)."""
    out = tmp_path / "run"
    args = tiny_args(tiny_model, tiny_data, out)
    assert run([sys.executable, RECIPE, *args, "train.max_steps=2"], cwd=tmp_path).returncode == 0
    again = run([sys.executable, RECIPE, *args, "adapter=full", "train.max_steps=2"], cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    assert (out / "adapter").is_dir() and not (out / "model").exists()
    rerun = run([sys.executable, RECIPE, "--plan", str(out)], cwd=tmp_path)  # the same plan by hand: same refusal
    assert rerun.returncode == 2 and "already holds this plan's results" in rerun.stderr, rerun.stderr[-2000:]
    replaced = run([sys.executable, RECIPE, *args, "adapter=full", "train.max_steps=3", "overwrite=true"], cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert (out / "model").is_dir() and not (out / "adapter").exists()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == [1, 2, 3]
    assert len(list((out / "tensorboard").iterdir())) == 1


# ------------------------------------------------------------------------------------------ non-finite training


def test_a_loss_that_turns_non_finite_stops_the_run_and_saves_nothing(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model, tiny_data, out, "train.max_steps=8", "train.lr=1e30", "train.max_grad_norm=0")
    proc = run(["launcher", "run", RECIPE, "--nproc", "2", *args], cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: step "))
    step = int(line.split()[2].rstrip(":"))
    assert 1 < step <= 8 and "training diverged" in line and "saved no weights" in line and "train.lr" in line
    assert "Traceback" not in proc.stderr
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, step)), "nothing logged from the step that diverged on"


def test_a_micro_batch_larger_than_each_processs_data_is_refused_before_launch(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    rows = len(tiny_data["train"].read_text().splitlines())
    each = -(-rows // 2)
    for dry in ([], ["--dry-run"]):
        args = tiny_args(tiny_model, tiny_data, out, "train.micro_batch_size=100000")
        proc = launcher_cli(["run", RECIPE, "--nproc", "2", *dry, *args], cwd=tmp_path)
        said = (
            f"train.micro_batch_size=100000: larger than the data each process gets ({rows:,} train rows over 2 "
            f"process(es): {each:,} each); give train.micro_batch_size={each} or less"
        )
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()
    args = tiny_args(tiny_model, tiny_data, out, f"train.micro_batch_size={each}")
    assert launcher_cli(["run", RECIPE, "--nproc", "2", "--dry-run", *args], cwd=tmp_path).returncode == 0


def test_a_max_length_beyond_the_models_positions_is_refused_before_launch(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_model, tiny_data, out, "data.max_length=100000")
    proc = launcher_cli(["run", RECIPE, "--nproc", "2", *args], cwd=tmp_path)
    limit = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    said = f"data.max_length=100000: {tiny_model} has {limit} positions (max_position_embeddings in its config.json)"
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    sft = Recipe.load(str(ROOT / "recipes" / "qlora_sft.py"))
    with pytest.raises(ConfigError, match="data.max_length=4096: random:llama-tiny has 2048 positions"):
        build_plan(sft, ["data.max_length=4096", f"output_dir={out}"], ONE)
    build_plan(sft, ["data.max_length=2048", f"output_dir={out}"], ONE)  # the limit itself is fine
