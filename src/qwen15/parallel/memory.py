"""Per-GPU memory of a training run, from the model shape and the parallel layout (no GPU needed).

Four parts, for the most loaded rank (the pipeline stage with the largest total):
- parameters: what each rank stores. Tensor parallel splits the matrices (and the vocabulary when
  vocab_parallel), not the norms; FSDP2 splits every tensor along dim 0 over dp_shard (rank 0 holds the rounded-up
  share, so the figure is exact for rank 0); pipeline stages hold their layers, the first the embedding, the last
  the final norm and output layer.
- gradients: one per stored parameter element, in the parameter dtype (FSDP2 reduces into fp32 shards).
- optimizer: AdamW's two moments per element in the parameter dtype, plus its step counter per tensor.
- activations: what is kept from the forward for the backward, counted from the model's code (see
  `layer_activation_bytes`), times the micro-batches a stage holds at once under the pipeline schedule; with
  activation checkpointing only the block inputs (a block recomputed in backward is transient).
`transient` is what comes and goes within a step, at its largest: FSDP2's unsharded compute-dtype copies of the
blocks being run (and the root module's) and one block's unsharded gradients, plus the larger of the loss's
backward (two fp32 logits-sized gradients) and, with checkpointing, one block recomputed and its backward.
Two ways of computing in bf16 over fp32 master weights: FSDP2's mixed precision (2+ processes, or TP/PP) casts
the parameters, so activations are bf16; torch.autocast (one process) casts at each matrix product, so the
residual stream and norms stay fp32, each projection keeps its own bf16 copy of its input, and the bf16 copies of
the weights are kept for backward (`autocast=True`).
Checked against a CPU trainer step (tests/test_parallel_memory.py): the live bytes after the forward and the peak
of the step, within 5%. Not counted: the CUDA context and allocator caching (budget 2-4 GiB per GPU),
communication buffers.
A LoRA run (`estimate_lora_memory`) stores the frozen base in its own dtype (bf16, or int8 projections with a
scale per row) with no gradients or optimizer state, and fp32 adapters with fp32 gradients and AdamW moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qwen15.model_config import ModelConfig
from qwen15.parallel.layout import ParallelLayout

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
GIB = 1024**3


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a torch.dtype or a name ("bfloat16", "fp32", ...)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[name]


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the most loaded rank (`pp_rank` is its pipeline rank)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    pp_rank: int = 0
    per_pp_rank: list[int] = field(default_factory=list, repr=False)  # total of each pipeline rank

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.transient

    def gib(self) -> dict[str, float]:
        keys = ("parameters", "gradients", "optimizer", "activations", "transient", "total")
        return {k: round(getattr(self, k) / GIB, 2) for k in keys}


def param_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Every parameter tensor (our names): its shape and the dim tensor parallel splits (None = replicated);
    the embedding and output layer are listed with dim 0 (split only under vocab_parallel)."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    out: dict[str, tuple[tuple[int, ...], int | None]] = {"embed_tokens.weight": ((config.vocab_size, h), 0)}
    for n in range(config.num_hidden_layers):
        p = f"layers.{n}."
        out[p + "input_layernorm.weight"] = ((h,), None)
        out[p + "self_attn.q_proj.weight"] = ((q, h), 0)
        out[p + "self_attn.q_proj.bias"] = ((q,), 0)
        out[p + "self_attn.k_proj.weight"] = ((kv, h), 0)
        out[p + "self_attn.k_proj.bias"] = ((kv,), 0)
        out[p + "self_attn.v_proj.weight"] = ((kv, h), 0)
        out[p + "self_attn.v_proj.bias"] = ((kv,), 0)
        out[p + "self_attn.o_proj.weight"] = ((h, q), 1)
        out[p + "post_attention_layernorm.weight"] = ((h,), None)
        out[p + "mlp.gate_proj.weight"] = ((i, h), 0)
        out[p + "mlp.up_proj.weight"] = ((i, h), 0)
        out[p + "mlp.down_proj.weight"] = ((h, i), 1)
    out["norm.weight"] = ((h,), None)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ((config.vocab_size, h), 0)
    return out


def local_numel(shape: tuple[int, ...], tp_dim: int | None, tp: int, dp_shard: int) -> int:
    """Elements rank 0 stores of one tensor: split over tp along tp_dim, then FSDP2's dim-0 split (rounded up)."""
    dims = list(shape)
    if tp_dim is not None and tp > 1:
        dims[tp_dim] //= tp
    dims[0] = math.ceil(dims[0] / dp_shard)
    return math.prod(dims)


