"""What gets trained: every parameter, or a peft LoRA/DoRA adapter, optionally over a base quantized by bitsandbytes
(4-bit for qlora, 8-bit for lora8). Quantization happens here, after the recipe built its model, so every recipe
gets every adapter without knowing about bitsandbytes. A model built on the meta device (worker/weights.py) is
quantized on load: each layer's weight is read whole, quantized, and dropped before the next one is read; with
several ranks, each layer by one of them in turn, the 4-bit result broadcast to the others."""

from __future__ import annotations

import torch

from launcher.choices import AdaLora, Adapter, Dora, Full, Ia3, Lora, Lora8, PrefixTuning, PromptTuning, QLora
from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.planning.counting import kept_whole, within
from launcher.worker.strategies.base import compute_dtype as autocast_dtype
from launcher.worker.weights import Weights, has_meta, materialize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a precision computes in (fp32 for fp32)."""
    return autocast_dtype(precision) or torch.float32


def quant_storage(cfg: RunConfig) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored as (see QLora.quant_storage)."""
    assert isinstance(cfg.adapter, QLora)
    if cfg.adapter.quant_storage != "auto":
        return DTYPES[cfg.adapter.quant_storage]
    # Sharded, the packed weights travel with the other parameters and are cast like them (DeepSpeed casts the
    # module to bf16/fp16, FSDP2 to its param_dtype): stored in that very dtype, no cast touches their bits.
    return precision_dtype(cfg.precision) if cfg.strategy.shards_parameters else torch.uint8


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    assert isinstance(cfg.adapter, QLora)
    choice = cfg.adapter.compute_dtype
    return precision_dtype(cfg.precision if choice == "auto" else choice)


def linear_names(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """Leaf names of the linear layers LoRA may target (`all-linear`): not heads, not the output embedding."""
    import bitsandbytes as bnb

    linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    skip = kept_whole(model, heads)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear) and not within(n, skip)}
    # A leaf name shared with a head (e.g. `dense` inside a head) would reach into the head: leave it out.
    head_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if within(n, skip)}
    return sorted(names - head_names)


def quantize(
    model: torch.nn.Module, cfg: RunConfig, heads: list[str], device: torch.device, weights: Weights | None = None
) -> int:
    """Replace the base model's linear layers by bitsandbytes 4-bit (qlora) or 8-bit (lora8) ones, quantized on
    `device`; a layer still on the meta device is read from `weights` first. Heads and the output embedding stay in
    full precision. Returns the number of layers replaced."""
    import bitsandbytes as bnb

    adapter = cfg.adapter
    targets = [(n, model.get_submodule(n)) for n in quantized_layers(model, heads)]
    world, rank = _world()
    # Built on meta, with peers: each rank reads and quantizes every world-th layer, all at once, then each layer is
    # sent from its rank to the others (the same bits: quantizing is deterministic). A node quantizes its model once,
    # not once per rank, and no rank waits for another's layer before doing its own.
    shared = weights is not None and isinstance(adapter, QLora) and world > 1
    pending = []
    for index, (name, old) in enumerate(targets):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        owner = index % world if shared else rank
        if weights is not None and (owner == rank or old.bias is not None):  # read whole, only now
            materialize(old, weights, torch.device("cpu"), lambda _: torch.float32, prefix=name)
        weight = old.weight.data if owner == rank else None
        if isinstance(adapter, QLora):
            new = bnb.nn.Linear4bit(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                compute_dtype=compute_dtype(cfg),
                compress_statistics=adapter.double_quant,
                quant_type=adapter.quant_type,
                quant_storage=quant_storage(cfg),
                device="meta",
            )
            if weight is not None:
                new.weight = four_bit(weight, cfg, device, module=new)
            pending.append((new, owner))
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval-mode forward,
            # rounding the block scales to bf16: the frozen base would silently change after an evaluation.
            new.support_avx512bf16_for_cpu = False
        else:
            new = bnb.nn.Linear8bitLt(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                has_fp16_weights=False,
                threshold=adapter.threshold,
                device="meta",
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data.to(device), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], new)
        old.to("meta")  # `targets` still holds the old layer: free its full-precision weight now, not at the end
    for new, owner in pending if shared else []:
        new.weight = _sent(new.weight if owner == rank else None, owner, device, new)
    return len(targets)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _sent(packed, owner: int, device: torch.device, module):
    """A layer's 4-bit weight (bitsandbytes Params4bit), which rank `owner` quantized (the others pass None),
    broadcast: the packed bits as a tensor, the block scales and layout as an object. Collective."""
    import bitsandbytes as bnb

    dist = torch.distributed
    mine = packed is not None
    if mine:
        stats = {k: v.cpu() if torch.is_tensor(v) else v for k, v in packed.quant_state.as_dict(packed=True).items()}
        box = [tuple(packed.data.shape), packed.data.dtype, stats]
    else:
        box = [None, None, None]
    dist.broadcast_object_list(box, src=owner)
    shape, dtype, stats = box
    data = packed.data if mine else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(data, src=owner)
    if mine:
        return packed
    return bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=module)


