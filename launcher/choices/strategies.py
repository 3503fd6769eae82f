"""The distributed strategies: each one's settings, its own checks, the settings it leaves unread, and what it does
(capabilities the rest of the launcher asks, never its name). How each runs lives in launcher/worker/strategies/.
Pure: no torch import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(kw_only=True)
class StrategyChoice:
    """What every strategy answers."""

    name: ClassVar[str]
    shards_parameters: ClassVar[bool] = False
    """Each rank keeps a shard of every parameter (a frozen quantized base included), gathered per block."""

    @property
    def offloads_optimizer(self) -> bool:
        """The optimizer states (and the optimizer step) live on the CPU or NVMe (ZeRO-Offload)."""
        return False

    @property
    def offloads_parameters(self) -> bool:
        """The parameter shards live on the CPU (or NVMe) between uses."""
        return False

    def problems(self) -> list[str]:
        """Its own settings' problems, each naming the setting, the value and the fix."""
        return []

    def environment_problems(self, precision: str, env) -> list[str]:
        """What the launch environment (job.LaunchEnv) cannot run of it."""
        return []

    def ignored(self) -> list[tuple[str, bool, str]]:
        """(setting, whether it is ignored, why) for its settings that other ones of it make unread."""
        return []

    def details(self) -> list[str]:
        """Its refinements that place it in the compatibility table, as key=value."""
        return []


@dataclass(kw_only=True)
class Ddp(StrategyChoice):
    """PyTorch DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

    name: ClassVar[str] = "ddp"
    find_unused_parameters: bool = False
    """Let DDP tolerate parameters that get no gradient in a step (slower; only for models that need it)."""


@dataclass(kw_only=True)
class Zero(StrategyChoice):
    """DeepSpeed ZeRO through `deepspeed.initialize`."""

    stage: int = 2
    """0: DeepSpeed data parallel; 1: shard optimizer states; 2: also gradients; 3: also parameters."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Offload: keep optimizer states (and the optimizer step) on the CPU, or on NVMe under offload_dir."""
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-3 only: keep the parameter shards on the CPU (or NVMe) between uses."""
    offload_dir: str = ""
    """Folder on a fast local NVMe disk for offload=nvme (needs DeepSpeed's async I/O, i.e. libaio)."""

    @property
    def name(self) -> str:
        return f"zero{self.stage}"

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    @property
    def offloads_optimizer(self) -> bool:
        return self.offload_optimizer != "none"

    @property
    def offloads_parameters(self) -> bool:
        return self.offload_params != "none"

    def problems(self) -> list[str]:
        if self.stage not in (0, 1, 2, 3):
            return [f"strategy.stage={self.stage}: ZeRO stages are 0, 1, 2 and 3"]
        return []

    def environment_problems(self, precision: str, env) -> list[str]:
        problems = []
        if "nvme" in (self.offload_optimizer, self.offload_params) and not env.libaio:
            problems.append(
                "strategy.offload_*=nvme: DeepSpeed's asynchronous I/O needs libaio, which this machine lacks; "
                "install it (apt-get install libaio-dev) and rebuild DeepSpeed's ops, or offload to cpu instead"
            )
        if precision == "fp16" and not env.cuda:
            problems.append(
                "precision=fp16 under DeepSpeed needs GPUs: its CPU accelerator has no fp16; "
                "use precision=bf16 or fp32 here, or strategy=ddp / strategy=fsdp (torch's loss scaler runs on CPUs)"
            )
        return problems

    def ignored(self) -> list[tuple[str, bool, str]]:
        nvme = "nvme" in (self.offload_optimizer, self.offload_params)
        return [("strategy.offload_dir", not nvme, "nothing is offloaded to nvme")]

    def details(self) -> list[str]:
        return [
            f"{k}={getattr(self, k)}" for k in ("offload_optimizer", "offload_params") if getattr(self, k) != "none"
        ]


@dataclass(kw_only=True)
class Fsdp(StrategyChoice):
    """PyTorch FSDP2: `fully_shard` on each transformer block, then on the root module."""

    name: ClassVar[str] = "fsdp"
    shards_parameters: ClassVar[bool] = True
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (saves memory, costs a second all-gather)."""
    shard: Literal["full", "hybrid"] = "full"
    """full: shard over every process; hybrid: shard inside a group (a node), replicate across groups."""
    shard_group_size: int = 0
    """Processes per shard group for shard=hybrid; 0 means the processes of one node."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameter shards, gradients and the optimizer step on the CPU (FSDP2 CPUOffloadPolicy)."""

    @property
    def offloads_parameters(self) -> bool:
        return self.offload_params != "none"

    def problems(self) -> list[str]:
        if self.shard_group_size < 0:
            return [f"strategy.shard_group_size={self.shard_group_size}: use 0 for one node's processes"]
        return []

    def environment_problems(self, precision: str, env) -> list[str]:
        if self.shard != "hybrid":
            return []
        group = self.shard_group_size or env.local_world_size
        if group > env.world_size or env.world_size % group:
            return [
                f"strategy.shard=hybrid: shard groups of {group} process(es) do not divide {env.world_size} "
                f"process(es); set strategy.shard_group_size to a divisor of {env.world_size}"
            ]
        return []

    def ignored(self) -> list[tuple[str, bool, str]]:
        return [("strategy.shard_group_size", self.shard != "hybrid", "strategy.shard=full shards over every process")]

    def details(self) -> list[str]:
        return [f"shard={self.shard}"] * (self.shard != "full") + [f"offload_params={self.offload_params}"] * (
            self.offload_params != "none"
        )


@dataclass(kw_only=True)
class Auto(StrategyChoice):
    """Chosen for the job: on GPUs the cheapest strategy the memory plan fits (`launcher plan`; ZeRO stages only
    under DeepSpeed's runner), said before the run with the runner-up; on CPUs ZeRO-2 under DeepSpeed's runner,
    otherwise DDP."""

    name: ClassVar[str] = "auto"


Strategy = Ddp | Zero | Fsdp | Auto

STRATEGIES: dict[str, object] = {
    "ddp": Ddp,
    "zero0": lambda: Zero(stage=0),
    "zero1": lambda: Zero(stage=1),
    "zero2": lambda: Zero(stage=2),
    "zero3": lambda: Zero(stage=3),
    "fsdp": Fsdp,
    "auto": Auto,
}