def layer_activation_bytes(
    config: ModelConfig,
    tokens: int,
    compute_bytes: int,
    tp: int = 1,
    sequence_parallel: bool = True,
    activation_checkpointing: bool | str = False,
    autocast: bool = False,
) -> int:
    """Bytes one transformer layer keeps for backward for `tokens` tokens (micro-batch x sequence).

    Counted from the code (qwen15.model) and checked against autograd's saved tensors in tests:
    - each RMSNorm keeps its fp32 input and its normalised output: h x (4 + B), split over the sequence with sp;
    - q/k/v and gate/up keep their input, the full sequence (all-gathered with sp): 2 x h x B;
    - attention (flash/SDPA) keeps rotated q and k, v and its output: (2 x heads + 2 x kv_heads) x head_dim x B / tp
      (rotary's multiplications keep only cos and sin; o_proj's input shares the output's storage);
    - the MLP keeps gate, silu(gate), up and their product: 4 x intermediate x B / tp.
    Under autocast the residual stream and the norms are fp32 (h x 8 per norm) and each of q/k/v/gate/up keeps
    its own bf16 cast of its input (5 x h x B). With activation checkpointing a layer keeps only its input (h x B,
    fp32 under autocast; split with sp). Selective checkpointing ("selective") keeps the input and what its policy
    saves (qwen15.parallel.parallelize): the outputs of q/k/v ((heads + 2 x kv_heads) x head_dim x B / tp), of
    attention (heads x head_dim x B / tp and an fp32 log-sum-exp per head), of gate and up (2 x intermediate x B
    / tp), and of o_proj and down (2 x h x B: before tensor parallel's reduction, the whole sequence); with tp > 1
    also the collectives' outputs (counted as 2 x h x B; measured for tp 1 only).
    """
    b = compute_bytes
    h = config.hidden_size
    seq_split = tp if sequence_parallel else 1
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if activation_checkpointing == "selective":
        kept = h * (4 if autocast else b) / seq_split
        kept += (2 * heads + 2 * kv) * hd * b / tp + heads * 4 / tp
        kept += 2 * config.intermediate_size * b / tp + 2 * h * b + (2 * h * b if tp > 1 else 0)
        return int(tokens * kept)
    if activation_checkpointing:
        return tokens * h * (4 if autocast else b) // seq_split
    norms = 2 * h * (4 + (4 if autocast else b)) / seq_split
    inputs = (5 if autocast else 2) * h * b
    attention = (2 * heads + 2 * kv) * hd * b / tp
    mlp = 4 * config.intermediate_size * b / tp
    return int(tokens * (norms + inputs + attention + mlp))


def block_backward_bytes(
    config: ModelConfig,
    tokens: int,
    compute_bytes: int,
    tp: int = 1,
    sp: bool = True,
    activation_checkpointing: bool | str = False,
    autocast: bool = False,
) -> int:
    """The most one block's backward adds to what is kept: the gradients its MLP's backward writes (gate, up and
    their product: 3 x intermediate), and with activation checkpointing the block's recomputed activations (with
    selective checkpointing those it did not keep)."""
    grads = 3 * tokens * config.intermediate_size * compute_bytes // tp
    if not activation_checkpointing:
        return grads
    whole = layer_activation_bytes(config, tokens, compute_bytes, tp, sp, False, autocast)
    if activation_checkpointing == "selective":
        kept = layer_activation_bytes(config, tokens, compute_bytes, tp, sp, "selective", autocast)
        return grads + max(0, whole - kept)
    return grads + whole


def head_activation_bytes(
    config: ModelConfig,
    tokens: int,
    compute_bytes: int,
    tp: int = 1,
    sequence_parallel: bool = True,
    vocab_parallel: bool = True,
    autocast: bool = False,
) -> int:
    """The last stage's final norm (fp32 under autocast), output-layer input and the loss's fp32 log-softmax over
    its vocabulary slice."""
    h = config.hidden_size
    seq_split = tp if sequence_parallel else 1
    vocab = config.vocab_size // (tp if vocab_parallel else 1)
    norm = h * (4 + (4 if autocast else compute_bytes)) / seq_split
    return int(tokens * (norm + h * compute_bytes + vocab * 4))


