"""Pure pieces: schedule, metrics, eval sharding, command building and the executor."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from launcher.data import EvalShard
from launcher.launch.commands import RankCommand, local_commands, render
from launcher.launch.execute import run_local, run_restarting
from launcher.tasks.metrics import accuracy, macro_f1
from launcher.worker.optim import lr_factor, param_groups
from tests.conftest import RECIPE, ROOT


def test_lr_schedule_warms_up_then_decays():
    f = lr_factor(total_steps=10, warmup_steps=2, schedule="cosine")
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(10) == pytest.approx(0.0) and f(6) == pytest.approx(0.5)
    lin = lr_factor(total_steps=10, warmup_steps=0, schedule="linear")
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5)
    assert lr_factor(10, 0, "constant")(9) == 1.0


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_accuracy_and_macro_f1_on_hand_made_cases():
    pred, label = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    assert accuracy(pred, label) == 0.75
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5
    assert macro_f1(pred, label, 2) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 1]), 3) == 1.0


@pytest.mark.parametrize("size,world", [(10, 3), (7, 2), (2, 4), (8, 2)])
def test_eval_shards_cover_every_example_once_with_equal_lengths(size, world):
    shards = [list(EvalShard(size, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank runs the same number of forwards"
    real = sorted(i for s in shards for i in s if i >= 0)
    assert real == list(range(size))


def test_local_commands_share_one_plan_and_quote_values():
    cmds = local_commands("/r/my recipe.py", "/o/plan.json", 2, 29500, python="py", cpu_count=8, environ={})
    assert [c.env["RANK"] for c in cmds] == ["0", "1"] and cmds[1].env["OMP_NUM_THREADS"] == "4"
    assert all(c.argv == ["py", "/r/my recipe.py", "--plan", "/o/plan.json"] for c in cmds)
    line = render(cmds[0])
    assert "'/r/my recipe.py'" in line and "MASTER_PORT=29500" in line
    secret = render(RankCommand(rank=0, argv=["x"], env={"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k"}))
    assert "hf_abc" not in secret and "HF_TOKEN='***'" in secret and "WANDB_API_KEY='***'" in secret


def test_executor_propagates_the_failing_exit_code_and_stops_the_others(tmp_path, capfd):
    pid_file, finished = tmp_path / "sleeper.pid", tmp_path / "sleeper.finished"
    # Rank 0 announces itself, then would work for a minute and mark that it finished.
    sleeper = RankCommand(
        rank=0,
        argv=[
            sys.executable,
            "-c",
            "import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()));"
            "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(60); open(sys.argv[2], 'w').write('done')",
            str(pid_file),
            str(finished),
        ],
    )
    # Rank 1 fails only once rank 0 is surely running.
    failing = RankCommand(
        rank=1,
        argv=[
            sys.executable,
            "-c",
            "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
            "print(os.getpid())\nraise SystemExit(3)",
            str(pid_file),
        ],
    )
    assert run_local([sleeper, failing]) == 3
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the survivor was stopped and reaped (a zombie would still answer)
        os.kill(pid, 0)
    assert not finished.exists(), "the surviving rank was waited for instead of stopped"
    out, err = capfd.readouterr()
    failed_pid = int(out.split(f"[{socket.gethostname()}:1] ")[1].split()[0])
    assert err.strip().splitlines()[-1:] == [f"launcher: rank 1 (pid {failed_pid}) exited with code 3"]


def test_executor_returns_zero_when_every_rank_succeeds(capfd):
    ok = [RankCommand(rank=r, argv=[sys.executable, "-c", f"print('hello from {r}')"]) for r in range(2)]
    assert run_local(ok) == 0
    out, err = capfd.readouterr()
    assert "hello from 0" in out and f"[{socket.gethostname()}:1] hello from 1" in out
    assert "launcher:" not in err, "a run that succeeded has nothing to report"


def test_help_imports_no_heavy_library():
    code = (
        "import sys, launcher.cli as c; c.build_parser(); print(sorted(m for m in ('torch', 'deepspeed', "
        "'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kernels_folder_does_not_shadow_hf_kernels():
    # Run from the project root, its kernels/ folder first on sys.path: transformers must see Hugging Face's
    # `kernels` exactly when that package is installed (transformers 5.25 requires it), never our folder instead.
    code = (
        "import importlib.metadata as m, importlib.util as u\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "try:\n    installed = bool(m.version('kernels'))\n"
        "except m.PackageNotFoundError:\n    installed = False\n"
        "spec = u.find_spec('kernels')\n"
        "print(installed, is_kernels_available(), getattr(spec, 'origin', None))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    installed, available, origin = out.stdout.split()[-3:]
    assert available == installed, out.stdout
    if installed == "True":  # the installed package is the one found, not the project's folder
        assert not origin.startswith(str(ROOT / "kernels")), origin


def test_warmup_factor_is_never_zero_on_the_first_step():
    assert lr_factor(100, 10, "cosine")(0) > 0 and not math.isnan(lr_factor(1, 0, "cosine")(0))


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".parquet", ".json"])
def test_every_file_format_loads_the_same_rows(ext, tmp_path):
    import pandas as pd

    from launcher.data import load_table

    frame = pd.DataFrame({"text": ["good film", "bad, slow film"], "label": ["pos", "neg"]})
    path = tmp_path / f"d{ext}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
        ".parquet": lambda: frame.to_parquet(path),
        ".json": lambda: frame.to_json(path, orient="records", lines=True),
    }[ext]()
    table = load_table(str(path), "data.train")
    assert table["text"] == ["good film", "bad, slow film"] and table["label"] == ["pos", "neg"]


def test_unsupported_extension_is_named(tmp_path):
    from launcher.data import load_table
    from launcher.errors import ConfigError

    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"data.eval=.*d.xlsx: unsupported file type '.xlsx'"):
        load_table(str(path), "data.eval")


def test_each_python_environment_compiles_deepspeed_ops_in_its_own_folder(tmp_path):
    """Two checkouts on one machine must not rebuild each other's compiled ops (a rank loading one crashed)."""
    from launcher.environment import extension_build_dir

    assert extension_build_dir("/a/.venv") != extension_build_dir("/b/.venv")
    assert extension_build_dir("/a/.venv") == extension_build_dir("/a/.venv/")
    code = (
        "from launcher.environment import quiet_libraries\nquiet_libraries()\n"
        "from torch.utils.cpp_extension import _get_build_directory\nprint(_get_build_directory('op', False))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    built = where.stdout.strip().splitlines()[-1]
    tag = os.path.basename(extension_build_dir(sys.prefix))
    # ... built by this environment's ninja, whatever PATH the process was started with.
    code_ninja = code + "import shutil\nprint(shutil.which('ninja'))\n"
    env_no_bin = {**env, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    found = subprocess.run(
        [sys.executable, "-c", code_ninja], env=env_no_bin, capture_output=True, text=True, check=True
    )
    if os.path.isfile(os.path.join(os.path.dirname(sys.executable), "ninja")):
        assert found.stdout.split()[-1] == os.path.join(os.path.dirname(sys.executable), "ninja")
    assert built.startswith(str(tmp_path / "torch_extensions" / tag / "")), built
    # A folder the user chose is kept.
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "mine")
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "mine" / "")), where.stdout


