"""`launcher export CHECKPOINT --out DIR [--merge]`: a checkpoint -> a Hugging Face model folder that plain
`transformers` (and peft, for an adapter) loads.

- --merge (and a full fine-tune): streamed (`stream_merged`): the base tensors read one at a time from the model
  folder (or seeded, for random:SHAPE), a 4-bit layer quantized as training did and dequantized (the quantized
  weights are what the adapter was trained against, so they, not the original ones, are what it is merged into),
  the LoRA update added, heads' trained copies taken, written into shards in bf16 for a quantized base: the model
  is never whole in memory. What that path does not cover (DoRA, an 8-bit base, a model class of our own such as
  the tagger) is merged in memory: the trained model rebuilt in this process the way a rank builds it (the
  recipe's tokenizer, task and model, the adapter, the frozen base from `model=`), with the checkpoint's trained
  tensors (whole, whatever strategy wrote them), then peft's merge_and_unload.
- an adapter run without --merge: the peft adapter, the tokenizer, labels.json and the model's config (id2label).
The folder is written under a temporary name of its own beside DIR (never a name the user may have used) and
renamed, then (models up to CHECK_LIMIT_BYTES) loaded back with
`transformers` and its logits compared with the trained model's on a few eval examples.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import torch

from launcher.choices import Full, Lora, Lora8, QLora
from launcher.errors import ConfigError

MERGED_DTYPE = torch.bfloat16
"""The dtype of a merged model whose base was quantized (its dequantized weights)."""
CHECK_EXAMPLES = 8
CHECK_LIMIT_BYTES = 4 * 2**30
"""The check loads the folder and rebuilds the trained model: only for models up to this size (fp32)."""
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
}


@dataclasses.dataclass
class Exported:
    """What an export wrote, and how it checked."""

    folder: str
    kind: str
    """adapter, merged or model."""
    max_logit_difference: float | None
    """Between the folder, loaded back with transformers, and the trained model; None when not checked."""
    examples: int
    notes: list[str]


def export(checkpoint: str, out: str, *, merge: bool, recipe_path: str = "") -> Exported:
    """Write `checkpoint` as a model folder `out` (which must not exist yet), rebuilding the model with the recipe
    the user names (`recipe_path`) or else the checkpoint's own copy of its recipe (checked against the manifest's
    checksum with the rest of the checkpoint): never a file the manifest names. Raises ConfigError for a bad
    checkpoint, recipe or folder."""
    from launcher.recipe import Recipe
    from launcher.worker import checkpoint as checkpoints_io

    checkpoint = os.path.abspath(checkpoint)
    _not_a_checkpoint(checkpoint)
    problems = checkpoints_io.damage(checkpoint)
    if problems:
        raise ConfigError([f"CHECKPOINT {checkpoint}: {p}" for p in problems])
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out} already exists: give a new folder (an export never overwrites)")
    manifest = checkpoints_io.manifest_of(checkpoint)
    recipe_path = recipe_path or _recipe_copy(checkpoint, manifest)
    recipe = Recipe.load(recipe_path)
    from launcher.overrides import from_dict

    cfg = from_dict(recipe.Config, manifest["config"])
    notes: list[str] = [f"the model is rebuilt by the recipe {recipe_path}"]
    if merge and isinstance(cfg.adapter, Full):
        notes.append("adapter=full: the model is written whole; there is no adapter to merge")
    if merge and cfg.adapter.trained_positions:
        raise ConfigError(
            f"--merge: adapter={cfg.adapter.name} trains positions put before the input, not changes to the "
            "weights: there is nothing to merge; export without --merge (the adapter loads with peft)"
        )
    tokenizer, task = _tokenizer_and_task(recipe, cfg)
    tmp = _own_temporary_folder(out)
    model = None
    try:
        # A merge streams tensor by tensor (peak memory: a shard being written), without the trained model whole.
        streamed = (merge or isinstance(cfg.adapter, Full)) and stream_merged(recipe, cfg, task, checkpoint, tmp)
        if streamed:
            kind = "model" if isinstance(cfg.adapter, Full) else "merged"
        else:
            model = trained_model(recipe, cfg, task, checkpoint)
            kind = _write(model, recipe, cfg, task, tmp, merge)
        from launcher.worker.export import publish

        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        publish(tmp, out, tokenizer, task)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = _fp32_bytes(recipe, cfg, task)
    if size > CHECK_LIMIT_BYTES:
        notes.append(
            f"not checked: the model is {size / 2**30:.1f} GiB in fp32, and the check would hold it twice; load "
            f"{out} with transformers to compare"
        )
        return Exported(out, kind, None, 0, notes)
    model = model or trained_model(recipe, cfg, task, checkpoint)
    difference, examples, why = _check(model, out, kind, cfg, task)
    if why:
        notes.append(why)
    return Exported(out, kind, difference, examples, notes)


def _own_temporary_folder(out: str) -> str:
    """A new, empty folder beside `out` that nothing else has (mkdtemp), readable as an ordinary folder once
    renamed (mkdtemp's own is private to its owner)."""
    import tempfile

    final = os.path.abspath(out.rstrip("/"))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=os.path.dirname(final))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _fp32_bytes(recipe, cfg, task) -> int:
    from launcher.worker.weights import empty_weights

    with empty_weights():  # whatever the recipe builds on: only the shapes are wanted
        base = recipe.build_model(cfg, task)
    return sum(p.numel() * 4 for p in base.parameters())