def inflight_microbatches(layout: ParallelLayout, pp_rank: int) -> int:
    """Micro-batches (x model chunks, for Interleaved1F1B) whose activations a pipeline rank holds at its peak."""
    m, pp = layout.microbatches, layout.pp
    if pp == 1:
        return 1  # micro-batches run one after the other (gradient accumulation)
    if layout.pp_schedule == "GPipe":
        return m
    if layout.pp_schedule == "1F1B":
        return min(pp - pp_rank, m)
    # Interleaved1F1B, as torch's schedule orders it: warm-up forwards, then one forward before each backward.
    v = layout.stages_per_rank
    per_round = m // max(1, m // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - pp_rank), m * v)
    return warmup + 1


def estimate_memory(
    config: ModelConfig,
    layout: ParallelLayout,
    *,
    micro_batch_size: int,
    seq_len: int,
    param_dtype="float32",
    compute_dtype="bfloat16",
    optimizer: str = "adamw",
    activation_checkpointing: bool | str = False,
    world_size: int | None = None,
    pp_rank: int | None = None,
    loss_chunk_size: int = 0,
    autocast: bool = False,
) -> MemoryEstimate:
    """Per-GPU memory of training `config` under `layout` (see the module docstring for what each part holds).

    The estimate is for the most loaded pipeline rank, or for `pp_rank` when given.
    micro_batch_size: sequences per forward on one data-parallel rank (per pipeline micro-batch with pp > 1).
    param_dtype: dtype of the stored parameters, gradients and optimizer state (fp32 master weights with FSDP2
    mixed precision); compute_dtype: dtype of activations and of the unsharded copies used in compute.
    loss_chunk_size: the training loss's chunking (qwen15.train.loss, pp 1): only one chunk's logits exist at a
    time, recomputed in backward, so the last stage keeps its hidden states instead of the fp32 softmax.
    autocast: compute_dtype by torch.autocast over param_dtype parameters (the trainer on one process) instead of
    FSDP2's mixed precision (see the module docstring).
    """
    from qwen15.parallel.pipeline import stage_indices, stage_ranges

    if world_size is not None or layout.dp_shard == -1:
        layout = layout.validate(world_size if world_size is not None else layout.num_ranks(), config)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    pbytes, cbytes = dtype_bytes(param_dtype), dtype_bytes(compute_dtype)
    tp, dp_shard = layout.tp, layout.dp_shard
    sp = layout.sequence_parallel and tp > 1
    shapes = param_shapes(config)
    tokens = micro_batch_size * seq_len
    ranges = stage_ranges(config, layout) if layout.pp > 1 else [range(config.num_hidden_layers)]
    last_stage = len(ranges) - 1
    per_layer_act = layer_activation_bytes(config, tokens, cbytes, tp, sp, activation_checkpointing, autocast)
    # cos and sin, shared by the layers of a stage (fp32 under autocast: they take the embedding's dtype)
    rotary = 2 * tokens * config.head_dim * (4 if autocast else cbytes)

    def tensor_numel(name: str, *, unsharded: bool = False) -> int:
        shape, tp_dim = shapes[name]
        if tp_dim is not None and name.startswith(("embed_tokens", "lm_head")) and not layout.vocab_parallel:
            tp_dim = None
        return local_numel(shape, tp_dim, tp, 1 if unsharded else dp_shard)

    block_names = [n for n in shapes if n.startswith("layers.0.")]
    block_numel_unsharded = sum(tensor_numel(n, unsharded=True) for n in block_names)
    results = []
    for rank in range(layout.pp):
        stages = stage_indices(layout, rank) if layout.pp > 1 else [0]
        names = []
        for s in stages:
            names += [n for n in shapes if n.startswith("layers.") and int(n.split(".")[1]) in ranges[s]]
            if s == 0:
                names.append("embed_tokens.weight")
            if s == last_stage:
                names += ["norm.weight"] + (["lm_head.weight"] if "lm_head.weight" in shapes else [])
        numel = sum(tensor_numel(n) for n in names)
        params = numel * pbytes
        states = OPTIMIZERS[optimizer]
        optim = numel * states * pbytes + (len(names) * 4 if optimizer in ("adamw", "adam") else 0)

        chunk_layers = max(len(ranges[s]) for s in stages)
        held = inflight_microbatches(layout, rank)
        acts = held * (chunk_layers * per_layer_act + rotary)
        if autocast:  # the bf16 casts of the weights, kept for backward (also with checkpointing)
            matrices = [n for n in names if n.endswith("proj.weight") or n == "lm_head.weight"]
            if "embed_tokens.weight" in names and config.tie_word_embeddings and last_stage in stages:
                matrices.append("embed_tokens.weight")  # the tied output layer's cast
            acts += sum(tensor_numel(n, unsharded=True) for n in matrices) * cbytes
        holds_head = last_stage in stages
        head_tokens = min(tokens, loss_chunk_size) if loss_chunk_size else tokens
        vocab = config.vocab_size // (tp if layout.vocab_parallel else 1)
        head_acts = 0
        if holds_head:
            head_acts = head_activation_bytes(config, tokens, cbytes, tp, sp, layout.vocab_parallel, autocast)
            if loss_chunk_size:  # the softmax of one chunk only (the hidden states are already counted)
                head_acts -= (tokens - head_tokens) * vocab * 4
            acts += head_acts

        # The step's largest passing need, in one of two phases of the backward: the loss's (the incoming and
        # outgoing fp32 gradients of its log-softmax, beside the saved one), or a block's, by when the head's saved
        # tensors are gone (FSDP2 then also holds that block's unsharded gradients, in compute dtype and in fp32
        # for the reduce-scatter). Throughout, FSDP2 holds this block and the prefetched next one unsharded in
        # compute dtype, and the root module (embedding / output layer), which is not resharded after forward.
        fsdp = layout.dp > 1 or (
            cbytes != pbytes and (tp > 1 or layout.pp > 1)
        )  # as train.parallelize applies it
        loss_backward = head_tokens * vocab * 8 if holds_head else 0
        block = block_backward_bytes(config, tokens, cbytes, tp, sp, activation_checkpointing, autocast)
        block = max(0, block - head_acts) + (block_numel_unsharded * (cbytes + 4) if fsdp else 0)
        transient = max(loss_backward, block)
        if fsdp:
            root = [n for n in names if not n.startswith("layers.")]
            transient += 2 * block_numel_unsharded * cbytes
            transient += sum(tensor_numel(n, unsharded=True) for n in root) * cbytes
        results.append(MemoryEstimate(params, params, optim, acts, transient, rank))
    chosen = results[pp_rank] if pp_rank is not None else max(results, key=lambda r: r.total)
    chosen.per_pp_rank = [r.total for r in results]
    return chosen


