"""LoRA adapters on a Qwen model, swapped in from outside it: each targeted projection becomes a `LoRALinear`.

A `LoRALinear` is the projection's own nn.Linear (same `weight` and `bias` parameters, so checkpoint names,
tensor-parallel splits and FSDP units stay those of the plain model) plus `lora_A` [r, in] and `lora_B` [out, r]
(names as PEFT's files, without the adapter name): y = x W^T + b + scaling * B(A(dropout(x))), scaling alpha / r,
or alpha / sqrt(r) with rsLoRA. A is drawn Kaiming-uniform as PEFT does and B is zero, so a fresh adapter leaves
the model's outputs unchanged. The frozen base may later be swapped for an int8 or oneDNN-packed one
(`replace_base`, used by qwen15.quantize); q/k/v and gate/up with adapters fuse (`fuse_adapters`, qwen15.fuse).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qwen15.errors import UserError

# The projections an adapter may target (the embedding and output layer are never adapted: a tied model stays tied).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRAError(UserError):
    """An adapter setting or file that cannot be used; the message names the key or file and what to do."""


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how: rank, alpha, dropout, rsLoRA scaling and the targeted projection names."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    target_modules: tuple[str, ...] = field(default=TARGETS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def validate(self, where: str = "lora") -> LoRASpec:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LoRAError(f"{where}.r must be a positive integer (the adapter rank), got {self.r!r}")
        if not (isinstance(self.alpha, int | float) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise LoRAError(f"{where}.alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise LoRAError(f"{where}.dropout must lie in [0, 1), got {self.dropout!r}")
        check_targets(self.target_modules, f"{where}.target_modules")
        return self

    @property
    def scaling(self) -> float:
        return scaling(self.r, self.alpha, self.rslora)


def scaling(r: int, alpha: float, rslora: bool) -> float:
    """PEFT's factor on B @ A: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_targets(targets, where: str) -> tuple[str, ...]:
    """The target names, or an error naming the ones that are not adaptable projections of a Qwen model."""
    targets = tuple(targets)
    if not targets:
        raise LoRAError(f"{where} is empty; name some of {', '.join(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        special = [t for t in unknown if t in ("embed_tokens", "lm_head")]
        why = (
            f"{', '.join(special)} cannot be adapted (adapters go on the attention and MLP projections only, "
            "so a tied model stays tied)"
            if special
            else f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a projection of a "
            "Qwen1.5 model"
        )
        raise LoRAError(f"{where}: {why}; use some of {', '.join(TARGETS)}")
    return targets


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x) if self.base_layer is not None else F.linear(x, self.weight, self.bias)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @classmethod
    def wrap(
        cls, linear: nn.Linear, r: int, scale: float, dropout: float = 0.0, dtype: torch.dtype | None = None
    ) -> LoRALinear:
        """A LoRALinear holding `linear`'s own weight and bias, with new adapter matrices on the linear's
        device in `dtype` (default the weight's), not yet initialised (see reset_adapter)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.register_parameter("weight", linear.weight)
        out.register_parameter("bias", linear.bias)
        out.base_layer = None
        kw = dict(bias=False, device=linear.weight.device, dtype=dtype or linear.weight.dtype)
        out.lora_A = nn.Linear(linear.in_features, r, **kw)
        out.lora_B = nn.Linear(r, linear.out_features, **kw)
        out.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out.r, out.scaling = r, scale
        return out

    def replace_base(self, convert: Callable[[nn.Linear], nn.Module]) -> None:
        """Swap the frozen base for `convert(self)` (an int8 or prepacked linear reading self.weight and
        self.bias); the adapter is kept. For inference, or a QLoRA-like frozen int8 base in training."""
        base = convert(self)
        for p in base.parameters():
            p.requires_grad_(False)
        del self.weight
        self.register_parameter("weight", None)
        if "bias" in self._parameters:
            del self.bias
            self.register_parameter("bias", None)
        self.base_layer = base

    def delta_weight(self) -> torch.Tensor:
        """scaling x B @ A in fp32: what merging adds to the weight."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return (b.detach().float() @ a.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        base = "" if self.base_layer is None else ", base replaced"
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}{base}"


@torch.no_grad()
def reset_adapter(module: LoRALinear, generator: torch.Generator | None = None) -> None:
    """PEFT's initialisation: A Kaiming-uniform (a = sqrt(5), i.e. uniform within 1/sqrt(in)), B zero."""
    nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5), generator=generator)
    nn.init.zeros_(module.lora_B.weight)


def adapted_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by module name ("layers.3.self_attn.q_proj"), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def projection_parent(model: nn.Module, target: str):
    """(parent module name, parent) of each block's `target` projection: self_attn for attention, mlp for MLP."""
    part = "self_attn" if target in ATTENTION_TARGETS else "mlp"
    for index, block in model.layers.items():
        yield f"layers.{index}.{part}", getattr(block, part)