def stream_merged(recipe, cfg, task, checkpoint: str, folder: str) -> bool:
    """The adapter merged into its base, written tensor by tensor as the base's tensors are read (from the model
    folder, or seeded for random:SHAPE): W + alpha/r * B @ A for each LoRA layer, the trained copy of each head,
    and for qlora each quantized layer's weight quantized as in training and dequantized, all in bf16. Peak
    memory is one tensor and the shard being written, never the model. A full fine-tune's checkpoint holds every
    parameter: they are written as they are. Returns False, writing nothing, for what it does not stream (DoRA,
    an 8-bit base, a model class of our own, other trained tensors): the in-memory merge does those."""
    from peft.utils.integrations import dequantize_bnb_weight

    from launcher.checkpoints import unmatched_parameters
    from launcher.choices import Dora
    from launcher.worker.adapters import four_bit, quantized_layers
    from launcher.worker.checkpoint import stored_tensors
    from launcher.worker.export import write_model
    from launcher.worker.strategies.base import saved_tensors
    from launcher.worker.watchdog import beating

    if isinstance(cfg.adapter, (Dora, Lora8)):
        return False
    base, weights = _base(recipe, cfg, task)
    if hasattr(base, "as_transformers") or weights is None:
        return False
    keys, tensor = stored_tensors(checkpoint)
    if isinstance(cfg.adapter, Full) and unmatched_parameters([n for n, _ in base.named_parameters()], keys):
        return False  # the in-memory path names what differs
    lora: dict[str, dict[str, str]] = {}
    heads: dict[str, str] = {}
    for key in sorted(k for k in keys if k.startswith("param/")):
        name = key.removeprefix("param/").removeprefix("base_model.model.")
        if isinstance(cfg.adapter, Full):  # every parameter trained, under its own name
            heads[name] = key
            continue
        for suffix, slot in ((".lora_A.default.weight", "A"), (".lora_B.default.weight", "B")):
            if name.endswith(suffix):
                lora.setdefault(name.removesuffix(suffix), {})[slot] = key
                break
        else:
            if ".modules_to_save.default." not in name:
                return False
            heads[name.replace(".modules_to_save.default.", ".")] = key
    cpu = torch.device("cpu")
    quantized = set(quantized_layers(base, task.heads)) if isinstance(cfg.adapter, QLora) else set()
    dtype = MERGED_DTYPE if quantized else torch.float32
    scaling = cfg.adapter.alpha / cfg.adapter.r if lora else 0.0

    def tensors():
        for name, t in saved_tensors(base):
            if name in heads:
                value = tensor(heads[name]).float()
            elif t.device.type == "meta":
                value = weights.tensor(name, tuple(t.shape), torch.float32)
            else:  # a buffer, built real
                value = t.detach()
            layer, _, leaf = name.rpartition(".")
            if leaf == "weight" and layer in quantized:  # what the adapter was trained against
                value = dequantize_bnb_weight(four_bit(value, cfg, cpu)).float()
            if leaf == "weight" and layer in lora:
                value = value + scaling * (tensor(lora[layer]["B"]).float() @ tensor(lora[layer]["A"]).float())
            yield name, value.to(dtype) if value.is_floating_point() else value

    write_model(beating(tensors(), "merging"), base, folder, dtype=dtype)
    return True