def adapter_shapes(config: ModelConfig, spec) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Every adapter matrix of a qwen15.lora.LoRASpec (our names): its shape and the dim tensor parallel splits,
    as qwen15.parallel.tensor_parallel splits them (column-parallel: A whole, B by rows; row-parallel: A by
    columns, B whole)."""
    shapes = param_shapes(config)
    out: dict[str, tuple[tuple[int, ...], int | None]] = {}
    for n in range(config.num_hidden_layers):
        for target in spec.target_modules:
            part = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"layers.{n}.{part}.{target}"
            (n_out, n_in), tp_dim = shapes[name + ".weight"]
            column = tp_dim == 0
            out[name + ".lora_A.weight"] = ((spec.r, n_in), None if column else 1)
            out[name + ".lora_B.weight"] = ((n_out, spec.r), 0 if column else None)
    return out


def lora_layer_activation_bytes(
    config: ModelConfig,
    spec,
    tokens: int,
    compute_bytes: int,
    tp: int = 1,
    sequence_parallel: bool = True,
    activation_checkpointing: bool | str = False,
    mask_bytes: int = 1,
    first: bool = False,
) -> int:
    """Bytes one transformer layer with adapters (a qwen15.lora.LoRASpec) keeps for backward, counted from the
    code like `layer_activation_bytes` and checked against autograd's saved tensors in tests. A frozen weight
    needs no input for its own gradient, so what stays is what the adapters and the data path need:
    - each RMSNorm its fp32 input (the normalised output is kept only as an adapted projection's input);
    - attention and the MLP's gate, silu(gate) and up as in full training; their product (down's input) and the
      input of q/k/v and of gate/up once each when an adapter without dropout reads it;
    - with dropout, each adapter its dropout's output and mask (`mask_bytes` per element: 1 for CUDA's boolean
      mask, the compute dtype's size on CPU), instead of the shared input;
    - each adapter A's output for B's gradient (r per token, whole on every tensor-parallel rank).
    `first`: the first layer, where nothing before trains: its input norm and the dropout of q/k/v keep nothing.
    With activation checkpointing a layer keeps only its input; with selective checkpointing what full training's
    policy keeps (`layer_activation_bytes`) and each adapter A's output (an estimate, not measured)."""
    b, h, i = compute_bytes, config.hidden_size, config.intermediate_size
    seq_split = tp if sequence_parallel else 1
    if activation_checkpointing == "selective":
        kept = layer_activation_bytes(config, tokens, b, tp, sequence_parallel, "selective")
        return kept + tokens * len(spec.target_modules) * spec.r * b
    if activation_checkpointing:
        return tokens * h * b // seq_split
    targets = set(spec.target_modules)
    drop = spec.dropout > 0
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_token = (1 if first else 2) * h * 4 / seq_split
    per_token += (2 * heads + 2 * kv) * hd * b / tp + 3 * i * b / tp  # attention; gate, silu(gate), up
    for group, width in ((("q_proj", "k_proj", "v_proj"), h), (("gate_proj", "up_proj"), h)):
        adapted = targets.intersection(group)
        if adapted and not drop:
            per_token += width * b
        elif adapted:
            masks = 0 if first and group[0] == "q_proj" else mask_bytes
            per_token += len(adapted) * width * (b + masks)
    if "o_proj" in targets and drop:
        per_token += heads * hd * (b + mask_bytes) / tp
    if "down_proj" in targets:
        per_token += i * (b + (mask_bytes if drop else 0)) / tp
    per_token += len(targets) * spec.r * b
    return int(tokens * per_token)


