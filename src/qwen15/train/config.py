"""Training configuration: typed sections read from a YAML recipe, `--section.key value` overrides, validation.

A recipe is a YAML mapping of sections (model, data, train, optim, lora, parallel, checkpoint, metrics, generation); each
section is a dataclass below, so the set of keys, their types and their defaults are read from one place. Unknown
keys and values of the wrong type are errors that name the key, and the file and line it came from.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qwen15.errors import UserError
from qwen15.lora.modules import TARGETS, LoRAError, LoRASpec
from qwen15.model_config import CHAT_SAMPLING, SHAPE_KEYS, ModelConfig
from qwen15.parallel.layout import ParallelLayout
from qwen15.paths import utf8_error


class TrainConfigError(UserError):
    """A recipe or override that cannot be used; the message names the key, where it came from, and what to do."""


@dataclass
class _ModelSource:
    preset: str | None = None  # a built-in shape (qwen1.5-7b, tiny ...), for pretraining from random init
    path: str | None = None  # a Hugging Face folder: the weights to finetune (or continue pretraining from)
    config: str | None = None  # a config.json giving the shape, for pretraining from random init
    tokenizer: str | None = None  # tokenizer folder shipped with checkpoints/exports (default: path)
    chat: bool | None = None  # export as a chat model (stops on <|im_end|>); default: when the data is chat
    init_seed: int = 0  # random init of pretraining (the same weights for any number of processes)


# The model section: where the model comes from, and every architecture key of ModelConfig as an optional
# override on top of the preset / config.json (small vocabularies, layer subsets ...).
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [(k, typing.get_type_hints(ModelConfig)[k] | None, field(default=None)) for k in SHAPE_KEYS],
    bases=(_ModelSource,),
)


@dataclass
class DataSection:
    path: str | None = None  # a dataset folder written by `qwen15 data preprocess`
    seq_length: int | None = None  # when set, the dataset must have been built with this length
    shuffle: bool = True
    seed: int = 0  # order of rows; resumable under any number of processes


@dataclass
class TrainSection:
    mode: Literal["pretrain", "finetune"] = "pretrain"
    steps: int = 100  # optimizer updates (the schedule spans these)
    stop_at: int | None = None  # end this invocation after this step (checkpointed); resume continues the run
    global_batch_size: int = 8  # rows per update, over all data-parallel ranks and micro-batches
    micro_batch_size: int = 1  # rows per forward/backward on one rank
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # compute dtype; master weights stay fp32
    # true: recompute each block in backward (memory for time); selective: keep the outputs of the matrix
    # products and attention, recompute only the elementwise ops (norms, rotary, SiLU x up)
    activation_checkpointing: Literal[False, True, "selective"] = False
    # Attention across the documents of a packed row: null = kept inside each document where the dataset records
    # documents (doc_ids.npy, `--layout pack`), positions restarting; true = the same, and a dataset without
    # documents is an error; false = attend across documents with positions running on, as the seed's rows do
    document_mask: bool | None = None
    compile: bool = False  # torch.compile each transformer block, and the output layer with its loss
    loss_chunk_size: int = (
        0  # >0: output projection + cross-entropy this many tokens at a time (long sequences)
    )
    run_dir: str = "runs/train"  # resolved config, metrics, checkpoints and plots go here


@dataclass
class OptimSection:
    lr: float = 1e-6  # peak learning rate
    min_lr: float = 0.0  # the cosine decays to this
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to norms and biases
    clip_grad_norm: float = 1.0  # global L2 norm; 0 disables clipping


@dataclass
class LoRASection:
    """LoRA adapters instead of full finetuning (qwen15.lora): set `r` to train only the adapters."""

    r: int | None = None  # adapter rank; null: no adapters (every weight trains)
    alpha: float = 16.0  # scaling alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # on each adapter's input, in training
    rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))
    # The frozen base weights: auto = the compute dtype (train.dtype); int8 = weight-only int8 (one process).
    base_dtype: Literal["auto", "bfloat16", "float32", "int8"] = "auto"
    init_seed: int = 0  # draws the A matrices (the same adapters for any layout)
    export: bool = True  # write <run_dir>/adapter (PEFT format) from the last checkpoint at the end

    @property
    def enabled(self) -> bool:
        return self.r is not None

    def spec(self) -> LoRASpec:
        return LoRASpec(self.r, self.alpha, self.dropout, self.rslora, tuple(self.target_modules))


@dataclass
class CheckpointSection:
    dir: str | None = None  # default: <run_dir>/checkpoints (must be shared by all nodes)
    every: int = 0  # save every N steps (0: only at the end)
    keep: int = 3  # complete checkpoints kept (oldest removed first)
    resume: str = "auto"  # auto (latest complete checkpoint, if any) | never | a checkpoint folder
    save_at_end: bool = True


@dataclass
class MetricsSection:
    log_every: int = 1
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)
    peak_tflops: float | None = None  # per device, for MFU; looked up for known GPUs when unset


@dataclass
class GenerationSection:
    """Sampling settings written into the exported generation_config.json (chat models)."""

    do_sample: bool = True
    temperature: float = CHAT_SAMPLING["temperature"]
    top_p: float = CHAT_SAMPLING["top_p"]
    top_k: int = CHAT_SAMPLING["top_k"]
    repetition_penalty: float = CHAT_SAMPLING["repetition_penalty"]
    max_new_tokens: int = 512


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoRASection = field(default_factory=LoRASection)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    generation: GenerationSection = field(default_factory=GenerationSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def where(self, key: str) -> str:
        """'recipe.yaml:12: ' or '--optim.lr: ' for a key that was set in a recipe or on the command line."""
        source = getattr(self, "_sources", {}).get(key)
        return f"{source}: " if source else ""

    def validate(self) -> None:
        """Checks that span keys; each message names the keys concerned, and where the first was set."""
        t, o, m = self.train, self.optim, self.model

        def bad(key: str, message: str) -> TrainConfigError:
            return TrainConfigError(f"{self.where(key)}{message}")

        for key, value in (
            ("train.steps", t.steps),
            ("train.global_batch_size", t.global_batch_size),
            ("train.micro_batch_size", t.micro_batch_size),
            ("metrics.log_every", self.metrics.log_every),
            ("checkpoint.keep", self.checkpoint.keep),
        ):
            if value <= 0:
                raise bad(key, f"{key} must be positive, got {value}")
        if t.global_batch_size % t.micro_batch_size:
            raise bad(
                "train.global_batch_size",
                f"train.global_batch_size {t.global_batch_size} is not a multiple of train.micro_batch_size "
                f"{t.micro_batch_size}",
            )
        if t.loss_chunk_size < 0:
            raise bad("train.loss_chunk_size", f"train.loss_chunk_size must be >= 0, got {t.loss_chunk_size}")
        if t.stop_at is not None and not 0 < t.stop_at <= t.steps:
            raise bad(
                "train.stop_at", f"train.stop_at {t.stop_at} must lie between 1 and train.steps {t.steps}"
            )
        if self.checkpoint.every < 0:
            raise bad("checkpoint.every", f"checkpoint.every must be >= 0, got {self.checkpoint.every}")
        if not (o.lr > 0 and math.isfinite(o.lr)):
            raise bad("optim.lr", f"optim.lr must be a positive number, got {o.lr}")
        if not 0 <= o.min_lr <= o.lr:
            raise bad("optim.min_lr", f"optim.min_lr {o.min_lr} must lie between 0 and optim.lr {o.lr}")
        if not 0 <= o.warmup_steps <= t.steps:
            raise bad(
                "optim.warmup_steps",
                f"optim.warmup_steps {o.warmup_steps} must lie between 0 and train.steps {t.steps}",
            )
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise bad("optim.betas", f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        for key, value, ok in (
            ("optim.eps", o.eps, o.eps > 0),
            ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0),
            ("optim.clip_grad_norm", o.clip_grad_norm, o.clip_grad_norm >= 0),
        ):
            if not (ok and math.isfinite(value)):
                raise bad(key, "optim.eps must be > 0; optim.weight_decay and optim.clip_grad_norm >= 0")
        par = self.parallel
        if par.dp_shard == 0 or par.dp_shard < -1:
            raise bad(
                "parallel.dp_shard",
                f"parallel.dp_shard must be -1 (all processes) or >= 1, got {par.dp_shard}",
            )
        for key in ("dp_replicate", "tp", "pp", "pp_microbatches", "pp_stages_per_rank", "world_size"):
            value = getattr(par, key)
            if value is not None and value < 1:
                raise bad(f"parallel.{key}", f"parallel.{key} must be a positive integer, got {value}")
        if par.pp > 1 and t.loss_chunk_size:
            raise bad(
                "train.loss_chunk_size",
                "train.loss_chunk_size works with parallel.pp 1 only (the loss runs inside the last pipeline "
                "stage); set it to 0, and use parallel.tp to split the logits over the vocabulary instead",
            )
        if self.data.path is None:
            raise bad("data.path", "data.path is required: a dataset folder from `qwen15 data preprocess`")
        self._validate_lora()
        if t.mode == "finetune" and m.path is None:
            raise bad("train.mode", "train.mode finetune needs model.path: a Hugging Face model folder")
        sources = [k for k in ("preset", "path", "config") if getattr(m, k) is not None]
        if len(sources) != 1:
            raise bad(
                f"model.{sources[-1]}" if sources else "model",
                "give exactly one of model.preset (random init), model.config (a config.json, random init) or "
                f"model.path (Hugging Face weights); got {', '.join('model.' + s for s in sources) or 'none'}",
            )
        g = self.generation
        for key, ok in (
            ("generation.temperature", g.temperature >= 0),
            ("generation.top_p", 0 < g.top_p <= 1),
            ("generation.top_k", g.top_k >= 0),
            ("generation.repetition_penalty", g.repetition_penalty > 0),
            ("generation.max_new_tokens", g.max_new_tokens >= 1),
        ):
            if not ok:
                raise bad(key, f"{key} is out of range, got {getattr(g, key.partition('.')[2])}")

    def _validate_lora(self) -> None:
        lora = self.lora
        if not lora.enabled:
            changed = [f.name for f in dataclasses.fields(lora) if getattr(lora, f.name) != f.default]
            changed = [k for k in changed if k != "target_modules" or lora.target_modules != list(TARGETS)]
            if changed:
                raise TrainConfigError(
                    f"lora.{changed[0]} is set but lora.r is not: set lora.r (the adapter rank) to train "
                    "adapters, or remove the lora section for full finetuning"
                )
            return
        try:
            lora.spec().validate("lora")
        except LoRAError as e:
            raise TrainConfigError(str(e)) from None
        if self.parallel.pp > 1:
            raise TrainConfigError(
                "lora: adapters train with parallel.dp_shard, dp_replicate and tp; parallel.pp must be 1"
            )


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)
}


# ---------------------------------------------------------------------------------------------- reading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe (or start from the defaults), apply `--section.key value` overrides, validate."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise TrainConfigError(f"--config {path}: is a folder; pass a recipe YAML file")
        if not path.is_file():
            raise TrainConfigError(
                f"--config {path}: no such recipe file (nor a shipped recipe of that name)"
            )
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrainConfigError(str(utf8_error(path, raw, e))) from None
        data, lines = _parse_yaml(text, str(path))
        for section, values in data.items():
            where = f"{path}:{lines.get(section, '?')}"
            if section not in SECTIONS:
                raise TrainConfigError(
                    f"{where}: unknown section {section!r}; sections are {', '.join(SECTIONS)}"
                )
            if values is None:
                continue
            if not isinstance(values, dict):
                raise TrainConfigError(f"{where}: section {section!r} must be a mapping of keys")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value, f"{path}:{lines.get(f'{section}.{key}', '?')}")
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def _parse_yaml(text: str, where: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping in `text`, and the line of each `section` and `section.key` (for messages)."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TrainConfigError(f"{where}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where}: a recipe is a mapping of sections (model:, data:, train: ...)")
    lines: dict[str, int] = {}
    for key_node, value_node in root.value:
        lines[str(key_node.value)] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            for sub_key, _ in value_node.value:
                lines[f"{key_node.value}.{sub_key.value}"] = sub_key.start_mark.line + 1
    return data, lines


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> None:
    """Apply `--section.key value` / `--section.key=value` pairs; values are read as YAML scalars or lists."""
    i = 0
    given: set[str] = set()
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or "." not in arg:
            raise TrainConfigError(f"unexpected argument {arg!r}; overrides look like --optim.lr 1e-5")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise TrainConfigError(f"--{key} needs a value")
            raw = overrides[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key in MODEL_SOURCES and value is not None:  # the command line's model replaces the recipe's
            given.add(key)
            for other in set(MODEL_SOURCES) - given:
                setattr(cfg.model, other.partition(".")[2], None)
        set_value(cfg, key, value, f"--{key}")


MODEL_SOURCES = ("model.preset", "model.path", "model.config")


def set_value(cfg: TrainConfig, dotted: str, value: Any, where: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise TrainConfigError(f"{where}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise TrainConfigError(f"{where}: unknown key {dotted!r}; {section} keys are {', '.join(hints)}")
    setattr(getattr(cfg, section), key, coerce(value, hints[key], dotted, where))
    if not hasattr(cfg, "_sources"):
        cfg._sources = {}  # not a field: never part of to_dict() / the saved config
    cfg._sources[dotted] = where


def _yaml_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """`value` as type `hint`, or an error naming the key. Numbers written as text (YAML reads 1e-5 so) are read."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key, where)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # 1 is not True
            raise TrainConfigError(
                f"{where}: {key} must be one of {', '.join(map(_yaml_text, args))}, got {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise TrainConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TrainConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{where}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(f"{where}: {key} must be a string, got {value!r} (quote it)")
    raise AssertionError(f"unsupported config type {hint}")  # a new field with a type coerce does not know
