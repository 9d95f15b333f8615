"""The parallel layout of a run: how many ranks replicate, shard, split tensors and split layers, and its mesh.

A layout multiplies out to the world size: pp x dp_replicate x dp_shard x tp. The device mesh has these four named
dimensions in that order, tensor parallel innermost (its ranks are neighbours, so they share a node's fast links)
and pipeline outermost (stages talk least: one activation per micro-batch). Size-1 dimensions are kept, so every
consumer can ask the mesh for "tp" or "pp" whatever the layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from qwen15.errors import UserError
from qwen15.model_config import ModelConfig

SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


class LayoutError(UserError):
    """A parallel layout that cannot run on this world size or model; the message names the key and the fix."""


@dataclass
class ParallelLayout:
    """How a run is split across ranks: the `parallel` section of a training recipe (docs/parallel.md).

    dp_replicate: data-parallel replicas (HSDP's replicate dimension; plain DDP when dp_shard is 1).
    dp_shard: FSDP2 shards parameters, gradients and optimizer state over this many ranks; -1 = every rank left
        once the other dimensions are set.
    tp: tensor-parallel ranks (heads, MLP columns and the vocabulary split across them).
    sequence_parallel: with tp, the norms and the residual stream are split along the sequence between the TP
        ranks (less activation memory; same arithmetic).
    pp: pipeline stages over ranks; pp_schedule one of 1F1B, Interleaved1F1B, GPipe.
    pp_microbatches: micro-batches per step and pipeline (default: pp, the least a 1F1B schedule accepts).
    pp_stages_per_rank: model chunks per pipeline rank (default 2 for Interleaved1F1B, else 1).
    vocab_parallel: with tp, split the embedding and output layer over the vocabulary (True), or keep a full copy
        on each tensor-parallel rank (False: more memory, no collective for the embedding).
    pp_embedding_cost, pp_output_cost: what the embedding and the output layer weigh, in transformer layers, when
        the layers are split into balanced stages; None = from the model shape (see qwen15.parallel.pipeline).
    reshard_after_forward: FSDP2 frees the gathered weights after forward (ZeRO-3); False keeps them (ZeRO-2).
    world_size: the number of processes a recipe is laid out for (a note is printed when a launch differs).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sequence_parallel: bool = True
    pp: int = 1
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "GPipe"] = "1F1B"
    pp_microbatches: int | None = None
    pp_stages_per_rank: int | None = None
    vocab_parallel: bool = True
    pp_embedding_cost: float | None = None
    pp_output_cost: float | None = None
    reshard_after_forward: bool = True
    world_size: int | None = None

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step sees side by side."""
        return self.dp_replicate * self.dp_shard

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches if self.pp_microbatches is not None else self.pp

    @property
    def stages_per_rank(self) -> int:
        if self.pp_stages_per_rank is not None:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule == "Interleaved1F1B" and self.pp > 1 else 1

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def num_ranks(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    def split(self) -> dict[str, Any]:
        """The keys that decide which rank holds what (recorded with checkpoints, compared on resume)."""
        ignored = ("reshard_after_forward", "world_size")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "parallel") -> ParallelLayout:
        """A layout from a config section; unknown keys are errors that name the key."""
        if not isinstance(data, dict):
            raise LayoutError(f"{where}: expected a mapping of layout keys, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayoutError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def resolve(self, world_size: int, where: str = "parallel") -> ParallelLayout:
        """A copy with dp_shard = -1 filled in from the world size (errors if the sizes do not multiply out)."""
        for name in ("dp_replicate", "tp", "pp"):
            _positive_int(getattr(self, name), f"{where}.{name}")
        if self.world_size is not None:
            _positive_int(self.world_size, f"{where}.world_size")
        if self.dp_shard == -1:
            others = self.dp_replicate * self.tp * self.pp
            if world_size % others:
                raise LayoutError(
                    f"{where}: world size {world_size} is not divisible by dp_replicate x tp x pp = "
                    f"{self.dp_replicate} x {self.tp} x {self.pp} = {others}; change the layout or the number "
                    "of processes (torchrun --nproc-per-node / --nnodes)"
                )
            return dataclasses.replace(self, dp_shard=world_size // others)
        _positive_int(self.dp_shard, f"{where}.dp_shard", allow=(-1,))
        if self.num_ranks() != world_size:
            raise LayoutError(
                f"{where}: pp x dp_replicate x dp_shard x tp = {self.pp} x {self.dp_replicate} x "
                f"{self.dp_shard} x {self.tp} = {self.num_ranks()} ranks, but the world size is {world_size}; "
                "make the product equal the number of processes (or set dp_shard: -1 to fill it in)"
            )
        return dataclasses.replace(self)

    def validate(
        self,
        world_size: int,
        model_config: ModelConfig,
        *,
        local_batch_size: int | None = None,
        where: str = "parallel",
    ) -> ParallelLayout:
        """Check the layout against the world size and the model shape; return it resolved (dp_shard filled in).

        local_batch_size: sequences per data-parallel rank and step, when known (must split into micro-batches).
        """
        layout = self.resolve(world_size, where)
        cfg = model_config
        tp = layout.tp
        if tp > 1:
            heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
            if heads % tp:
                raise LayoutError(
                    f"{where}.tp = {tp}: num_attention_heads {heads} is not divisible by tp; "
                    f"use a tp that divides {heads} ({_divisors_text(heads)})"
                )
            if kv % tp:
                raise LayoutError(
                    f"{where}.tp = {tp}: num_key_value_heads {kv} is not divisible by tp (a tensor-parallel rank "
                    f"must own whole key/value heads; duplicating heads across ranks is not supported); use a tp "
                    f"that divides {kv} ({_divisors_text(kv)}) and put the remaining ranks in dp_shard or pp"
                )
            if cfg.intermediate_size % tp:
                raise LayoutError(
                    f"{where}.tp = {tp}: intermediate_size {cfg.intermediate_size} is not divisible by tp"
                )
            if layout.vocab_parallel and cfg.vocab_size % tp:
                raise LayoutError(
                    f"{where}.tp = {tp}: vocab_size {cfg.vocab_size} is not divisible by tp; pad the vocabulary "
                    "or set vocab_parallel: false"
                )
        if not isinstance(layout.sequence_parallel, bool) or not isinstance(layout.vocab_parallel, bool):
            raise LayoutError(f"{where}: sequence_parallel and vocab_parallel must be true or false")
        if layout.pp_schedule not in SCHEDULES:
            raise LayoutError(
                f"{where}.pp_schedule = {layout.pp_schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        _positive_int(layout.microbatches, f"{where}.pp_microbatches")
        _positive_int(layout.stages_per_rank, f"{where}.pp_stages_per_rank")
        for name in ("pp_embedding_cost", "pp_output_cost"):
            value = getattr(layout, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise LayoutError(f"{where}.{name} = {value!r}: must be a number >= 0 (in layers) or null")
        if layout.pp > 1:
            self._validate_pipeline(layout, cfg, where)
        if local_batch_size is not None and local_batch_size % layout.microbatches:
            raise LayoutError(
                f"{where}.pp_microbatches = {layout.microbatches}: the batch per data-parallel rank "
                f"({local_batch_size} sequences) does not split into {layout.microbatches} equal micro-batches; "
                "make the batch a multiple of pp_microbatches"
            )
        return layout

    @staticmethod
    def _validate_pipeline(layout: ParallelLayout, cfg: ModelConfig, where: str) -> None:
        stages, mbs = layout.num_stages, layout.microbatches
        if cfg.tie_word_embeddings:
            raise LayoutError(
                f"{where}.pp = {layout.pp}: this model ties its output layer to the embedding (the 0.5B family), "
                "which cannot live on two pipeline stages; use pp: 1 (these models fit one device) with "
                "dp_shard or tp"
            )
        if cfg.num_hidden_layers < stages:
            raise LayoutError(
                f"{where}: {stages} pipeline stages (pp {layout.pp} x {layout.stages_per_rank} per rank) but the "
                f"model has only {cfg.num_hidden_layers} layers; every stage needs at least one layer"
            )
        if layout.pp_schedule == "Interleaved1F1B":
            if layout.stages_per_rank < 2:
                raise LayoutError(
                    f"{where}.pp_stages_per_rank = {layout.stages_per_rank}: Interleaved1F1B needs at least 2 "
                    "stages per rank (use 1F1B for one stage per rank)"
                )
            rounds = max(1, mbs // layout.pp)
            if mbs % rounds:
                raise LayoutError(
                    f"{where}.pp_microbatches = {mbs}: Interleaved1F1B needs a multiple of "
                    f"{rounds} (micro-batches // pp); a multiple of pp = {layout.pp} always works"
                )
        elif layout.stages_per_rank != 1:
            raise LayoutError(
                f"{where}.pp_stages_per_rank = {layout.stages_per_rank}: {layout.pp_schedule} runs one stage per "
                "rank; use Interleaved1F1B for several"
            )
        if layout.pp_schedule == "1F1B" and mbs < layout.pp:
            raise LayoutError(
                f"{where}.pp_microbatches = {mbs}: 1F1B needs at least as many micro-batches as stages "
                f"({layout.pp}); more (4 x pp or so) also shrinks the pipeline bubble"
            )


@dataclass
class RunMesh:
    """The device mesh of a run (dims pp, dp_replicate, dp_shard, tp) and its flattened data-parallel view `dp`
    (dp_replicate x dp_shard: the ranks that read different rows). `run_mesh["tp"]` slices the mesh."""

    mesh: Any  # DeviceMesh
    dp: Any  # DeviceMesh

    def __getitem__(self, dims):
        return self.mesh[dims]

    def size(self) -> int:
        return self.mesh.size()


def build_mesh(layout: ParallelLayout, device_type: str = "cuda") -> RunMesh:
    """The RunMesh of a layout (torch.distributed initialised; the layout is resolved against its world size)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialised (launch with torchrun)")
    layout = layout.resolve(dist.get_world_size())
    shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    # Flattened once here: slicing mesh["dp"] again on every use is deprecated by torch (a warning each time).
    return RunMesh(mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp"))


def _positive_int(value: Any, key: str, allow: tuple[int, ...] = ()) -> None:
    if value in allow and not isinstance(value, bool):
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LayoutError(f"{key} = {value!r}: must be a positive integer")


def _divisors_text(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)