def estimate_lora_memory(
    config: ModelConfig,
    layout: ParallelLayout,
    spec,
    *,
    micro_batch_size: int,
    seq_len: int,
    base_dtype: str = "bfloat16",
    compute_dtype: str = "bfloat16",
    activation_checkpointing: bool | str = False,
    world_size: int | None = None,
    loss_chunk_size: int = 0,
    mask_bytes: int = 1,
) -> MemoryEstimate:
    """Per-GPU memory of LoRA training (`spec`, a qwen15.lora.LoRASpec; parallel.pp 1). base_dtype: bfloat16 or
    float32 for the frozen weights, or int8 (the block projections int8 with an fp32 scale per row; the
    embedding, norms and output layer in the compute dtype). Adapters, their gradients and AdamW's moments are
    fp32. Transient as for full training under FSDP2 (unsharded blocks and adapter gradients), plus
    one dequantized projection at a time with an int8 base. mask_bytes: see lora_layer_activation_bytes. The loss
    is the autograd (or compiled, as in the recipes) one; an uncompiled one-process run uses
    qwen15.train.loss.frozen_output_loss, which keeps less (the hidden states' gradient, not the softmax)."""
    if world_size is not None or layout.dp_shard == -1:
        layout = layout.validate(world_size if world_size is not None else layout.num_ranks(), config)
    if layout.pp != 1:
        raise ValueError("LoRA training runs with parallel.pp 1")
    cbytes = dtype_bytes(compute_dtype)
    int8 = base_dtype == "int8"
    base_bytes = cbytes if int8 else dtype_bytes(base_dtype)
    tp, dp_shard = layout.tp, layout.dp_shard
    sp = layout.sequence_parallel and tp > 1
    if int8 and layout.num_ranks() > 1:
        raise ValueError("an int8 base runs in one process (it is not sharded)")
    base, adapters = param_shapes(config), adapter_shapes(config, spec)

    def numel(shapes, name: str, *, unsharded: bool = False) -> int:
        shape, tp_dim = shapes[name]
        if tp_dim is not None and name.startswith(("embed_tokens", "lm_head")) and not layout.vocab_parallel:
            tp_dim = None
        return local_numel(shape, tp_dim, tp, 1 if unsharded else dp_shard)

    def projection(name: str) -> bool:
        return name.startswith("layers.") and name.endswith("_proj.weight")

    params = 0
    for name in base:
        if int8 and projection(name):
            rows = base[name][0][0] // (tp if base[name][1] == 0 else 1)
            params += numel(base, name) + rows * 4  # int8 weight and its fp32 scales
        else:
            params += numel(base, name) * base_bytes
    adapter_numel = sum(numel(adapters, n) for n in adapters)
    params += adapter_numel * 4
    gradients = adapter_numel * 4
    optimizer = adapter_numel * 8 + len(adapters) * 4  # two fp32 moments, and a step counter per tensor

    tokens = micro_batch_size * seq_len

    def layer(first: bool, checkpointed: bool) -> int:
        return lora_layer_activation_bytes(
            config, spec, tokens, cbytes, tp, sp, checkpointed, mask_bytes, first
        )

    rotary = 2 * tokens * config.head_dim * cbytes
    activations = layer(True, activation_checkpointing) + (config.num_hidden_layers - 1) * layer(
        False, activation_checkpointing
    )
    activations += rotary
    if activation_checkpointing:
        activations += layer(False, False)  # one block recomputed in backward
    # The last norm's fp32 input and the loss's fp32 softmax (no output-layer input: it is frozen); chunked, the
    # hidden states instead of the whole softmax (each chunk is recomputed in backward).
    vocab = config.vocab_size // (tp if layout.vocab_parallel else 1)
    head_tokens = min(tokens, loss_chunk_size) if loss_chunk_size else tokens
    h = config.hidden_size
    activations += int(tokens * h * 4 / (tp if sp else 1)) + head_tokens * vocab * 4
    if loss_chunk_size:
        activations += tokens * h * cbytes

    transient = head_tokens * vocab * (cbytes + 4)  # logits, and the loss's fp32 shifted copy
    if layout.dp > 1 or (cbytes != 4 and tp > 1):  # FSDP2 is applied (qwen15.parallel.parallelize)
        block = [n for n in base if n.startswith("layers.0.")]
        block_adapters = [n for n in adapters if n.startswith("layers.0.")]
        unsharded = sum(numel(base, n, unsharded=True) for n in block)
        unsharded += sum(numel(adapters, n, unsharded=True) for n in block_adapters)
        grads = sum(numel(adapters, n, unsharded=True) for n in block_adapters)
        root = sum(numel(base, n, unsharded=True) for n in base if not n.startswith("layers."))
        transient += (2 * unsharded + grads + root) * cbytes
    if int8:
        transient += max(numel(base, n, unsharded=True) for n in base if projection(n)) * cbytes
    estimate = MemoryEstimate(params, gradients, optimizer, activations, transient)
    estimate.per_pp_rank = [estimate.total]
    return estimate


