"""The one plan: built by `build_plan` for every recipe with no processes, checked by every rank against its job."""

from __future__ import annotations

import json
import sys

import pytest

from launcher.choices import Ddp, QLora, Zero
from launcher.errors import ConfigError
from launcher.job import Job, LaunchEnv, job_from_environ
from launcher.plan import PLAN_FILE, Plan, build_plan, check_job, read_plan, restarted
from launcher.recipe import Recipe
from launcher.settings import ignored
from tests.conftest import RECIPE, ROOT, run, tiny_args

RECIPES = ["lora_cls", "lora_ner", "qlora_sft"]
TWO = LaunchEnv(world_size=2, local_world_size=2, now=0)


@pytest.fixture(scope="module")
def recipes():
    return {name: Recipe.load(str(ROOT / "recipes" / f"{name}.py")) for name in RECIPES}


@pytest.mark.parametrize("name", RECIPES)
def test_build_plan_resolves_and_checks_every_recipe_without_processes(recipes, name, tmp_path):
    recipe = recipes[name]
    plan = build_plan(recipe, ["train.max_steps=5", f"output_dir={tmp_path / 'run'}"], TWO)
    assert (plan.recipe, plan.name) == (str(ROOT / "recipes" / f"{name}.py"), name)
    assert (plan.world_size, plan.local_world_size, plan.nodes, plan.device, plan.hosts) == (2, 2, 1, "cpu", [])
    assert isinstance(plan.config, recipe.Config) and plan.config.train.max_steps == 5
    assert plan.config.strategy == Ddp() and plan.config.precision == "fp32"  # auto resolved for this environment
    assert isinstance(plan.config.adapter, QLora) == (name == "qlora_sft")
    again = Plan.from_json(plan.to_json(), recipe.Config)
    assert again == plan
    assert not (tmp_path / "run").exists(), "building a plan writes nothing"


def test_build_plan_resolves_auto_for_deepspeeds_runner_and_names_the_run_directory(recipes):
    plan = build_plan(
        recipes["lora_cls"], [], LaunchEnv(world_size=2, local_world_size=2, deepspeed_runner=True, now=0)
    )
    assert plan.config.strategy == Zero(stage=2) and plan.config.output_dir.startswith("runs/lora_cls-19")


def test_build_plan_reports_settings_and_data_problems_together_with_no_processes(recipes, tmp_path):
    with pytest.raises(ConfigError) as e:
        build_plan(recipes["lora_cls"], ["train.lr=-1", "train.grad_accum=0"], TWO)
    assert any(p.startswith("train.lr=-1.0") for p in e.value.problems) and len(e.value.problems) == 2
    with pytest.raises(ConfigError, match="data.train=/no/such.jsonl: no such file"):
        build_plan(recipes["lora_cls"], ["data.train=/no/such.jsonl"], TWO)  # the recipe's own data check
    with pytest.raises(ConfigError, match="one process per GPU"):
        build_plan(recipes["lora_cls"], [], LaunchEnv(world_size=4, local_world_size=4, cuda=True, gpus=2))


def test_ignored_settings_are_named_only_when_the_user_gave_them(recipes):
    plan = build_plan(
        recipes["lora_cls"], ["train.epochs=3", "train.max_steps=10", "data.eval=", "train.eval_every=5"], TWO
    )
    assert plan.notes == [
        "train.epochs=3 is ignored: train.max_steps=10 sets the length of the run",
        "train.eval_every=5 is ignored: there is no eval set (data.eval is empty)",
    ]
    assert build_plan(recipes["lora_cls"], ["train.max_steps=10"], TWO).notes == []  # the default epochs: silent
    cfg = build_plan(recipes["lora_cls"], ["strategy=zero3", "data.cache=false"], TWO).config
    assert ignored(cfg, {"strategy.offload_dir", "data.cache_dir"}) == [
        "data.cache_dir= is ignored: data.cache=false: nothing is cached",
        "strategy.offload_dir= is ignored: nothing is offloaded to nvme",
    ]
    notes = build_plan(
        recipes["lora_cls"], ["train.adv_epsilon=0.5", "train.adv_steps=2", "train.metric_for_best=f1"], TWO
    ).notes
    assert notes == [
        "train.adv_epsilon=0.5 is ignored: train.adversarial=none",
        "train.adv_steps=2 is ignored: train.adversarial=none: only pgd takes steps",
        "train.metric_for_best=f1 is ignored: neither train.early_stop_patience nor checkpoint.keep_best follows a "
        "metric",
    ]
    with pytest.raises(ConfigError, match=r"train.adv_epsilon=0.0: must be positive"):
        build_plan(recipes["lora_cls"], ["train.adversarial=fgm", "train.adv_epsilon=0"], TWO)
    refused = r"strategy=zero3, adapter=lora, optimizer=adamw, train.adversarial=pgd is not supported"
    with pytest.raises(ConfigError, match=refused):
        build_plan(recipes["lora_cls"], ["train.adversarial=pgd", "strategy=zero3"], TWO)


