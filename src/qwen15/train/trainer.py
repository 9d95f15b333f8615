"""The training loop: data -> forward/backward over micro-batches -> clip -> AdamW -> metrics -> checkpoints.

One `Trainer` per process; every process runs the same code (SPMD). The `parallel` section's layout decides the
device mesh (pp x dp_replicate x dp_shard x tp): tensor parallel, activation checkpointing, compile and FSDP2 are
applied to the model (or to this rank's pipeline stages) in qwen15.parallel.parallelize; the forward/backward of one
step is `forward_backward` (pp 1) or the pipeline schedule (pp > 1, the loss on the last stage); the loss is the
token mean over the GLOBAL batch in every layout (qwen15.train.loss).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen15.atomic import atomic_write_text
from qwen15.data.dataset import DatasetError, RowSampler, TokenDataset
from qwen15.errors import UserError
from qwen15.hf_checkpoint import load_weights
from qwen15.lora.modules import adapter_parameters, add_adapters, init_adapters
from qwen15.model import Qwen
from qwen15.model_config import IM_END_ID, SHAPE_KEYS, ModelConfig, get_preset
from qwen15.parallel import process_group as D
from qwen15.parallel.layout import ParallelLayout, build_mesh
from qwen15.parallel.parallelize import parallelize, uses_autocast
from qwen15.quantize import quantize_int8
from qwen15.train.config import TrainConfig, TrainConfigError
from qwen15.train.dcp_checkpoint import (
    CheckpointManager,
    complete_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    set_aside,
    step_of,
)
from qwen15.train.document_attention import (
    apply_document_attention,
    default_backend,
    pass_documents_to_blocks,
)
from qwen15.train.lineage import config_changes, lineage_of, new_lineage
from qwen15.train.loss import count_targets, cross_entropy_sum, micro_batch_loss
from qwen15.train.metrics import (
    MetricsLogger,
    StepTimer,
    flops_per_token,
    memory_gb,
    peak_tflops,
    plot_loss_curve,
    read_metrics,
)
from qwen15.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr, set_weight_decay
from qwen15.train.random_init import init_weights
from qwen15.train.run_lock import RunLock


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite; the weights were not updated with it."""


class PeerLost(UserError):
    """Another process of the run (a worker, a node, its launcher) went away in the middle of a collective."""


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timeout")