def add_adapters(
    model: nn.Module,
    spec: LoRASpec,
    *,
    dtype: torch.dtype | None = torch.float32,
    ranks: dict[str, int] | None = None,
    init: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, LoRALinear]:
    """Swap the targeted projections of every block for LoRALinears, in place (on any device, meta included),
    freezing every other parameter; with `init` (and not on meta) A is drawn as PEFT does from `generator` and B
    is zero. `ranks` (module name -> r) overrides spec.r per module and limits the adapters to those modules (an
    adapter file that adapts only some layers). Sets model.lora_spec; returns the new modules in module order."""
    spec.validate()
    if adapted_modules(model):
        raise LoRAError("the model already has adapters; load the base model again to apply other ones")
    for p in model.parameters():
        p.requires_grad_(False)
    added: dict[str, LoRALinear] = {}
    for target in spec.target_modules:
        for parent_name, parent in projection_parent(model, target):
            linear = getattr(parent, target, None)
            name = f"{parent_name}.{target}"
            if ranks is not None and name not in ranks:
                continue
            if type(linear) is not nn.Linear:
                raise LoRAError(
                    f"{name} is a {type(linear).__name__}, not a plain projection: apply adapters to a model "
                    "as loaded (before prepare_for_inference, fusion or quantization)"
                )
            r = spec.r if ranks is None else ranks[name]
            module = LoRALinear.wrap(linear, r, scaling(r, spec.alpha, spec.rslora), spec.dropout, dtype)
            setattr(parent, target, module)
            added[name] = module
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    added = dict(sorted(added.items(), key=lambda kv: order[kv[0]]))
    if init:
        for module in added.values():
            if module.lora_A.weight.device.type != "meta":
                reset_adapter(module, generator)
    model.lora_spec = spec
    return added


@torch.no_grad()
def init_adapters(parts: nn.Module | list[nn.Module], seed: int) -> None:
    """reset_adapter for a model that may be sharded (FSDP2 / tensor parallel DTensors): every A is drawn in full,
    in module order, from one generator seeded with `seed`, and each rank keeps its slice, so the adapters are
    the same for any number of processes and any layout."""
    from torch.distributed.tensor import DTensor

    from qwen15.hf_checkpoint import copy_full_

    parts = list(parts) if isinstance(parts, list | tuple) else [parts]
    modules = [m for part in parts for m in adapted_modules(part).values()]
    if not modules:
        return
    a = modules[0].lora_A.weight
    device = a.to_local().device if isinstance(a, DTensor) else a.device
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in modules:
        a = module.lora_A.weight
        full = torch.empty(a.shape, dtype=a.dtype, device=device)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        copy_full_(a, full)
        module.lora_B.weight.zero_()


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter matrices by parameter name ("layers.3.self_attn.q_proj.lora_A.weight")."""
    out = {}
    for name, module in adapted_modules(model).items():
        out[f"{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{name}.lora_B.weight"] = module.lora_B.weight
    return out


# ---------------------------------------------------------------------------------------------- fusion


@torch.no_grad()
def fuse_adapters(parts: list[nn.Linear], fused: nn.Linear) -> nn.Linear:
    """`fused` (the concatenated base of `parts`, qwen15.fuse) with the parts' adapters as one: A stacked
    [sum r, in], B block-diagonal [sum out, sum r] with each part's scaling folded in; a part without an adapter
    contributes zero rows. Output = the concatenation of the parts' outputs. For inference (no dropout)."""
    adapted = [p for p in parts if isinstance(p, LoRALinear)]
    if not adapted:
        return fused
    if any(p.base_layer is not None for p in adapted):
        raise LoRAError("fuse projections before quantizing or packing them")
    w = adapted[0].lora_A.weight
    rank = sum(p.r for p in adapted)
    a = torch.zeros(rank, fused.in_features, dtype=w.dtype, device=w.device)
    b = torch.zeros(fused.out_features, rank, dtype=w.dtype, device=w.device)
    row = col = 0
    for p in parts:
        if isinstance(p, LoRALinear):
            a[col : col + p.r] = p.lora_A.weight
            b[row : row + p.out_features, col : col + p.r] = p.lora_B.weight * p.scaling
            col += p.r
        row += p.out_features
    out = LoRALinear.wrap(fused, rank, 1.0, dtype=w.dtype)
    out.lora_A.weight.copy_(a)
    out.lora_B.weight.copy_(b)
    return out


# ---------------------------------------------------------------------------------------------- merging


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place: W + scaling B @ A computed in fp32 and cast once to
    the weight's dtype; the LoRALinears become plain nn.Linears again. Returns the model."""
    for name, module in adapted_modules(model).items():
        if module.base_layer is not None:
            raise LoRAError(f"{name}: its base was quantized or packed; merge before prepare_for_inference")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        merged = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
        )
        weight = module.weight
        merged.weight = nn.Parameter(
            (weight.float() + module.delta_weight().to(weight.device)).to(weight.dtype), requires_grad=False
        )
        merged.bias = module.bias
        setattr(parent, attr, merged)
    return model