def test_check_job_names_what_the_plan_was_made_for_and_what_the_rank_sees(recipes):
    plan = build_plan(recipes["lora_cls"], [], TWO)
    assert check_job(plan, Job(world_size=2, local_world_size=2), "RUN/config.json") == []
    [world] = check_job(plan, Job(world_size=4, local_world_size=4), "RUN/config.json")
    assert world.startswith("RUN/config.json was written for 2 process(es), this job has 4: start it with 2")
    assert "torchrun --nproc_per_node 2 recipes/lora_cls.py --plan RUN/config.json" in world
    assert world.endswith("launcher run recipes/lora_cls.py --nproc 4")
    [local] = check_job(plan, Job(world_size=2, local_world_size=1), "p")
    assert "written for 2 process(es) per node, this node runs 1" in local
    [device] = check_job(plan, Job(world_size=2, local_world_size=2, cuda=True), "p")
    assert "written for cpu devices, this rank sees cuda" in device
    # A plan for two nodes of one: a node that did not join sees one node (it would train alone).
    nodes = build_plan(recipes["lora_cls"], [], LaunchEnv(world_size=2, local_world_size=1, hosts=("a", "b")))
    assert (nodes.nodes, nodes.hosts) == (2, ["a", "b"])
    [alone] = check_job(nodes, Job(world_size=1, local_world_size=1, nodes=1), "p")
    assert alone.startswith("p was written for 2 nodes (a, b), this job has 1: a node that did not join")


def test_rank_variables_are_read_in_one_place():
    job = job_from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, cuda=False)
    assert job == Job(rank=3, local_rank=1, world_size=4, local_world_size=2, nodes=2)
    torchrun = job_from_environ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2"})
    assert torchrun.nodes == 2
    deepspeed = job_from_environ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, cuda=False)
    assert deepspeed.local_world_size == 2
    assert job_from_environ({}, cuda=False) == Job()


def test_read_plan_takes_a_file_or_a_run_directory_and_refuses_other_recipes_plans(recipes, tmp_path):
    plan = build_plan(recipes["lora_cls"], [f"output_dir={tmp_path}"], TWO)
    (tmp_path / PLAN_FILE).write_text(plan.to_json())
    assert read_plan(str(tmp_path), recipes["lora_cls"]) == plan
    assert read_plan(str(tmp_path / PLAN_FILE), recipes["lora_cls"]) == plan
    with pytest.raises(ConfigError, match=r"plan.json: no such file; a run's plan is RUN_DIR/config.json"):
        read_plan(str(tmp_path / "plan.json"), recipes["lora_cls"])
    with pytest.raises(ConfigError, match="was made for recipe lora_cls, not lora_ner"):
        read_plan(str(tmp_path), recipes["lora_ner"])
    (tmp_path / "junk.json").write_text(json.dumps({"recipe": "x"}))
    with pytest.raises(ConfigError, match="not a plan written by launcher"):
        read_plan(str(tmp_path / "junk.json"), recipes["lora_cls"])


def test_a_misspelt_hook_is_refused_by_name(tmp_path):
    source = (ROOT / "recipes" / "lora_cls.py").read_text()
    bad = tmp_path / "typo.py"
    bad.write_text(
        source
        + "\n\ndef build_tokeniser(cfg):\n    return None\n\n\ndef finnish(engine, task, cfg, ranks):\n    pass\n"
        + "\n\ndef finish_up(x):\n    return x\n"  # a helper of the recipe's own, not a misspelt hook
    )
    with pytest.raises(ConfigError) as e:
        Recipe.load(str(bad))
    text = "\n".join(e.value.problems)
    assert "defines build_tokeniser(), which is not a recipe hook" in text and "did you mean build_tokenizer?" in text
    assert "defines finnish()" in text and "did you mean finish?" in text and "finish_up" not in text
    ok = Recipe.load(str(ROOT / "recipes" / "qlora_sft.py"))
    assert ok.build_tokenizer is not None and ok.finish is not None
    assert Recipe.load(RECIPE).finish is None


@pytest.fixture(scope="module")
def two_process_plan(recipes, tiny_model, tiny_data, tmp_path_factory):
    """A plan for 2 processes, written where a run would write it."""
    out = tmp_path_factory.mktemp("plan") / "run"
    plan = build_plan(recipes["lora_cls"], tiny_args(tiny_model, tiny_data, out, "train.max_steps=2"), TWO)
    out.mkdir()
    (out / PLAN_FILE).write_text(plan.to_json())
    return out