def _is_peer_loss(error: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(error, getattr(dist, "DistError", ())) or any(s in str(error) for s in _PEER_GONE)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # updates done in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # loss of each update this invocation made
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor | None]],
    global_targets: torch.Tensor,
    loss_chunk_size: int = 0,
    autocast_dtype: torch.dtype | None = None,
    compiled_loss: bool = False,
) -> torch.Tensor:
    """Forward and backward of every micro-batch of this rank for one step; gradients accumulate in the
    parameters. Returns this rank's part of the global token-mean loss (detached). With `autocast_dtype` the
    forward runs under torch.autocast (backward follows the dtypes the forward chose); `compiled_loss` compiles
    the output layer with its cross-entropy (qwen15.train.loss)."""
    device_type = global_targets.device.type
    total = torch.zeros((), dtype=torch.float32, device=global_targets.device)
    for mb in micro_batches:
        with torch.autocast(device_type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = micro_batch_loss(model, mb, global_targets, loss_chunk_size, compiled_loss)
        loss.backward()
        total += loss.detach()
    return total


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    m = cfg.model
    if m.path is not None:
        config = ModelConfig.from_json_file(Path(m.path) / "config.json")
    elif m.config is not None:
        config = ModelConfig.from_json_file(m.config)
    else:
        config = get_preset(m.preset)
    changes = {k: getattr(m, k) for k in SHAPE_KEYS if getattr(m, k) is not None}
    if changes and m.path is not None:
        raise TrainConfigError(
            f"model.{next(iter(changes))}: shape overrides cannot be combined with model.path (the weights fix "
            "the shape); remove them"
        )
    return config.replace(**changes) if changes else config


class Trainer:
    def __init__(self, cfg: TrainConfig, *, echo=print):
        self.cfg = cfg
        self.env = D.init_distributed(cfg.train.device)
        self._echo = echo
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def log(self, message: str) -> None:
        if self.env.is_main:
            self._echo(message)

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        self.device = env.device
        self.compute_dtype = {
            "auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
        }[cfg.train.dtype]

        self.dataset = TokenDataset(cfg.data.path)
        self.seq_length = self.dataset.seq_length
        if cfg.data.seq_length is not None and cfg.data.seq_length != self.seq_length:
            raise TrainConfigError(
                f"data.seq_length is {cfg.data.seq_length} but {cfg.data.path} was built with seq_length "
                f"{self.seq_length}; preprocess the data again with --seq-length {cfg.data.seq_length}"
            )
        self.model_config = model_config_from(cfg)
        self.layout = self._layout()
        self.mesh = build_mesh(self.layout, env.device.type)
        self.dp_rank, self.dp_size = self.mesh.dp.get_local_rank(), self.mesh.dp.size()
        self.pp_rank = self.mesh["pp"].get_local_rank()
        gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
        self.accumulation = gbs // (self.dp_size * mbs)
        self.sampler = RowSampler(
            len(self.dataset),
            gbs,
            dp_rank=self.dp_rank,
            dp_world=self.dp_size,
            seed=cfg.data.seed,
            shuffle=cfg.data.shuffle,
        )

        if self.seq_length > self.model_config.max_position_embeddings:
            raise TrainConfigError(
                f"the dataset's seq_length {self.seq_length} exceeds the model's max_position_embeddings "
                f"{self.model_config.max_position_embeddings}"
            )
        data_vocab = self.dataset.meta.get("vocab_size")
        if isinstance(data_vocab, int) and data_vocab > self.model_config.vocab_size:
            raise TrainConfigError(
                f"{cfg.data.path}: the tokenizer of the data has {data_vocab} tokens but the model has only "
                f"{self.model_config.vocab_size} embedding rows (model.vocab_size)"
            )
        tokenizer = self._load_tokenizer()
        self.chat = self._is_chat()
        if cfg.checkpoint.resume not in ("auto", "never"):
            resolve_checkpoint(cfg.checkpoint.resume)  # a damaged or missing checkpoint fails before any work

        with torch.device("meta"):
            model = Qwen(self.model_config)
        self.lora = self._add_adapters(model) if cfg.lora.enabled else None
        if self.layout.pp > 1:
            from qwen15.parallel.pipeline import stage_modules

            parts = stage_modules(model, self.layout, self.pp_rank)
        else:
            parts = [model]
        self.document_mask = self._document_mask()
        for part in parts:
            swap = self.document_mask and self.document_backend != "dense"
            if swap:
                apply_document_attention(part, self.document_backend)
            parallelize(
                part,
                self.mesh,
                self.layout,
                compute_dtype=self.compute_dtype,
                activation_checkpointing=cfg.train.activation_checkpointing,
                compile=cfg.train.compile,
            )
            if swap:
                pass_documents_to_blocks(part)  # outside activation checkpointing: recomputation sees them
            part.to_empty(device=self.device)
            part.tie_weights()  # to_empty gives a plain module new Parameter objects; re-tie (FSDP keeps them)
        self.autocast = uses_autocast(parts[0], self.compute_dtype)
        if cfg.model.path is not None:
            self.log(f"loading weights from {cfg.model.path}")
            load_weights(parts, cfg.model.path)
        else:
            init_weights(parts, cfg.model.init_seed)
        if self.lora is not None:
            init_adapters(parts, cfg.lora.init_seed)
            if cfg.lora.base_dtype == "int8":
                quantize_int8(model, embeddings=False)  # the frozen projections; LoRALinears keep adapters
        for part in parts:
            part.train()
        self.parts = parts
        self.model = parts[0]  # the whole model when pp is 1
        self.optimizers = [build_optimizer(part, cfg.optim) for part in parts]
        self.schedule = self._pipeline_schedule() if self.layout.pp > 1 else None

        # Everything above only reads; the run directory is written from here on, under its lock.
        self.locks = self._lock_run_dir()
        self.tokenizer_dir = self._save_tokenizer(tokenizer)
        self.step = 0
        self.tokens_seen = 0
        if self.lora is not None:
            self._seed_dropout(0)
        self.checkpoints = CheckpointManager(
            cfg.checkpoint_dir, cfg.checkpoint.keep, env, trainable_only=self.lora is not None
        )
        self.checkpoints.remove_partial()
        self.resumed_from = self._resume()
        if env.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg.run_dir / "config.yaml", cfg.to_yaml())
        self.metrics = MetricsLogger(
            cfg.run_dir,
            enabled=env.is_main,
            tensorboard=cfg.metrics.tensorboard,
            resume_step=self.step,
            echo=self._echo,
        )
        self.flops_per_token = flops_per_token(
            self.model_config, self.seq_length, weight_gradients=self.lora is None
        )
        self.peak = peak_tflops(self.device, cfg.metrics.peak_tflops)
        n = self.model_config.num_params()
        if self.lora is not None:
            trained = sum(p.numel() for p in adapter_parameters(self.model).values())  # global, also if split
            self.log(
                f"LoRA r {self.lora.r}, alpha {self.lora.alpha:g} on {', '.join(self.lora.target_modules)}: "
                f"{trained / 1e6:,.2f}M adapter parameters ({100 * trained / n:.2f}% of the model) train in "
                f"fp32; the base stays frozen in {self.base_dtype_name}"
            )
        self.log(
            f"{cfg.train.mode}: {n / 1e6:,.1f}M parameters, {env.world_size} process(es) on {self.device.type} "
            f"({describe_layout(self.layout)}), {str(self.compute_dtype).removeprefix('torch.')} compute; "
            f"{gbs} rows x {self.seq_length} tokens per step ({self.accumulation} micro-batch(es) of {mbs} per "
            f"rank); {len(self.dataset):,} rows in {cfg.data.path}; steps {self.step} -> {cfg.train.steps}"
        )
        if self.dataset.doc_ids is not None:
            how = {
                "flex": "FlexAttention block mask",
                "spans": "causal attention over each document's span",
                "dense": "the model's dense document mask",
            }
            self.log(
                f"packed rows: attention kept inside each document ({how[self.document_backend]}), positions "
                "restart per document"
                if self.document_mask
                else "packed rows: attention across documents (train.document_mask false), positions run on"
            )

    def _document_mask(self) -> bool:
        """Whether attention stays inside each document of a packed row (train.document_mask, see its comment)."""
        wanted, recorded = self.cfg.train.document_mask, self.dataset.doc_ids is not None
        if wanted and not recorded:
            raise TrainConfigError(
                f"{self.cfg.where('train.document_mask')}train.document_mask is true but {self.cfg.data.path} "
                "records no document boundaries (no doc_ids.npy: its rows run documents together, as the seed's "
                "pretraining rows do); build packed rows with `qwen15 data preprocess ... --layout pack`, or set "
                "train.document_mask null or false"
            )
        self.document_backend = default_backend(self.device)
        return recorded and wanted is not False

    def _lock_run_dir(self) -> list[RunLock]:
        """Rank 0 takes the lock of the run directory (and of the checkpoint directory when it lies elsewhere)
        for the run's life; every rank learns the outcome, so that all stop with the same message."""
        from qwen15.errors import describe_user_os_error

        cfg, locks, error = self.cfg, [], None
        if self.env.is_main:
            folders = {"train.run_dir": cfg.run_dir}
            if cfg.run_dir.resolve() not in [
                cfg.checkpoint_dir.resolve(),
                *cfg.checkpoint_dir.resolve().parents,
            ]:
                folders["checkpoint.dir"] = cfg.checkpoint_dir
            try:
                for key, folder in folders.items():
                    if folder.exists() and not folder.is_dir():
                        raise TrainConfigError(
                            f"{key} {folder}: is a file, not a folder; choose another {key}"
                        )
                for key, folder in folders.items():
                    try:
                        locks.append(RunLock(folder).acquire())
                    except OSError as e:
                        raise TrainConfigError(f"{key} {folder}: {describe_user_os_error(e) or e}") from None
            except UserError as e:
                for lock in locks:
                    lock.release()
                locks, error = [], (type(e), str(e))
        error = D.broadcast_object(error)
        if error is not None:
            cls, message = error
            raise (cls if issubclass(cls, UserError) else TrainConfigError)(message)
        return locks

    def _add_adapters(self, model: nn.Module):
        """Adapters on the meta model, before any split (so tensor parallel and FSDP2 shard them with their
        projection); the base is frozen in lora.base_dtype (no fp32 master copy, gradients or optimizer state)."""
        lora = self.cfg.lora
        if lora.base_dtype == "int8" and self.env.world_size > 1:
            raise TrainConfigError(
                "lora.base_dtype int8 runs in one process (the int8 base is not sharded); under torchrun use "
                "bfloat16, which FSDP2 shards"
            )
        if lora.base_dtype == "bfloat16" and self.compute_dtype == torch.float32:
            raise TrainConfigError(
                "lora.base_dtype bfloat16 computes in bfloat16: set train.dtype bfloat16 (auto is bfloat16 on a "
                "GPU), or lora.base_dtype auto for an fp32 base"
            )
        spec = lora.spec()
        add_adapters(model, spec, dtype=torch.float32)
        dtype = {"auto": self.compute_dtype, "int8": self.compute_dtype, "bfloat16": torch.bfloat16}.get(
            lora.base_dtype, torch.float32
        )
        self.base_dtype_name = "int8" if lora.base_dtype == "int8" else str(dtype).removeprefix("torch.")
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)  # in place of the data: tied parameters stay one
        return spec

    def _layout(self) -> ParallelLayout:
        """The `parallel` section as a layout checked against this launch and the model (errors name the key)."""
        cfg, world = self.cfg, self.env.world_size
        par = cfg.parallel
        if par.world_size is not None and par.world_size != world:
            self.log(
                f"note: this recipe is laid out for parallel.world_size {par.world_size} processes but "
                f"{world} were started; the layout is checked against {world}"
            )
        layout = par.resolve(world)
        gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
        if gbs % (layout.dp * mbs):
            raise TrainConfigError(
                f"train.global_batch_size {gbs} must be a multiple of data-parallel size {layout.dp} "
                f"(parallel.dp_replicate x parallel.dp_shard) x train.micro_batch_size {mbs}"
            )
        per_rank = gbs // layout.dp
        if layout.pp > 1:
            # One schedule step per update runs this rank's rows as micro-batches of train.micro_batch_size.
            if layout.pp_microbatches is None:
                layout = dataclasses.replace(layout, pp_microbatches=per_rank // mbs)
            elif layout.pp_microbatches * mbs != per_rank:
                raise TrainConfigError(
                    f"parallel.pp_microbatches {layout.pp_microbatches} x train.micro_batch_size {mbs} must equal "
                    f"the rows per data-parallel rank and step (train.global_batch_size {gbs} / data-parallel "
                    f"size {layout.dp} = {per_rank}); set parallel.pp_microbatches to {per_rank // mbs} or null"
                )
        # pp_microbatches means nothing without stages (gradient accumulation follows train.micro_batch_size).
        return layout.validate(world, self.model_config, local_batch_size=per_rank if layout.pp > 1 else None)

    def _pipeline_schedule(self):
        """The schedule of this rank's stages; its loss (last stage) is each micro-batch's cross-entropy sum over
        the unmasked labels of the global batch, set before every step in `self.step_targets`."""
        from qwen15.parallel.pipeline import build_schedule

        self.step_targets = torch.ones((), dtype=torch.float32, device=self.device)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return cross_entropy_sum(logits, labels) / self.step_targets

        return build_schedule(
            self.parts,
            self.layout,
            self.mesh["pp"],
            loss_fn,
            self.device,
            tp_mesh=self.mesh["tp"],
        )

    def _load_tokenizer(self):
        """The run's tokenizer (model.tokenizer, or the model folder's), refusing data tokenized by another."""
        source = self.cfg.model.tokenizer
        if source is None and self.cfg.model.path is not None:
            folder = Path(self.cfg.model.path)
            has_files = any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json"))
            source = self.cfg.model.path if has_files else None
        if source is None:
            self.log(
                "no tokenizer given (model.tokenizer): checkpoints and exports will hold no tokenizer files"
            )
            return None
        from qwen15.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(source)
        expected = self.dataset.meta.get("tokenizer_fingerprint")
        if expected and expected != tokenizer.fingerprint:
            raise DatasetError(
                f"{self.cfg.data.path} was built with another tokenizer (fingerprint {expected}) than {source} "
                f"({tokenizer.fingerprint}); preprocess the data again with the model's tokenizer"
            )
        if len(tokenizer) > self.model_config.vocab_size:
            raise TrainConfigError(
                f"model.tokenizer {source}: {len(tokenizer)} tokens, but the model has only "
                f"{self.model_config.vocab_size} embedding rows (model.vocab_size)"
            )
        return tokenizer

    def _save_tokenizer(self, tokenizer) -> Path | None:
        """Save the run's tokenizer once in the run directory (checkpoints and exports copy it from there)."""
        if tokenizer is None:
            return None
        folder = self.cfg.run_dir / "tokenizer"
        if self.env.is_main:
            tmp = folder.with_name(".tokenizer.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        D.barrier()
        return folder

    def _is_chat(self) -> bool:
        if self.cfg.model.chat is not None:
            return self.cfg.model.chat
        if self.dataset.meta.get("type") in ("chat", "qa"):
            return True
        return IM_END_ID in self.model_config.eos_token_ids  # finetuning a Chat model keeps it one

    def _resume(self) -> Path | None:
        """Pick the checkpoint to resume from (resume auto: the newest intact one; damaged newer ones are named and
        moved to damaged/) and settle the lineage: checkpoints that are not history of what this run continues
        are moved to abandoned/ (qwen15.train.lineage)."""
        cfg = self.cfg
        resume = cfg.checkpoint.resume
        if resume == "never":
            path = None
        elif resume == "auto":
            path = self.checkpoints.latest_intact(self.log)
        else:
            path = resolve_checkpoint(resume, self.log)
        folder = cfg.checkpoint_dir
        existing = complete_checkpoints(folder)
        here = path is not None and path.parent.resolve() == folder.resolve()
        if path is None:
            self.lineage, stale, why = (
                new_lineage(),
                existing,
                "this run starts over (checkpoint.resume never)",
            )
        else:
            parent = lineage_of(read_trainer_state(path))
            if here and path == existing[-1]:
                self.lineage, stale, why = parent, [], ""
            else:
                branch = {"id": parent["id"], "step": step_of(path), "checkpoint": str(path)}
                self.lineage = new_lineage(branch)
                stale = [c for c in existing if step_of(c) > step_of(path)] if here else existing
                why = f"this run continues from {path}, not from the newest checkpoint of {folder}"
        if stale:
            self._abandon(stale, why)
        if path is None:
            return None
        changes = config_changes(path / "train_config.yaml", cfg.to_dict())
        if changes:
            self.log(
                f"note: resuming from {path} with settings that differ from its own: {'; '.join(changes)}"
            )
        saved = ModelConfig.from_json_file(path / "config.json")
        diff = [k for k in SHAPE_KEYS if getattr(saved, k) != getattr(self.model_config, k)]
        if diff:
            raise TrainConfigError(
                f"{path}: the checkpoint's model differs from this run's in {', '.join(diff)}; resume with the "
                "same model, or start a new run directory (--train.run_dir) / --checkpoint.resume never"
            )
        self._check_resume_lora(path, read_trainer_state(path).get("lora"))
        self.log(f"resuming from {path}")
        state = self.checkpoints.load(path, self.parts, self.optimizers, layout=self._layout_dict())
        for optimizer in self.optimizers:  # this run's settings, not the checkpoint's
            for group in optimizer.param_groups:
                group["betas"], group["eps"] = tuple(self.cfg.optim.betas), self.cfg.optim.eps
            set_weight_decay(optimizer, self.cfg.optim.weight_decay)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except DatasetError as e:
            raise DatasetError(f"{path}: {e}") from None
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if self.lora is not None and not state["rng_restored"]:
            self._seed_dropout(self.step)
        saved_layout = state.get("layout")
        if state["world_size"] != self.env.world_size or (
            saved_layout and saved_layout != self._layout_dict()
        ):
            was = f" ({describe_layout(ParallelLayout(**saved_layout))})" if saved_layout else ""
            self.log(
                f"the checkpoint was written by {state['world_size']} process(es){was}, this run has "
                f"{self.env.world_size} ({describe_layout(self.layout)}): weights and optimizer were resharded; "
                f"the data order continues at row {self.sampler.position} of the global order"
            )
        return path

    def _abandon(self, stale: list[Path], why: str) -> None:
        """Move checkpoints of another history out of the listing (rank 0), with a copy of the metrics so far."""
        where = None
        if self.env.is_main:
            where = set_aside(stale, self.cfg.checkpoint_dir, "abandoned")
            metrics = self.cfg.run_dir / "metrics.jsonl"
            if metrics.is_file():
                shutil.copy2(metrics, where / "metrics.jsonl")
            self.log(
                f"WARNING: {why}: moved {len(stale)} checkpoint(s) of the earlier history "
                f"({', '.join(c.name for c in stale)}) and a copy of metrics.jsonl to {where}; `resume: auto` never "
                "picks them up. Delete that folder when you no longer need it."
            )
        D.barrier()

    def _seed_dropout(self, step: int) -> None:
        """The adapters' dropout masks: one random stream per data-parallel rank, the same on the tensor-parallel
        ranks that share its rows (their replicated inputs must get the same mask), reproducible from the seed."""
        torch.manual_seed(self.cfg.lora.init_seed + 1_000_003 * self.dp_rank + 100_003 * step)

    def _check_resume_lora(self, path: Path, saved: dict[str, Any] | None) -> None:
        """A LoRA run resumes only from a LoRA checkpoint with the same adapter shapes, and a full run only
        from a full checkpoint (each holds what the other lacks)."""
        where = "start a new run directory (--train.run_dir) or set --checkpoint.resume never"
        current = self._lora_state()
        if saved is None and current is not None:
            raise TrainConfigError(
                f"{path}: a full-training checkpoint cannot resume a LoRA run (lora.r is set); {where}"
            )
        if saved is not None and current is None:
            raise TrainConfigError(
                f"{path}: a LoRA checkpoint (adapters only) cannot resume full training; set the lora section as "
                f"it was (r {saved['r']}) or {where}"
            )
        if saved is not None:
            for key in ("r", "target_modules"):
                if saved[key] != current[key]:
                    raise TrainConfigError(
                        f"{path}: the checkpoint's adapters have lora.{key} {saved[key]}, this run {current[key]}; "
                        f"resume with the same adapters, or {where}"
                    )
            if saved.get("base") != current["base"]:
                self.log(
                    f"note: the checkpoint's adapters were trained on {saved.get('base')}, this run loads the "
                    f"base from {current['base']}"
                )

    # ------------------------------------------------------------------ one step

    def _check_ids(self, batch: dict[str, torch.Tensor | None]) -> None:
        vocab = self.model_config.vocab_size
        if int(batch["input_ids"].max()) >= vocab:
            raise DatasetError(
                f"{self.cfg.data.path}: token id {int(batch['input_ids'].max())} is beyond the model's "
                f"{vocab} embedding rows; was the data built with another tokenizer?"
            )

    def micro_batches(self, batch: dict[str, torch.Tensor | None]) -> list[dict[str, torch.Tensor | None]]:
        self._check_ids(batch)
        mbs = self.cfg.train.micro_batch_size
        out = []
        for i in range(0, len(batch["input_ids"]), mbs):
            out.append(
                {
                    k: (None if v is None else v[i : i + mbs].to(self.device, non_blocking=True))
                    for k, v in batch.items()
                }
            )
        return out

    def _pipeline_forward_backward(
        self, batch: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global unmasked label count, loss) of one step under the pipeline schedule. Every pipeline rank of a
        data-parallel rank passes the same rows; the loss exists on the last stage and is summed over the
        pipeline ranks (the others contribute 0), so every rank logs the same value."""
        self._check_ids(batch)
        local = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if v is not None}
        targets = D.all_reduce_sum(count_targets(local["labels"]).to(self.device), self.mesh)
        self.step_targets.fill_(max(int(targets), 1))
        kwargs = {"document_ids": local["document_ids"]} if "document_ids" in local else {}
        losses: list[torch.Tensor] = []
        self.schedule.step(local["input_ids"], target=local["labels"], losses=losses, **kwargs)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for value in losses:
            loss += value.detach().float()
        D.all_reduce_sum(loss, self.mesh, "pp")
        return targets, loss

    def train_step(self, batch: dict[str, torch.Tensor | None]) -> dict[str, float]:
        """One optimizer update from this rank's rows of the global batch. Raises TrainingDiverged, leaving the
        weights untouched, when the loss or the gradient norm is not finite."""
        if not self.document_mask:
            batch = {**batch, "document_ids": None}  # attend across documents, positions running on
        if self.schedule is not None:
            targets, local = self._pipeline_forward_backward(batch)
        else:
            micro = self.micro_batches(batch)
            targets = sum(count_targets(mb["labels"]) for mb in micro).to(self.device)
            D.all_reduce_sum(targets, self.mesh)
            local = forward_backward(
                self.model,
                micro,
                targets,
                self.cfg.train.loss_chunk_size,
                autocast_dtype=self.compute_dtype if self.autocast else None,
                compiled_loss=self.cfg.train.compile,
            )
        loss = float(D.all_reduce_sum(local, self.mesh))
        if not math.isfinite(loss):
            self._diverged(f"the loss is {loss}")
        pp_group = self.mesh["pp"].get_group() if self.layout.pp > 1 else None
        grad_norm = clip_grad_norm(self.parts, self.cfg.optim.clip_grad_norm, pp_group)
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm}")
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)
        if int(targets) > 0:
            for optimizer in self.optimizers:
                optimizer.step()
        else:
            self.log(f"step {self.step + 1}: no label carries loss in this global batch; update skipped")
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.cfg.train.global_batch_size * self.seq_length
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "targets": int(targets)}

    def _diverged(self, what: str) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        last = self.checkpoints.latest()
        raise TrainingDiverged(
            f"{what} at step {self.step + 1}; training stopped before applying it. The last good checkpoint is "
            f"{last if last else '(none saved yet)'}. Lower optim.lr or raise optim.warmup_steps, check the data "
            "for corrupt rows, and resume (--checkpoint.resume auto)."
        )

    # ------------------------------------------------------------------ the loop

    def save_checkpoint(self) -> Path:
        state = {
            "world_size": self.env.world_size,
            "dp_size": self.dp_size,
            "layout": self._layout_dict(),
            "sampler": self.sampler.state_dict(),
            "tokens_seen": self.tokens_seen,
            "global_batch_size": self.cfg.train.global_batch_size,
            "seq_length": self.seq_length,
            "dataset": str(self.cfg.data.path),
            "mode": self.cfg.train.mode,
            "chat": self.chat,
            "generation": self._generation_settings(),
            "lineage": self.lineage,
            "lora": self._lora_state(),
        }
        return self.checkpoints.save(
            self.step, self.parts, self.optimizers, state, self._write_checkpoint_files
        )

    def _lora_state(self) -> dict[str, Any] | None:
        """What `qwen15 convert --to peft` and a resume need to know of the adapters (None: full training)."""
        if self.lora is None:
            return None
        spec = self.lora
        return {
            "r": spec.r,
            "alpha": spec.alpha,
            "dropout": spec.dropout,
            "rslora": spec.rslora,
            "target_modules": list(spec.target_modules),
            "base_dtype": self.cfg.lora.base_dtype,
            "base": self.cfg.model.path,
        }

    def _layout_dict(self) -> dict[str, Any]:
        return self.layout.split()

    def _generation_settings(self) -> dict[str, Any]:
        g = self.cfg.generation
        return {
            "do_sample": g.do_sample,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "top_k": g.top_k,
            "repetition_penalty": g.repetition_penalty,
            "max_new_tokens": g.max_new_tokens,
        }

    def _write_checkpoint_files(self, folder: Path) -> None:
        self.model_config.save_json(folder / "config.json")
        atomic_write_text(folder / "train_config.yaml", self.cfg.to_yaml())
        if self.tokenizer_dir is not None:
            for f in self.tokenizer_dir.iterdir():
                shutil.copyfile(f, folder / f.name)

    def run(self) -> TrainResult:
        try:
            return self._run()
        except RuntimeError as e:
            if self.env.world_size == 1 or not _is_peer_loss(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            last = self.checkpoints.latest()
            raise PeerLost(
                f"rank {self.env.rank}: lost contact with other training processes ({first[:200]}); a worker, a "
                f"node or its launcher stopped. The last complete checkpoint is {last or '(none yet)'}; start every "
                "node again to resume from it"
            ) from None

    def _run(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.train.steps
        result = TrainResult(cfg.run_dir, self.step, resumed_from=self.resumed_from)
        timer = StepTimer()
        saved_at = self.step if self.resumed_from else -1
        start = self.step
        end = min(total, cfg.train.stop_at or total)
        if self.step >= end:
            self.log(
                f"nothing to train: the run is at step {self.step} of train.steps {total}"
                + (f" (train.stop_at {cfg.train.stop_at})" if cfg.train.stop_at else "")
                + "; raise --train.steps to continue it, or choose another --train.run_dir for a new run"
            )
        while self.step < end:
            batch = self.dataset.batch(self.sampler.next_batch())
            stats = self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = timer.lap()
            result.losses.append(stats["loss"])
            tokens_per_s = cfg.train.global_batch_size * self.seq_length / dt / self.env.world_size
            mean_dt = timer.mean()
            record = {
                "step": self.step,
                "loss": stats["loss"],
                "lr": stats["lr"],
                "grad_norm": stats["grad_norm"],
                "targets": stats["targets"],
                "tokens_seen": self.tokens_seen,
                "step_s": dt,
                "tokens_per_s_per_device": tokens_per_s,
                "mfu": (self.flops_per_token * tokens_per_s / (self.peak * 1e12)) if self.peak else None,
                "memory_gb": memory_gb(self.device),
                "eta_s": mean_dt * (total - self.step),
                "time": time.time(),
            }
            self.metrics.log(record)
            if self.step % cfg.metrics.log_every == 0 or self.step == total or self.step == start + 1:
                self.metrics.line(record, total)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                result.last_checkpoint = self.save_checkpoint()
                saved_at = self.step
        if (cfg.checkpoint.save_at_end or self.step < total) and saved_at != self.step:
            result.last_checkpoint = self.save_checkpoint()
        result.last_checkpoint = result.last_checkpoint or self.checkpoints.latest()
        result.step = self.step
        if self.env.is_main and cfg.metrics.plot:
            png = plot_loss_curve(read_metrics(self.metrics.path), cfg.run_dir / "loss_curve.png")
            if png is not None:
                self.log(f"loss curve: {png}")
        if result.last_checkpoint is not None:
            self.log(f"checkpoint: {result.last_checkpoint}")
            if self.lora is not None and cfg.lora.export and self.env.is_main:
                from qwen15.train.export import export_peft

                adapter = export_peft(result.last_checkpoint, cfg.run_dir / "adapter", overwrite=True)
                self.log(f"adapter (PEFT format): {adapter}")
        return result

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        for lock in getattr(self, "locks", []):
            lock.release()
        D.teardown(self.env)


def describe_layout(layout: ParallelLayout) -> str:
    """ "dp_shard 2", "dp_shard 2 x tp 2 x pp 2 (1F1B, 4 micro-batches)" ..."""
    dims = [
        f"{k} {getattr(layout, k)}"
        for k in ("dp_replicate", "dp_shard", "tp", "pp")
        if getattr(layout, k) > 1
    ]
    text = " x ".join(dims or ["dp_shard 1"])
    if layout.pp > 1:
        text += f" ({layout.pp_schedule}, {layout.microbatches} micro-batches)"
    return text


def train(cfg: TrainConfig, *, echo=print) -> TrainResult:
    """Run a whole training (this process's part of it); the process group is left as it was found."""
    trainer = Trainer(cfg, echo=echo)
    try:
        return trainer.run()
    finally:
        trainer.close()