def quantized_layers(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """Names of the linear layers a 4-bit or 8-bit base quantizes: all but the heads and the output embedding."""
    skip = kept_whole(model, heads)
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n and not within(n, skip)]


def four_bit(weight: torch.Tensor, cfg: RunConfig, device: torch.device, module=None):
    """`weight` quantized as qlora stores it (bitsandbytes Params4bit on `device`)."""
    import bitsandbytes as bnb

    adapter = cfg.adapter
    return bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        compress_statistics=adapter.double_quant,
        quant_type=adapter.quant_type,
        quant_storage=quant_storage(cfg),
        module=module,
    )._quantize(device)


def apply_adapter(
    model: torch.nn.Module,
    cfg: RunConfig,
    *,
    task_type: str,
    heads: list[str],
    device: torch.device | None = None,
    weights: Weights | None = None,
    total_steps: int = 0,
) -> torch.nn.Module:
    """Wrap `model` for `cfg.adapter`. `heads` (e.g. the classifier) are always trained in full. `total_steps`: the
    optimizer steps training will take (AdaLoRA's budget schedule runs over them; 0 where the model is not trained).

    Quantized bases are quantized on `device` (the rank's device; bitsandbytes quantizes where the weight is). A
    model built on the meta device stays there but for its quantized layers (read from `weights`) and the adapter's
    own parameters; its strategy materializes the rest."""
    adapter: Adapter = cfg.adapter
    if cfg.activation_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and under every strategy.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if isinstance(adapter, Full):
        model.requires_grad_(True)
        return model
    if not isinstance(adapter, Lora):
        return _other_peft(model, adapter, task_type, heads)
    from peft import LoraConfig, get_peft_model

    available = linear_names(model, heads)
    if adapter.target_modules == ["all-linear"]:
        targets = available
    else:
        targets = list(adapter.target_modules)
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in model.named_modules())]
        if missing:
            raise ConfigError(
                f"adapter.target_modules names {', '.join(missing)}, which this model does not have; "
                f"its linear layers are {', '.join(available)} (or use adapter.target_modules=all-linear)"
            )
    if isinstance(adapter, Dora) and weights is not None and has_meta(model):
        # DoRA starts its magnitudes from the base weights' norms: the base must exist before peft wraps it.
        materialize(model, weights, torch.device("cpu"), lambda _: torch.float32)
        weights.notes.append("dora: the base model is built whole on each rank (its magnitudes are the weights' norms)")
    if isinstance(adapter, (QLora, Lora8)):
        quantize(model, cfg, heads, device or torch.device("cpu"), weights if has_meta(model) else None)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    common = dict(
        task_type=task_type,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        modules_to_save=[h for h in heads if h in present],
    )
    if isinstance(adapter, AdaLora):
        config = _adalora_config(adapter, total_steps, common)
    else:
        config = LoraConfig(r=adapter.r, use_dora=isinstance(adapter, Dora), **common)
    wrapped = get_peft_model(model, config)
    _initialise_meta_adapters(wrapped)
    return wrapped


def _adalora_config(adapter: AdaLora, total_steps: int, common: dict):
    from peft import AdaLoraConfig

    # A model that is not trained (an export, a reload) still needs a schedule peft accepts.
    steps = total_steps or adapter.tinit + adapter.tfinal + 2
    # The final pruning (after step steps - tfinal) ranks by scores gathered on the steps before it: at least one.
    if adapter.tinit + adapter.tfinal + 2 > steps:
        raise ConfigError(
            f"adapter.tinit={adapter.tinit} + adapter.tfinal={adapter.tfinal} leave too few of the {steps} optimizer "
            "steps to score and prune ranks in (at least 2): lower them (e.g. adapter.tinit=0 adapter.tfinal=0) or "
            "train longer"
        )
    return AdaLoraConfig(
        init_r=adapter.r,
        target_r=adapter.target_r,
        tinit=adapter.tinit,
        tfinal=adapter.tfinal,
        deltaT=adapter.delta_t,
        beta1=adapter.beta1,
        beta2=adapter.beta2,
        orth_reg_weight=adapter.orth_reg_weight,
        total_step=steps,
        **common,
    )