def _not_a_checkpoint(path: str) -> None:
    """A missing path, or a run's folder given for one of its checkpoints, said as such (not as damage)."""
    from launcher import checkpoints

    if not os.path.exists(path):
        raise ConfigError(f"CHECKPOINT {path}: no such folder; give a checkpoint folder, OUTPUT_DIR/checkpoints/step-N")
    if os.path.isfile(os.path.join(path, checkpoints.MANIFEST)):
        return
    found = checkpoints.complete(path)
    if found or os.path.isdir(checkpoints.root(path)):
        newest = f"; its newest: {found[-1][1]}" if found else " (it has no complete one)"
        raise ConfigError(f"CHECKPOINT {path} is a run's folder: give one of its checkpoints{newest}")


def _recipe_copy(checkpoint: str, manifest: dict) -> str:
    """The checkpoint's own copy of the recipe that wrote it (damage() checked it against the manifest)."""
    from launcher.worker.checkpoint import RECIPE_COPY

    path = os.path.join(checkpoint, RECIPE_COPY)
    if RECIPE_COPY not in manifest["files"] or not os.path.isfile(path):
        raise ConfigError(
            f"CHECKPOINT {checkpoint} holds no copy of the recipe that wrote it ({RECIPE_COPY}), and export "
            f"runs no file a checkpoint names: give the recipe with --recipe PATH (its run used "
            f"{manifest.get('recipe') or 'a recipe not recorded'})"
        )
    return path


def _tokenizer_and_task(recipe, cfg):
    from transformers import AutoTokenizer

    tokenizer = recipe.build_tokenizer(cfg) if recipe.build_tokenizer is not None else None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    return tokenizer, recipe.build_task(cfg, tokenizer)


def _base(recipe, cfg, task):
    """(the recipe's model as a rank builds it, on the meta device where the recipe says so; where its meta
    parameters' values come from, or None when it has none)."""
    from launcher.worker.weights import has_meta, weights_for

    torch.manual_seed(cfg.seed)  # as a rank does before build_model: any untrained random part is the same
    base = recipe.build_model(cfg, task)
    return base, weights_for(base, cfg.model_path, seed=cfg.seed) if has_meta(base) else None


def trained_model(recipe, cfg, task, checkpoint: str) -> torch.nn.Module:
    """The model a rank trained, rebuilt on this process's CPU (the frozen base in fp32, or quantized as in
    training) with the checkpoint's trained tensors, in eval mode."""
    from launcher.checkpoints import unmatched_parameters
    from launcher.worker.adapters import apply_adapter
    from launcher.worker.checkpoint import stored_tensors
    from launcher.worker.weights import has_meta, materialize

    cpu = torch.device("cpu")
    base, weights = _base(recipe, cfg, task)
    model = apply_adapter(base, cfg, task_type=task.peft_task_type, heads=task.heads, device=cpu, weights=weights)
    if has_meta(model):
        materialize(model, weights, cpu, lambda _: torch.float32)
    keys, tensor = stored_tensors(checkpoint)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unmatched = unmatched_parameters(list(trained), keys)
    if unmatched:
        raise ConfigError(
            f"CHECKPOINT {checkpoint}: its trained parameters are not those of the model the recipe builds "
            f"({unmatched}): was the recipe changed since?"
        )
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(tensor(f"param/{name}").to(p.dtype))
    model.eval()
    return model


def _write(model, recipe, cfg, task, folder: str, merge: bool) -> str:
    from launcher.worker.export import write_adapter

    if isinstance(cfg.adapter, Full):
        _write_whole(model, folder)
        return "model"
    if not merge:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        write_adapter(model, state, folder, task, sum(t.numel() for t in state.values()))
        return "adapter"
    _write_whole(merged_model(model, recipe, cfg, task), folder)
    return "merged"