def test_the_executor_starts_the_ranks_again_after_a_failure_a_restart_can_mend(tmp_path, capfd):
    """Restart N's ranks see LAUNCHER_RESTART=N and the reason; a usage error (exit 2) is never restarted."""
    starts = tmp_path / "starts"

    def ranks(code_on_first_start: int):
        script = (
            "import os, sys\n"
            "open(sys.argv[1], 'a').write(os.environ.get('LAUNCHER_RESTART', '0') + '\\n')\n"
            f"sys.exit({code_on_first_start} if 'LAUNCHER_RESTART' not in os.environ else 0)"
        )
        return lambda restart: [RankCommand(rank=0, argv=[sys.executable, "-c", script, str(starts)])]

    assert run_restarting(ranks(1), 2, None) == 0
    assert starts.read_text().split() == ["0", "1"]
    err = capfd.readouterr().err
    assert "launcher: rank 0 (pid " in err and "exited with code 1; starting every rank again" in err
    assert "(restart 1 of 2)" in err
    starts.unlink()
    assert run_restarting(ranks(2), 2, None) == 2
    assert starts.read_text().split() == ["0"], "a usage error was restarted"
    starts.unlink()
    assert run_restarting(ranks(1), 0, None) == 1
    assert starts.read_text().split() == ["0"]
    assert "no restart left" not in capfd.readouterr().err


def test_which_failures_a_restart_may_mend():
    from launcher.launch.execute import Outcome

    assert [Outcome(c).restartable for c in (0, 1, 2, 3, 75, 124, 137)] == [
        False, True, False, False, False, True, True,
    ]  # fmt: skip
    assert not Outcome(143, "stopped every rank on SIGTERM", asked=True).restartable


def test_a_negative_max_restarts_is_a_usage_error(capsys):
    from launcher import cli

    assert cli.main(["run", RECIPE, "--max-restarts", "-1"]) == 2
    assert "--max-restarts -1: give 0 (no restart) or more" in capsys.readouterr().err


def test_a_test_command_that_times_out_takes_its_children_along(tmp_path):
    """tests.conftest.run kills the command's whole process group on a timeout (torchrun's ranks outlived it)."""
    from tests.conftest import run

    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run(["bash", "-c", f"sleep 120 & echo $! > {pid_file}; wait"], cwd=tmp_path, timeout=2)
    child = int(pid_file.read_text())

    def state() -> str:
        try:
            return open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return ""

    # SIGKILL is delivered at once, but a loaded machine may show the child running a moment before it exits.
    deadline = time.monotonic() + 5
    while state() not in ("", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state() in ("", "Z"), f"the command's child {child} is still running ({state()}) 5 s after the timeout"


def test_deepspeed_imports_without_mlflow_and_its_autotuner_still_loads():
    """DeepSpeed's autotuner imports mlflow (2-3 s of every ZeRO rank's start) when deepspeed is imported: deferred
    by the process environment until the autotuner is asked for. A fresh process: this one has imported both."""
    code = (
        "import sys\nfrom launcher.environment import quiet_libraries\nquiet_libraries()\n"
        "import deepspeed, deepspeed.runtime.config\nprint('mlflow' in sys.modules)\n"
        "from deepspeed.autotuning import Autotuner\nprint(Autotuner.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["False", "Autotuner"], proc.stdout