def _other_peft(model: torch.nn.Module, adapter, task_type: str, heads: list[str]) -> torch.nn.Module:
    """IA3, prompt or prefix tuning through peft; their trained tensors made on the CPU when the base is on meta."""
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    kept = [h for h in heads if h in present]
    if isinstance(adapter, Ia3):
        auto = adapter.target_modules == ["auto"]
        config = IA3Config(
            task_type=task_type,
            target_modules=None if auto else list(adapter.target_modules),
            feedforward_modules=None if adapter.feedforward_modules == ["auto"] else list(adapter.feedforward_modules),
            modules_to_save=kept,
        )
    elif isinstance(adapter, PromptTuning):
        config = PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens, modules_to_save=kept
        )
    else:
        assert isinstance(adapter, PrefixTuning)
        config = PrefixTuningConfig(
            task_type=task_type,
            num_virtual_tokens=adapter.num_virtual_tokens,
            prefix_projection=adapter.projection,
            modules_to_save=kept,
        )
    # peft hands a causal LM its prefixes as past key values whatever its signature; a classifier or tagger only
    # when its forward (or its backbone's) has that argument.
    if isinstance(adapter, PrefixTuning) and task_type != "CAUSAL_LM" and not _takes_past_key_values(model):
        raise ConfigError(
            f"adapter=prefix: {type(model).__name__} takes no past key values, which prefix tuning carries its "
            "prefixes in (transformers' encoders such as BERT); use adapter=prompt (trained tokens before the input), "
            "ia3 or lora"
        )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:  # peft's word on what this model cannot take (e.g. BERT and prefix tuning)
        raise ConfigError(f"adapter={adapter.name} cannot wrap this model ({type(model).__name__}): {e}") from None
    _initialise_meta_trained(wrapped)
    return wrapped


def _takes_past_key_values(model: torch.nn.Module) -> bool:
    """Whether the model, or its backbone, has a past_key_values argument (what peft passes prefixes in)."""
    import inspect

    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone) if m is not None)


def _initialise_meta_trained(model: torch.nn.Module) -> None:
    """peft puts IA3's vectors (and a prompt encoder) where the base is: on meta for a base not yet loaded. They are
    small and every rank keeps them whole: made on the CPU and initialised as peft does (IA3: ones; embeddings and
    a prefix MLP: torch's default initialisation), in module order from the seeded generator, alike on every rank."""
    from peft.tuners.ia3.layer import IA3Layer

    for module in model.modules():
        if isinstance(module, IA3Layer):
            for name in list(module.ia3_l.keys()):
                if module.ia3_l[name].device.type == "meta":
                    module.ia3_l[name] = torch.nn.Parameter(torch.ones(module.ia3_l[name].shape))
    encoders = getattr(model, "prompt_encoder", None) or {}
    for encoder in encoders.values():
        if any(p.device.type == "meta" for p in encoder.parameters()):
            encoder.to_empty(device="cpu")
            for m in encoder.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()


def _initialise_meta_adapters(model: torch.nn.Module) -> None:
    """peft puts a layer's LoRA matrices where its base weight is: on meta for a base not yet loaded. They are small
    and every rank keeps them whole: made on the CPU and initialised as peft does (A Kaiming-uniform, B zero)."""
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.lora.layer import LoraLayer

    for module in model.modules():
        if isinstance(module, AdaLoraLayer):  # A, E and B are parameters (E zero, A and B normal(0, 0.02))
            for name in list(module.lora_A.keys()):
                if module.lora_A[name].device.type == "meta":
                    for tensors in (module.lora_A, module.lora_E, module.lora_B):
                        tensors[name] = torch.nn.Parameter(torch.empty(tensors[name].shape))
                    module.reset_lora_parameters(name)
            for name in list(module.ranknum.keys()):
                # The rank the update is divided by: a constant, float(r), made by peft off the meta device only
                # under its own empty-weights context; ours leaves it on meta and (re-registered) trainable.
                if module.ranknum[name].device.type == "meta" or module.ranknum[name].requires_grad:
                    value = torch.full((1,), float(module.r[name]))
                    module.ranknum[name] = torch.nn.Parameter(value, requires_grad=False)
            continue
        if not isinstance(module, LoraLayer):
            continue
        for name in list(module.lora_A.keys()):
            pair = [*module.lora_A[name].parameters(), *module.lora_B[name].parameters()]
            if any(p.device.type == "meta" for p in pair):
                module.lora_A[name].to_empty(device="cpu")
                module.lora_B[name].to_empty(device="cpu")
                module.reset_lora_parameters(name, True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts its unpacked elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    return trainable, total


def _logical_numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()