def _write_whole(model: torch.nn.Module, folder: str) -> None:
    """A whole model; a model of the launcher's own (the tagger) as the transformers class it maps to
    (`as_transformers()`), with its extra tensors (a CRF's scores) in files beside it."""
    from safetensors.torch import save_file

    from launcher.worker.export import write_model
    from launcher.worker.strategies.base import saved_tensors

    extra: dict[str, dict[str, torch.Tensor]] = {}
    if hasattr(model, "as_transformers"):
        model, extra = model.as_transformers()
    write_model(saved_tensors(model), model, folder)
    for name, tensors in extra.items():
        save_file(tensors, os.path.join(folder, name))


def merged_model(model, recipe, cfg, task) -> torch.nn.Module:
    """The adapter merged into its base: peft's merge_and_unload on a plain (unquantized) copy when the base was
    quantized, its linear layers holding the dequantized weights, written in bf16."""
    import copy

    if not isinstance(cfg.adapter, (QLora, Lora8)):
        return copy.deepcopy(model).merge_and_unload()
    from launcher.worker.adapters import apply_adapter
    from launcher.worker.weights import load_whole

    plain_cfg = dataclasses.replace(cfg, adapter=_plain_lora(cfg.adapter))
    cpu = torch.device("cpu")
    torch.manual_seed(plain_cfg.seed)
    base = load_whole(recipe.build_model(plain_cfg, task), plain_cfg.model_path, seed=plain_cfg.seed)
    _take_dequantized(base, model)
    plain = apply_adapter(base, plain_cfg, task_type=task.peft_task_type, heads=task.heads, device=cpu)
    trained = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    return plain.merge_and_unload().to(MERGED_DTYPE)


def _plain_lora(adapter: Lora) -> Lora:
    return Lora(r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout, target_modules=list(adapter.target_modules))


def _take_dequantized(base: torch.nn.Module, quantized_peft: torch.nn.Module) -> None:
    """Give each linear layer of `base` the dequantized weight of its quantized twin in the trained peft model."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    inner = quantized_peft.get_base_model()
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                state = getattr(module, "state", None)
                value = dequantize_bnb_weight(module.weight, state=state)
                target = base.get_submodule(name.removesuffix(".base_layer"))
                target.weight.copy_(value.to(target.weight.dtype))


def _check(trained, folder: str, kind: str, cfg, task) -> tuple[float | None, int, str]:
    """(max |logits difference| between the folder loaded back with transformers and the trained model, examples
    compared, why not checked)."""
    import transformers

    rows = task.eval if task.eval is not None and len(task.eval) else task.train
    rows = [rows[i] for i in range(min(CHECK_EXAMPLES, len(rows)))]
    name = AUTO_CLASSES.get(task.peft_task_type)
    if name is None:
        return None, 0, f"not checked: no transformers class loads a {task.peft_task_type} model"
    auto = getattr(transformers, name)
    try:
        if kind == "adapter":
            if hasattr(trained.get_base_model(), "as_transformers"):
                return None, 0, "not checked: this adapter is for the launcher's own model class; --merge to check"
            if isinstance(cfg.adapter, (QLora, Lora8)):
                return None, 0, "not checked: an adapter of a quantized base loads on that base; --merge to check"
            from launcher.models import is_random

            if is_random(cfg.model):
                return None, 0, f"not checked: the base {cfg.model} is no folder; --merge gives a loadable model"
            from peft import PeftModel

            config = transformers.AutoConfig.from_pretrained(folder)
            loaded = PeftModel.from_pretrained(
                auto.from_pretrained(cfg.model_path, config=config, dtype=torch.float32), folder
            )
        else:
            loaded = auto.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as e:  # a custom model class (e.g. the CRF tagger) transformers cannot build
        return None, 0, f"not checked: transformers cannot load it as {name} ({e})"
    loaded.eval()
    collated = task.collate(rows)
    batch = _inputs(collated)
    with torch.no_grad():
        want = _logits(trained(**collated))
        got = _logits(loaded(**batch))
    if got is not None and "word_pos" in collated:  # a tagger scores each word at its first sub-token
        got = got.gather(1, collated["word_pos"].unsqueeze(-1).expand(-1, -1, got.shape[-1]))
    if want is None or got is None or want.shape != got.shape:
        return None, 0, "not checked: the trained model's outputs have no logits to compare"
    return float((want.float() - got.float()).abs().max()), len(rows), ""


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _logits(outputs) -> torch.Tensor | None:
    return getattr(outputs, "logits", None)
