"""`launcher plan --verify`: a short real run of one row's cell beside what the plan says it holds.

The probe runs on this machine's CPU as 2 gloo processes (launcher.worker.probe), in fp32 (CPUs emulate bf16), for
the given model when its plan fits here and it is small enough to train two steps in about a minute, else for a
scaled-down model of the same family (fewer layers, then hidden size, heads, MLP and vocabulary divided alike, the
head size kept). The plan is computed again for exactly what the probe runs (its model, 2 processes, fp32, its
micro-batch and sequence), so the ratios check the plan's arithmetic for this family, adapter, optimizer and
strategy, not the GPU figures of the table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.planning.sizing import TERMS

WORLD = 2
"""gloo processes the probe runs."""
MAX_PARAMETERS = 150_000_000
"""A larger model is scaled down: two steps on two CPU cores stay within about a minute."""
MAX_TOKENS = 2048
"""Tokens per micro-batch the probe trains on (sequence first, then micro-batch, cut to fit)."""
MEMORY_SHARE = 0.4
"""Of this machine's available memory, what the probe's processes may plan to use together."""
STEPS = 2
"""Optimizer steps: from the second on, the optimizer states exist."""


@dataclass
class Setup:
    """What the probe runs."""

    config: dict
    """The model's config.json (scaled down where `scaled`)."""
    overrides: list[str]
    """Settings on top of the row's: fp32, the probe's micro-batch, no accumulation."""
    micro_batch: int
    seq_len: int
    scaled: bool = False
    why: list[str] = field(default_factory=list)
    """What was changed from the plan's setup, and why."""