def test_a_plan_for_two_processes_run_on_one_stops_before_any_model_is_built(two_process_plan, tmp_path):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    proc = run([sys.executable, RECIPE, "--plan", str(two_process_plan / PLAN_FILE)], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{two_process_plan / PLAN_FILE} was written for 2 process(es), this job has 1" in proc.stderr
    assert "Traceback" not in proc.stderr and "starting" not in proc.stdout
    assert sorted(p.name for p in two_process_plan.iterdir()) == [PLAN_FILE], "nothing was built or written"

    # The same under torchrun (which reports its worker's exit code 2 and exits 1 itself).
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "1", RECIPE, "--plan", str(two_process_plan)]
    proc = run(torchrun, cwd=tmp_path)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-2000:]
    assert "was written for 2 process(es), this job has 1" in proc.stderr
    assert sorted(p.name for p in two_process_plan.iterdir()) == [PLAN_FILE]


def test_settings_given_with_a_plan_are_refused(two_process_plan, tmp_path):
    proc = run([sys.executable, RECIPE, "--plan", str(two_process_plan), "train.lr=1"], cwd=tmp_path)
    assert proc.returncode == 2 and "given with --plan" in proc.stderr and "Traceback" not in proc.stderr


def test_a_restarted_job_resumes_from_its_newest_checkpoint_and_never_overwrites(recipes, tmp_path):
    out = tmp_path / "run"
    plan = build_plan(recipes["lora_cls"], [f"output_dir={out}", "checkpoint.every_steps=2", "overwrite=true"], TWO)
    assert restarted(plan, 0) is plan
    again = restarted(plan, 1)
    assert (again.config.resume, again.config.overwrite) == ("auto", False)
    assert again.notes[-1] == "restart 1: resuming from the newest complete checkpoint (resume=auto)"
    bare = restarted(build_plan(recipes["lora_cls"], [], TWO), 2)
    assert any("a restart trains from step 0" in n for n in bare.notes)
    assert any("give output_dir= for restarts to continue" in n for n in bare.notes)
    # A run resumed from another run's checkpoint that has written none of its own yet resumes from it again.
    elsewhere = tmp_path / "other" / "checkpoints" / "step-00000004"
    elsewhere.mkdir(parents=True)
    (elsewhere / "manifest.json").write_text("{}")
    given = build_plan(recipes["lora_cls"], [f"output_dir={out}", f"resume={elsewhere}"], TWO)
    assert restarted(given, 1).config.resume == str(elsewhere)
    mine = out / "checkpoints" / "step-00000002"
    mine.mkdir(parents=True)
    (mine / "manifest.json").write_text("{}")
    assert restarted(given, 1).config.resume == "auto"


def test_restart_variables_are_read_in_the_job_and_a_torchrun_sharing_its_store_is_warned_about(recipes):
    assert job_from_environ({"LAUNCHER_RESTART": "2", "LAUNCHER_RESTART_REASON": "r"}, cuda=False).restart == 2
    assert job_from_environ({"TORCHELASTIC_RESTART_COUNT": "1"}, cuda=False).restart == 1
    shared = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert job_from_environ(shared, cuda=False).elastic_shared_store
    assert not job_from_environ({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}, cuda=False).elastic_shared_store
    plan = build_plan(recipes["lora_cls"], [], LaunchEnv(world_size=2, local_world_size=2, elastic_shared_store=True))
    assert any("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in n for n in plan.notes)
    assert not any("TORCH_DISABLE" in n for n in build_plan(recipes["lora_cls"], [], TWO).notes)


def test_a_resume_at_another_size_repeating_the_checkpoints_grad_accum_follows_the_new_size(recipes, tmp_path):
    """The original command repeated (train.grad_accum=4 given again) on 1 process instead of 2: the accumulation
    follows (8), as when it is not given; another value the user gives is kept (and checked by the ranks)."""
    out = tmp_path / "run"
    step = out / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    config = {"train": {"micro_batch_size": 8, "grad_accum": 4}}
    (step / "manifest.json").write_text(json.dumps({"step": 4, "world_size": 2, "config": config}))
    one = LaunchEnv(world_size=1, local_world_size=1)
    settings = [f"output_dir={out}", "resume=auto", "train.micro_batch_size=8"]
    for given in ([], ["train.grad_accum=4"]):
        plan = build_plan(recipes["lora_cls"], [*settings, *given], one)
        assert plan.config.train.grad_accum == 8, given
        assert any(n.startswith("train.grad_accum=8: the checkpoint was written by 2 processes") for n in plan.notes)
    other = build_plan(recipes["lora_cls"], [*settings, "train.grad_accum=2"], one)
    assert other.config.train.grad_accum == 2
