"""Checkpoints and exact resume: a resumed run is the same run.

One torchrun of 2 gloo ranks runs lora_cls under each strategy with checkpoints, then resumes from some of them
into fresh folders (tests/helpers/resume_worker.py): the remaining steps' losses and the final weights must equal
the uninterrupted run's. A real `launcher run` writes the checkpoints the other tests resume, damage and refuse.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launcher.errors import ConfigError
from launcher.job import LaunchEnv
from launcher.overrides import apply_overrides
from launcher.plan import resolve
from launcher.recipe import Recipe
from launcher.worker.checkpoint import _choose
from tests.conftest import RECIPE, launcher_cli, long_unless, run, run_helper, selected, tiny_args, why_failed

# 96 training rows, 8 per rank, 2 ranks: 6 steps an epoch, 2 epochs. Step 3 is mid-epoch, step 6 ends epoch 0.
LORA = {"resume_from": [3, 6]}
EVERY_3 = ["checkpoint.every_steps=3", "checkpoint.keep=4"]
# Full fine-tunes accumulate 2 micro-batches: 3 steps an epoch; resuming from step 2 crosses the epoch boundary.
FULL = ["adapter=full", "train.grad_accum=2", "checkpoint.every_steps=2", "checkpoint.keep=3"]
# bitsandbytes' 8-bit AdamW on tensors this small too (its default keeps moments under 4096 values in fp32).
EIGHT_BIT = ["optimizer=adamw8bit", "optimizer.min_8bit_size=64"]
# Ranks 8 -> 2 on average, the final pattern fixed for the last 3 of the 12 steps.
ADALORA = ["adapter=adalora", "adapter.r=8", "adapter.target_r=2", "adapter.tfinal=3"]
CASES = {
    # Resumed runs that evaluate at other steps: an evaluation must not move the random state training uses.
    "ddp lora": {"overrides": ["strategy=ddp", *EVERY_3], **LORA, "resume_overrides": ["train.eval_every=2"]},
    "zero1 lora": {"overrides": ["strategy=zero1", *EVERY_3], "resume_from": [3]},
    "zero2 lora": {"overrides": ["strategy=zero2", *EVERY_3], "resume_from": [3]},
    "zero3 lora": {"overrides": ["strategy=zero3", *EVERY_3], **LORA},
    "fsdp lora": {"overrides": ["strategy=fsdp", *EVERY_3], **LORA},
    "zero3 full": {"overrides": ["strategy=zero3", *FULL], "resume_from": [2]},
    "fsdp full": {"overrides": ["strategy=fsdp", *FULL], "resume_from": [2]},
    # fp16 on CPU: a ShardedGradScaler that lowered its scale on an overflow (the fresh one would overflow again)
    "fsdp lora fp16": {"overrides": ["strategy=fsdp", "precision=fp16", *EVERY_3], "resume_from": [3]},
    # 8-bit moments are stored dequantized and quantized back into each rank's own blocks (launcher/worker/eight_bit.py)
    "ddp lora 8-bit": {"overrides": ["strategy=ddp", *EIGHT_BIT, *EVERY_3], "resume_from": [3]},
    "zero2 lora 8-bit": {"overrides": ["strategy=zero2", *EIGHT_BIT, *EVERY_3], "resume_from": [3]},
    "zero3 full 8-bit": {"overrides": ["strategy=zero3", *EIGHT_BIT, *FULL], "resume_from": [2]},
    "fsdp lora 8-bit": {"overrides": ["strategy=fsdp", *EIGHT_BIT, *EVERY_3], "resume_from": [3]},
    # AdaLoRA's smoothed scores mid-schedule (step 3) and its final rank pattern (fixed at step 9, then kept)
    "ddp adalora": {"overrides": ["strategy=ddp", *ADALORA, *EVERY_3], "resume_from": [3, 9]},
    "zero2 adalora": {"overrides": ["strategy=zero2", *ADALORA, *EVERY_3], "resume_from": [3]},
}


# `make test` resumes these; `make test-long` the others. One of each strategy family, between them a full fine-tune
# with accumulation, an 8-bit optimizer's moments and fp16's loss scale.
FAST_CASES = {"ddp lora", "zero3 full", "zero2 lora 8-bit", "fsdp lora fp16", "zero3 2->1"}

# Runs that other tests resume on another number of processes: no dropout, since each rank draws its own masks.
RESIZE = {
    "ddp 2->1": ("ddp", 1, [], 1e-4),
    "zero1 2->1": ("zero1", 1, [], 1e-4),
    "zero2 2->1": ("zero2", 1, [], 1e-4),
    "zero3 2->1": ("zero3", 1, [], 1e-4),
    "fsdp 2->1": ("fsdp", 1, [], 1e-4),
    # The 2 ranks' flat partitions become one: its blocks of 256 values straddle the stored ones, so the moments are
    # quantized afresh, each value moving by up to half a code's step, as the optimizer's own requantization does
    # every step (measured: losses within 7.4e-4). Within 1e-4 needs the same layout (the exact cases above).
    "zero2 8-bit 2->1": ("zero2", 1, EIGHT_BIT, 2e-3),
}


@pytest.fixture(scope="module")
def still_model(tiny_model, tmp_path_factory):
    """The tiny BERT without dropout."""
    folder = tmp_path_factory.mktemp("still") / "bert"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _still(strategy: str) -> list[str]:
    return [f"strategy={strategy}", "adapter.dropout=0", *EVERY_3]


def _cases(names) -> list:
    return [long_unless(name in FAST_CASES, name) for name in names]


@pytest.fixture(scope="module")
def resumed(request, tiny_model, tiny_data, still_model, tmp_path_factory):
    """The cases this session tests (its tier's), run and resumed in one torchrun; and the runs that RESIZE's cases
    resume on another number of processes."""
    root = tmp_path_factory.mktemp("resume")
    cases = root / "cases.json"
    chosen = selected(request, "case")
    still = {
        name: {"overrides": [f"model={still_model}", *_still(strategy), *extra], "resume_from": []}
        for name, (strategy, _, extra, _) in RESIZE.items()
        if name in chosen
    }
    cases.write_text(json.dumps({**{n: c for n, c in CASES.items() if n in chosen}, **still}))
    out = root / "out.json"
    args = [str(out), str(root), str(tiny_model), str(tiny_data["train"]), str(tiny_data["test"]), str(cases)]
    run_helper("resume_worker", args, cwd=root)
    return {**json.loads(out.read_text()), "root": str(root)}


@pytest.mark.parametrize("case", _cases(CASES))
def test_a_resumed_run_continues_exactly_as_the_uninterrupted_run(resumed, case):
    r = resumed[case]
    assert "error" not in r, r.get("trace")
    full = r["run"]["losses"]
    total = max(int(s) for s in full)
    assert sorted(int(s) for s in full) == list(range(1, total + 1))
    assert sorted(int(s) for s in r["resumed"]) == sorted(CASES[case]["resume_from"]), "a resume did not run"
    for step, again in r["resumed"].items():
        k = int(step)
        assert again["resumed_from"].endswith(f"step-{k:08d}")
        # Only the steps after the checkpoint ran, with the very same losses (weights, Adam moments, schedule,
        # data position and dropout's random state all restored).
        assert sorted(int(s) for s in again["losses"]) == list(range(k + 1, total + 1)), again["losses"]
        diffs = [abs(again["losses"][s] - full[s]) for s in again["losses"]]
        assert max(diffs) <= 1e-6, (step, diffs)
        assert again["same_names"] and again["same_shapes"] and again["max_weight_diff"] <= 1e-6, again


@pytest.mark.parametrize("case", _cases(c for c in CASES if "8-bit" in c))
def test_an_8bit_optimizers_checkpoint_holds_its_moments_whole_in_fp32(resumed, case):
    from pathlib import Path

    step = CASES[case]["resume_from"][0]
    folder = Path(resumed["root"]) / case / "run" / f"checkpoints/step-{step:08d}"
    tensors = {}
    for shard in folder.glob("trained-*.safetensors"):
        tensors.update(load_file(str(shard)))
    params = {k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")}
    assert params
    quantized = 0
    for name, value in params.items():
        # Adam's first and second moments (bitsandbytes' names), and the scale of the block each value was quantized
        # in: NaN where bitsandbytes kept a rank's part in fp32 (under min_8bit_size=64 values: the classifier's bias)
        for moment in ("state1", "state2", "scale1", "scale2"):
            stored = tensors[f"optim/{name}/{moment}"]
            assert stored.dtype == torch.float32 and stored.shape == value.shape, (name, moment, stored.dtype)
        assert float(tensors[f"optim/{name}/state2"].min()) >= 0
        assert float(tensors[f"optim/{name}/state1"].abs().max()) > 0
        quantized += bool(tensors[f"optim/{name}/scale1"].isfinite().all())
    assert quantized > 0
    assert not [k for k in tensors if "absmax" in k or "qmap" in k]  # the layout is the run's, not the checkpoint's


@pytest.mark.parametrize("case", _cases(["fsdp lora fp16"]))
def test_the_fp16_case_resumes_a_loss_scale_that_matters(resumed, case):
    """The fp16 resume above is exact only because the scale came back: the run had lowered it on an overflow."""
    from pathlib import Path

    state = torch.load(Path(resumed["root"]) / case / "run/checkpoints/step-00000003/state.pt", weights_only=True)
    assert state["scaler"]["scale"] < 2.0**16 and state["scaler"]["_growth_tracker"] > 0, state["scaler"]


def _train_losses(folder) -> dict[int, float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _resume_and_compare(
    original, worker, settings: list[str], tmp_path, tiny_data, still_model, tolerance: float = 1e-4
) -> None:
    """Resume `original`'s step-3 checkpoint on `worker`'s processes: the same steps follow, within `tolerance`."""
    out = tmp_path / "resumed"
    ckpt = original / "checkpoints/step-00000003"
    args = tiny_args(still_model, tiny_data, out, "train.epochs=2", *settings, f"resume={ckpt}")
    proc = worker.run(RECIPE, args, cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    assert "train.grad_accum=" in proc.stdout and "each step still trains 16 examples" in proc.stdout
    before, after = _train_losses(original), _train_losses(out)
    assert sorted(after) == list(range(4, 13))
    assert max(abs(before[s] - after[s]) for s in after) <= tolerance, (before, after)
    a = load_file(str(original / "adapter/adapter_model.safetensors"))
    b = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= tolerance


@pytest.mark.parametrize("case", _cases(RESIZE))
def test_a_run_resumes_on_fewer_processes_with_the_same_steps(ranks1, resumed, case, tmp_path, tiny_data, still_model):
    from pathlib import Path

    strategy, world, extra, tolerance = RESIZE[case]
    assert world == 1
    original = Path(resumed["root"]) / case / "run"
    _resume_and_compare(original, ranks1, [*_still(strategy), *extra], tmp_path, tiny_data, still_model, tolerance)


def test_a_run_resumes_on_more_processes_with_the_same_steps(ranks1, ranks2, tmp_path, tiny_data, still_model):
    original = tmp_path / "one"
    # One process accumulating 2 micro-batches of 8: 16 examples per step, as 2 processes make without accumulating.
    settings = [*_still("zero3"), "train.grad_accum=2"]
    proc = ranks1.run(RECIPE, tiny_args(still_model, tiny_data, original, "train.epochs=2", *settings), cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    _resume_and_compare(original, ranks2, _still("zero3"), tmp_path, tiny_data, still_model)


# ------------------------------------------------------------------ a real run's checkpoints, damaged and refused

SETTINGS = ["strategy=ddp", "train.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep=4"]


@pytest.fixture(scope="module")
def finished(tiny_model, tiny_data, tmp_path_factory):
    """A 2-rank DDP run of 12 steps with checkpoints at steps 3, 6, 9 and 12."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    proc = run(
        ["launcher", "run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out, *SETTINGS)],
        cwd=out.parent,
    )
    assert proc.returncode == 0, why_failed(proc)
    return out


def _config(tiny_model, tiny_data, out, *extra):
    """The resolved configuration a 2-rank CPU job of these settings runs (as its plan holds it)."""
    recipe = Recipe.load(RECIPE)
    cfg = apply_overrides(recipe.Config(), tiny_args(tiny_model, tiny_data, out, *SETTINGS, *extra))
    return resolve(cfg, LaunchEnv(world_size=2, local_world_size=2))


def test_checkpoints_are_complete_small_and_checked(finished):
    folders = sorted(p.name for p in (finished / "checkpoints").iterdir())
    assert folders == ["step-00000003", "step-00000006", "step-00000009", "step-00000012"]
    manifest = json.loads((finished / "checkpoints/step-00000012/manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["epoch"] == 1 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {
        "recipe.py",
        "state.pt",
        "trained-00001-of-00001.safetensors",
        "trained.safetensors.index.json",
    }
    tensors = load_file(str(finished / "checkpoints/step-00000012/trained-00001-of-00001.safetensors"))
    params = {k for k in tensors if k.startswith("param/")}
    # The adapter and the trained head only (the frozen base comes from model=), each with its Adam moments.
    assert params and all("lora_" in k or "classifier" in k for k in params), params
    assert {k for k in tensors if k.startswith("optim/")} == {
        f"optim/{k[len('param/') :]}/{m}" for k in params for m in ("exp_avg", "exp_avg_sq")
    }
    # The final checkpoint's adapter is the saved adapter.
    adapter = load_file(str(finished / "adapter/adapter_model.safetensors"))
    assert len(adapter) == len(params)
    lora = [k for k in params if "lora_B" in k][0]
    saved = [v for k, v in adapter.items() if k.split(".", 2)[-1].replace(".weight", "") in lora][0]
    assert (tensors[lora] - saved).abs().max() == 0


def test_resume_auto_in_the_run_folder_ends_with_the_uninterrupted_weights(finished, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # As if the run had died after step 7: the checkpoints of steps 9 and 12 and the results never written.
    for name in ("checkpoints/step-00000009", "checkpoints/step-00000012", "adapter", "summary.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    (out / "checkpoints/step-00000009.tmp").mkdir()  # a save killed halfway
    (out / "checkpoints/step-00000009.tmp/state.pt").write_bytes(b"half")
    proc = run(
        ["launcher", "run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out, *SETTINGS, "resume=auto")],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, why_failed(proc)
    assert "resumed from" in proc.stdout and "step-00000006" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000006") and summary["steps"] == 12
    before = load_file(str(finished / "adapter/adapter_model.safetensors"))
    after = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert max(float((before[k] - after[k]).abs().max()) for k in before) <= 1e-6

    # The metrics go on in the same file, each step once: those the dead run logged after its checkpoint (7-12)
    # are dropped and logged again by the resumed run, with the same losses.
    def losses(folder):
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]

    ours, theirs = losses(out), losses(finished)
    assert [s for s, _ in ours] == list(range(1, 13))
    assert max(abs(a[1] - b[1]) for a, b in zip(ours, theirs)) <= 1e-6
    assert not (out / "checkpoints/step-00000009.tmp").exists()  # cleaned up by the next complete save


def test_a_damaged_checkpoint_is_refused_and_auto_falls_back_saying_so(finished, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shard = out / "checkpoints/step-00000012/trained-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a tensor
    shard.write_bytes(bytes(data))
    chosen = _choose(_config(tiny_model, tiny_data, out, "resume=auto"), 2)
    assert chosen.path.endswith("step-00000009")
    assert "skipped the newer step-00000012" in chosen.note and "does not match its checksum" in chosen.note
    with pytest.raises(ConfigError) as e:
        _choose(_config(tiny_model, tiny_data, out, f"resume={shard.parent}"), 2)
    assert str(shard) in str(e.value) and "checksum" in str(e.value)


def test_a_state_that_cannot_be_read_safely_is_refused_in_one_line_and_auto_falls_back(
    ranks2, finished, tiny_model, tiny_data, tmp_path
):
    """state.pt replaced by a pickle naming a class (its checksum in the manifest updated, so only reading it can
    tell): never unpickled in full; resume=PATH stops with exit 2 and one line, resume=auto takes the one before."""
    import argparse
    import hashlib

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    last = out / "checkpoints/step-00000012"
    torch.save({"rng": [], "x": argparse.Namespace(a=1)}, last / "state.pt")
    manifest = json.loads((last / "manifest.json").read_text())
    data = (last / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (last / "manifest.json").write_text(json.dumps(manifest))
    proc = ranks2.run(RECIPE, tiny_args(tiny_model, tiny_data, tmp_path / "new", *SETTINGS, f"resume={last}"),
                      cwd=tmp_path)  # fmt: skip
    said = f"{last / 'state.pt'} cannot be read safely (it names argparse.Namespace)"
    assert proc.returncode == 2 and said in proc.stderr, why_failed(proc)
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    chosen = _choose(_config(tiny_model, tiny_data, out, "resume=auto"), 2)
    assert chosen.path.endswith("step-00000009") and "cannot be read safely" in chosen.note


def test_a_resume_with_other_settings_or_another_global_batch_is_refused(finished, tiny_model, tiny_data, tmp_path):
    ckpt = finished / "checkpoints/step-00000006"
    with pytest.raises(ConfigError) as e:
        _choose(_config(tiny_model, tiny_data, tmp_path / "x", f"resume={ckpt}", "train.lr=0.01", "seed=7"), 2)
    text = str(e.value)
    assert "train.lr: the checkpoint has 0.001, this run 0.01" in text and "seed: the checkpoint has 42" in text
    # Where and how often a run reports may change.
    ok = _choose(_config(tiny_model, tiny_data, tmp_path / "y", f"resume={ckpt}", "train.log_every=5"), 2)
    assert ok.path == str(ckpt)
    # One process must accumulate twice as many micro-batches to train the same 16 examples a step...
    with pytest.raises(ConfigError) as e:
        _choose(_config(tiny_model, tiny_data, tmp_path / "z", f"resume={ckpt}"), 1)
    assert "its global batch is 16 examples per step, this job's 8: train.grad_accum=2 keeps it" in str(e.value)
    assert _choose(_config(tiny_model, tiny_data, tmp_path / "z", f"resume={ckpt}", "train.grad_accum=2"), 1)
    # ... and 3 processes of 8 cannot make 16.
    with pytest.raises(ConfigError) as e:
        _choose(_config(tiny_model, tiny_data, tmp_path / "w", f"resume={ckpt}"), 3)
    assert "16 is not a multiple of 24); rerun with --nproc 1 or 2" in str(e.value)


def test_resume_settings_that_cannot_work_stop_before_launch(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    for extra, expected in [
        (["resume=" + str(tmp_path / "nothing")], "not a complete checkpoint (no manifest.json)"),
        (["resume=auto", "overwrite=true"], "overwrite deletes the checkpoints"),
        (["checkpoint.keep=0", "checkpoint.every_steps=2"], "checkpoint.keep=0: keep at least 1"),
        (["watchdog.timeout=-1"], "watchdog.timeout=-1: give seconds (e.g. 600), or 0 to turn it off"),
    ]:
        proc = launcher_cli(
            ["run", RECIPE, "--nproc", "2", *tiny_args(tiny_model, tiny_data, out, *extra)], cwd=tmp_path
        )
        assert proc.returncode == 2 and expected in proc.stderr, (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    no_folder = [a for a in tiny_args(tiny_model, tiny_data, out, "resume=auto") if not a.startswith("output_dir=")]
    proc = launcher_cli(["run", RECIPE, "--nproc", "2", *no_folder], cwd=tmp_path)
    assert proc.returncode == 2 and "add output_dir=FOLDER of the run to resume" in proc.stderr, proc.stderr[-2000:]


def test_deepspeeds_dynamic_loss_scale_goes_into_the_checkpoint_and_back(monkeypatch):
    """fp16 under ZeRO (GPUs only, so this checks the state round trip on DeepSpeed's own scaler object): the scale
    it lowered on overflows and its window position are saved as plain numbers and set on a fresh scaler."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from launcher.worker.strategies.zero import scaler_state, set_scaler_state

    # Its overflow message asks for the rank: one process, rank 0.
    monkeypatch.setattr(loss_scaler, "dist", SimpleNamespace(get_rank=lambda: 0))

    def scaler():
        return DynamicLossScaler(init_scale=2.0**16, scale_window=4, min_scale=1.0, delayed_shift=2,
                                 consecutive_hysteresis=False)  # fmt: skip

    trained = SimpleNamespace(loss_scaler=scaler())
    for overflow in (True, True, False, True, True, False, False):
        trained.loss_scaler.update_scale(overflow)
    state = scaler_state(trained)
    assert state["cur_scale"] < 2.0**16 and state["cur_iter"] == 7, state
    fresh = SimpleNamespace(loss_scaler=scaler())
    set_scaler_state(fresh, torch.load(_roundtrip(state), weights_only=True))
    assert {k: getattr(fresh.loss_scaler, k) for k in state} == state
    for overflow in (False, True, False, False, False, False):  # and both go on alike
        trained.loss_scaler.update_scale(overflow)
        fresh.loss_scaler.update_scale(overflow)
    assert fresh.loss_scaler.cur_scale == trained.loss_scaler.cur_scale
    assert scaler_state(SimpleNamespace(loss_scaler=None)) is None


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_8bit_moments_dequantized_and_quantized_back_step_on_alike():
    """The stored form of bitsandbytes' 8-bit moments (values and block scales per element): quantized back into the
    same layout they are the very same codes and scales (so the next steps are identical); into another (a rank's
    rows), blocks inside one stored block are exact and the others quantized afresh, within a code's step."""
    import bitsandbytes as bnb

    from launcher.worker.eight_bit import dequantized, restore

    def optimizer(p):
        return bnb.optim.AdamW8bit([p], lr=1e-2, min_8bit_size=64)

    def step(opt, p, g):
        p.grad = g.clone()
        opt.step()

    torch.manual_seed(0)
    grads = [torch.randn(300, 70) for _ in range(6)]
    trained = torch.nn.Parameter(torch.randn(300, 70))
    opt = optimizer(trained)
    for g in grads[:3]:
        step(opt, trained, g)
    original = opt.state[trained]
    stored = dequantized(original)
    assert set(stored) == {"step", "state1", "state2", "scale1", "scale2"} and stored["scale1"].isfinite().all()
    assert all(stored[k].dtype == torch.float32 and stored[k].shape == trained.shape for k in stored if k != "step")
    stored = torch.load(_roundtrip({k: v.clone() if torch.is_tensor(v) else v for k, v in stored.items()}),
                        weights_only=True)  # fmt: skip
    resumed = torch.nn.Parameter(trained.detach().clone())
    again = optimizer(resumed)
    restore(again, resumed, stored)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(again.state[resumed][key], original[key]), key
    assert again.state[resumed]["step"] == 3
    # Rows 0-149 and 150-299, as two ranks hold them under FSDP2. The first part's blocks are the stored ones;
    # the second starts mid-block (10500 = 41 x 256 + 4), so its blocks straddle two stored ones.
    for part in (slice(0, 150), slice(150, 300)):
        rows = torch.nn.Parameter(torch.randn(150, 70))
        fresh = optimizer(rows)
        restore(fresh, rows, {k: v[part] if torch.is_tensor(v) else v for k, v in stored.items()})
        back = dequantized(fresh.state[rows])
        for moment in ("state1", "state2"):
            if part.start == 0:
                assert torch.equal(fresh.state[rows][moment], original[moment][part]), moment
            scale = float(stored[moment][part].abs().max())
            assert float((back[moment] - stored[moment][part]).abs().max()) <= 0.02 * scale, moment
    for g in grads[3:]:
        step(opt, trained, g)
        step(again, resumed, g)
    assert torch.equal(trained, resumed)
    # A tensor under min_8bit_size keeps fp32 moments: stored as they are, with NaN scales (the same keys).
    small = torch.nn.Parameter(torch.randn(10))
    kept = optimizer(small)
    step(kept, small, torch.randn(10))
    stored = dequantized(kept.state[small])
    assert stored["scale1"].isnan().all() and torch.equal(stored["state1"], kept.state[small]["state1"])
    again = optimizer(torch.nn.Parameter(small.detach().clone()))
    restore(again, again.param_groups[0]["params"][0], stored)
    assert torch.equal(next(iter(again.state.values()))["state2"], kept.state[small]["state2"])