def scaled_config(config: dict, layers: int, divide: int) -> dict:
    """`config` with at most `layers` layers and its widths divided by `divide`: hidden size through the number of
    heads (the head size kept), key-value heads alike (still dividing the heads), the MLP and the vocabulary."""
    out = dict(config)
    out["num_hidden_layers"] = min(int(config["num_hidden_layers"]), layers)
    if divide > 1:
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        new_heads = max(1, heads // divide)
        kv = int(config.get("num_key_value_heads") or heads)
        new_kv = math.gcd(new_heads, max(1, kv // divide))
        out.update(num_attention_heads=new_heads, hidden_size=new_heads * head_dim)
        if "num_key_value_heads" in config:
            out["num_key_value_heads"] = new_kv
        if "intermediate_size" in config:
            out["intermediate_size"] = max(8, int(config["intermediate_size"]) // divide)
        out["vocab_size"] = max(256, int(config["vocab_size"]) // divide)
    return out


def available_memory() -> int:
    """MemAvailable in bytes (0 where there is none)."""
    from launcher.job import meminfo_bytes

    return meminfo_bytes("MemAvailable")


def setup(config: dict, row_cfg: RunConfig, seq_len: int, memory: int, count=None) -> Setup:
    """The probe for one row: the real model if its CPU plan fits within MEMORY_SHARE of `memory` and it has at most
    MAX_PARAMETERS, else the first scaled-down model (2 layers, widths divided by 1, 2, 4, ...) that does. `count`
    counts a config (launcher.planning.counting.cached_count)."""
    from launcher.planning.counting import cached_count
    from launcher.planning.rows import Machine, plan_row

    count = count or cached_count
    seq = min(seq_len, MAX_TOKENS, int(config.get("max_position_embeddings") or seq_len))
    micro = max(1, min(row_cfg.train.micro_batch_size, MAX_TOKENS // seq))
    overrides = ["precision=fp32", f"train.micro_batch_size={micro}", "train.grad_accum=1"]
    why = []
    if (micro, seq) != (row_cfg.train.micro_batch_size, seq_len):
        why.append(f"micro-batch {micro} x {seq} tokens (of {row_cfg.train.micro_batch_size} x {seq_len})")
    if row_cfg.precision != "fp32":
        why.append(f"fp32 (of {row_cfg.precision}: CPUs emulate it)")
    tries = [(int(config["num_hidden_layers"]), 1)] + [(2, 2**i) for i in range(0, 12)]
    for layers, divide in tries:
        probe_config = config if (layers, divide) == tries[0] else scaled_config(config, layers, divide)
        counts = count(probe_config)
        row = plan_row("probe", overrides, row_cfg, counts, probe_config, Machine(1, WORLD), seq, gpu=False)
        if row.state is None:
            raise ConfigError(f"--verify: {row.refused}")
        need = WORLD * row.rank_bytes
        if counts.total <= MAX_PARAMETERS and need <= MEMORY_SHARE * memory:
            scaled = probe_config is not config
            if scaled:
                why.insert(
                    0,
                    f"a scaled-down model of the same family ({counts.total / 1e6:.0f}M parameters: "
                    f"{probe_config['num_hidden_layers']} layers, hidden {probe_config['hidden_size']}, vocabulary "
                    f"{probe_config['vocab_size']}), as the given one needs more than this machine gives a probe",
                )
            return Setup(probe_config, overrides, micro, seq, scaled, why)
    raise ConfigError("--verify: not even a 2-layer model of this family fits this machine's free memory")


def run(probe: Setup, row_cfg: RunConfig, timeout: float = 900) -> dict:
    """Run the probe as WORLD gloo processes and return what rank 0 wrote (launcher.worker.probe)."""
    from launcher.overrides import apply_overrides, to_dict

    cfg = apply_overrides(row_cfg, probe.overrides)
    spec = {
        "config": probe.config,
        "run": to_dict(cfg),
        "micro_batch": probe.micro_batch,
        "seq_len": probe.seq_len,
        "steps": STEPS,
    }
    with tempfile.TemporaryDirectory(prefix="launcher-verify-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
        argv += ["-m", "launcher.worker.probe", spec_path, out_path]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        try:
            proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"--verify: the probe did not finish within {timeout:.0f} s") from None
        if not os.path.isfile(out_path):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ConfigError(f"--verify: the probe failed (exit {proc.returncode}):\n{tail}")
        with open(out_path) as f:
            result = json.load(f)
    if "error" in result:
        raise ConfigError(f"--verify: the probe failed: {result['error']}\n{result.get('trace', '')[-2000:]}")
    return result


def compare(row, result: dict) -> dict:
    """Planned (`row`: the probe's own plan row) against measured (the rank that held the most): per term and for
    the model state, bytes and measured/planned; the peak resident memory above an idle rank against the planned
    total of a CPU rank."""

    def ratio(measured: float, planned: float) -> float | None:
        return round(measured / planned, 4) if planned else None

    ranks = result["ranks"]
    held = max(ranks, key=lambda r: sum(sum(v.values()) for v in (r["held"] or {}).values()))["held"] or {}
    terms = {}
    for t in TERMS:
        planned, measured = row.state.term(t), sum(held.get(t, {}).values())
        terms[t] = {"planned": planned, "measured": measured, "ratio": ratio(measured, planned)}
    planned_state = row.state.total()
    measured_state = sum(v["measured"] for v in terms.values())
    peak = max(r["peak_above_idle"] for r in ranks)
    return {
        "terms": terms,
        "model_state": {"planned": planned_state, "measured": measured_state},
        "ratio": ratio(measured_state, planned_state),
        "peak_rss": {
            "planned": row.rank_bytes,
            "measured": peak,
            "ratio": ratio(peak, row.rank_bytes),
            "planned_terms": {
                "model_state": planned_state,
                "gathered": row.gathered,
                "activations": row.activations,
                "step": row.step,
                "allowance": row.allowance,
            },
        },
        "load_seconds": max(r["load_seconds"] for r in ranks),
        "step_seconds": max(r["step_seconds"][-1] for r in ranks),
        "losses": ranks[0]["losses"],
    }
