"""Run by torchrun: for each case, a whole run (worker.lifecycle.run: data, model, engine, loop, checkpoints, save)
of lora_cls writing checkpoints, then the same run resumed from some of them into fresh folders.

usage: torchrun --nproc_per_node 2 resume_worker.py OUT.json ROOT MODEL TRAIN EVAL CASES.json
CASES.json: {name: {"overrides": [...], "resume_from": [step, ...], "resume_overrides": [...]}} (the last, settings
only the resumed runs get). Rank 0 writes per case and run: the train
losses by step, where the run resumed, and the largest difference between its saved trained weights and the
uninterrupted run's.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import sys
import traceback

from launcher.environment import quiet_libraries
from launcher.job import job_from_environ, launch_env
from launcher.plan import build_plan
from launcher.recipe import Recipe
from launcher.worker import dist
from launcher.worker.lifecycle import run
from tests.helpers import imports_frozen

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "lora_cls.py")


def losses(folder: str) -> dict[int, float]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def saved(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "adapter", "*.safetensors"))) + sorted(
        glob.glob(os.path.join(folder, "model", "*.safetensors"))
    ):
        out.update(load_file(path))
    return out


def one(recipe: Recipe, name: str, case: dict, settings: list[str], root: str, ranks) -> dict:
    job = job_from_environ()
    env = launch_env(job)
    first = os.path.join(root, name, "run")
    replaced = {o.split("=", 1)[0] for o in case["overrides"]}
    base = [s for s in settings if s.split("=", 1)[0] not in replaced] + case["overrides"]
    run(recipe, build_plan(recipe, [*base, f"output_dir={first}"], env), ranks)
    gc.collect()
    out = {"run": {"losses": losses(first)} if ranks.is_main else {}, "resumed": {}}
    reference = saved(first) if ranks.is_main and case["resume_from"] else {}
    for step in case["resume_from"]:
        folder = os.path.join(root, name, f"from-{step}")
        checkpoint = os.path.join(first, "checkpoints", f"step-{step:08d}")
        again = [*base, *case.get("resume_overrides", []), f"output_dir={folder}", f"resume={checkpoint}"]
        plan = build_plan(recipe, again, env)
        summary = run(recipe, plan, ranks)
        gc.collect()
        if ranks.is_main:
            weights = saved(folder)
            out["resumed"][str(step)] = {
                "losses": losses(folder),
                "resumed_from": summary["resumed_from"],
                "same_names": sorted(weights) == sorted(reference),
                "same_shapes": all(weights[k].shape == reference[k].shape for k in reference if k in weights),
                # (an AdaLoRA layer pruned to rank 0 saves empty matrices)
                "max_weight_diff": max(
                    float((weights[k] - reference[k]).abs().max()) for k in reference if reference[k].numel()
                ),
            }
    return out


def main() -> None:
    out_path, root, model, train, evals, cases_path = sys.argv[1:7]
    quiet_libraries()
    imports_frozen()
    ranks = dist.init(job_from_environ())
    recipe = Recipe.load(RECIPE)
    with open(cases_path) as f:
        cases = json.load(f)
    settings = [
        f"model={model}",
        f"data.train={train}",
        f"data.eval={evals}",
        "train.micro_batch_size=8",
        "train.log_every=1",
        "train.epochs=2",
    ]
    results = {}
    for name, case in cases.items():
        try:
            results[name] = one(recipe, name, case, settings, root, ranks)
        except Exception as e:  # report the case and go on: the test names every broken one
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        if ranks.is_main:
            print(f"[resume] {name}: {results[name].get('error', 'ok')}", flush=True)
    if ranks.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.shutdown()


if __name__ == "__main__":
    main()