GPU_GIB = 80 * 1e9 / GIB  # an "80 GB" GPU (H100/A100 80GB): 74.5 GiB
RESERVED_GIB = 4.0  # CUDA context, allocator caching and communication buffers, not modelled above


def recipe_memory(
    cfg, model_config: ModelConfig, world_size: int, seq_len: int | None = None
) -> MemoryEstimate:
    """The per-GPU estimate of a training recipe (a qwen15.train.config.TrainConfig) on `world_size` GPUs, with
    the layout resolved as the trainer resolves it (pp_microbatches from the batch when unset), bf16 compute on
    GPUs (a LoRA recipe's base in lora.base_dtype, auto = bf16). seq_len: the dataset's row length when the
    recipe does not fix it (data.seq_length)."""
    import dataclasses

    seq_len = cfg.data.seq_length or seq_len
    if seq_len is None:
        raise ValueError("the recipe sets no data.seq_length: pass the dataset's row length as seq_len")

    layout = cfg.parallel.resolve(world_size)
    t = cfg.train
    per_rank = t.global_batch_size // layout.dp
    if layout.pp > 1 and layout.pp_microbatches is None:
        layout = dataclasses.replace(layout, pp_microbatches=per_rank // t.micro_batch_size)
    layout = layout.validate(world_size, model_config, local_batch_size=per_rank)
    if cfg.lora.enabled:
        base = "bfloat16" if cfg.lora.base_dtype == "auto" else cfg.lora.base_dtype
        return estimate_lora_memory(
            model_config,
            layout,
            cfg.lora.spec(),
            micro_batch_size=t.micro_batch_size,
            seq_len=seq_len,
            base_dtype=base,
            activation_checkpointing=t.activation_checkpointing,
            loss_chunk_size=t.loss_chunk_size,
        )
    # One process trains the plain module under autocast; FSDP2 (mixed precision) otherwise (train.parallelize).
    single = layout.dp == 1 and layout.tp == 1 and layout.pp == 1
    return estimate_memory(
        model_config,
        layout,
        micro_batch_size=t.micro_batch_size,
        seq_len=seq_len,
        param_dtype="float32",
        compute_dtype="bfloat16",
        activation_checkpointing=t.activation_checkpointing,
        loss_chunk_size=t.loss_chunk_size,
        autocast=single,
    )
