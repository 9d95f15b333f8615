"""The Qwen1.5 decoder: embedding, pre-norm blocks (q/k/v-biased GQA attention with NeoX RoPE, SwiGLU), output.

Parity with transformers' Qwen2ForCausalLM decides every numerical detail here (RMSNorm in fp32, rotary angles in
fp32, softmax in fp32 inside SDPA). Parameter names follow the Hugging Face layout without the "model." prefix, so
the checkpoint adapter is a prefix rename. No parallelism code lives here: tensor, pipeline and data parallelism
are applied from outside (qwen15.parallel.parallelize). Shapes are read from the tensors (`view(..., -1, head_dim)`),
so a tensor-parallel shard of a projection works unchanged; stages of a pipeline may set `embed_tokens`, `norm`
or `lm_head` to None and delete layers (kept in a ModuleDict so the remaining names stay those of the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen15.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin [batch, seq, head_dim] of NeoX rotary embeddings; angles in fp32, then cast (as the reference)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos, sin [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values per layer, [batch, kv_heads, max_len, head_dim] each.

    Buffers are created on first use with the shape, dtype and device of the keys written (so a tensor-parallel
    shard gets a cache of its local heads), or up front with `allocate`. Writes go to the slots named by
    `cache_positions`: [seq] shared by every row of the batch, or [batch, seq] for rows at different lengths.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int):
        self.batch_size = batch_size
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def allocate(
        self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        shape = (self.batch_size, kv_heads, self.max_len, head_dim)
        for i in range(len(self.k)):
            self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
        return self

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            shape = (self.batch_size, k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        kc, vc = self.k[layer], self.v[layer]
        if slots.dim() == 1:
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
        else:
            rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
            kc[rows, :, slots] = k.transpose(1, 2)
            vc[rows, :, slots] = v.transpose(1, 2)
        return kc, vc

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@dataclass
class AttentionInputs:
    """What every block's attention needs besides the hidden states; computed once per forward.

    cos, sin [batch, seq, head_dim]: rotary embeddings of the positions. mask: boolean SDPA mask, or None for plain
    causal attention. kv_cache, cache_positions [seq] or [batch, seq]: decoding with a cache (the new keys go to
    these slots); key_len: attention reads only the first key_len slots of the cache.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    kv_cache: KVCache | None = None
    cache_positions: torch.Tensor | None = None
    key_len: int | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(h, kv, bias=True)
        self.v_proj = nn.Linear(h, kv, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, h, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [batch, seq, heads x head_dim] of the hidden states."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotated_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries and keys with the rotary embedding applied, and values: [batch, heads, seq, head_dim] each."""
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.rotated_heads(x, inputs.cos, inputs.sin)
        if inputs.kv_cache is not None:
            k, v = inputs.kv_cache.update(self.layer_idx, inputs.cache_positions, k, v)
            if inputs.key_len is not None:
                k, v = k[:, :, : inputs.key_len], v[:, :, : inputs.key_len]
        mask = inputs.mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where the document id changes along each row."""
    b, s = document_ids.shape
    idx = torch.arange(s, device=document_ids.device).expand(b, s)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def attention_mask(
    query_slots: torch.Tensor,
    key_len: int,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean SDPA mask [batch or 1, 1, queries, keys]: causal over slots, minus padded keys and other documents.
    query_slots: [queries] shared by the batch, or [batch, queries] when rows sit at different lengths.

    Every query keeps its own slot so that no row is fully masked (a fully masked row gives NaN, which would reach
    real tokens through the cache of padded positions).
    """
    key_slots = torch.arange(key_len, device=query_slots.device)
    queries = query_slots[..., :, None]
    causal, own = key_slots <= queries, key_slots == queries  # [(batch,) queries, keys]
    lead = (None, None) if query_slots.dim() == 1 else (slice(None), None)
    mask = causal[lead]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :key_len].bool()
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask | own[lead]


class Qwen(nn.Module):
    """Qwen1.5 causal language model. `Qwen(config)` builds it; `Qwen.from_pretrained(folder)` loads a checkpoint."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens: nn.Embedding | None = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_hidden_layers)})
        self.norm: RMSNorm | None = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config: dict | None = None  # generation_config.json of the checkpoint, when loaded
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """The reference initialisation: normal(0, std) weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only) for token ids [batch, seq].

        position_ids [batch, seq]: explicit positions; by default 0.. (restarting at each document when
            document_ids is given, continuing from cache_positions with a cache).
        document_ids [batch, seq]: packed documents; a token attends only to earlier tokens of its own document.
        kv_cache, cache_positions [seq] or [batch, seq]: decode with a cache; the new keys go to these slots and
            each query attends to every slot up to its own.
        key_padding_mask [batch, key_len] (bool): False marks cache slots to ignore (left padding); with a cache,
            attention reads only the first key_len slots.
        return_hidden: return the final hidden states (after the last norm, when present) instead of logits.
        """
        if self.embed_tokens is not None:
            x = self.embed_tokens(input_ids)
        else:
            x = input_ids  # a pipeline stage after the first receives hidden states
        b, s = x.shape[:2]
        if kv_cache is not None:
            if document_ids is not None:
                raise ValueError("document_ids cannot be combined with a KV cache")
            if cache_positions is None:
                raise ValueError("cache_positions is required with a KV cache")
            if position_ids is None:
                position_ids = cache_positions.expand(b, s)
            key_len = key_padding_mask.shape[1] if key_padding_mask is not None else kv_cache.max_len
            mask = attention_mask(cache_positions, key_len, key_padding_mask)
        else:
            key_len = None
            if position_ids is None:
                if document_ids is not None:
                    position_ids = positions_from_documents(document_ids)
                else:
                    position_ids = torch.arange(s, device=x.device)[None, :].expand(b, s)
            if document_ids is None and key_padding_mask is None:
                mask = None  # plain causal: lets SDPA pick its fastest kernel
            else:
                mask = attention_mask(torch.arange(s, device=x.device), s, key_padding_mask, document_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        inputs = AttentionInputs(cos, sin, mask, kv_cache, cache_positions, key_len)
        for layer in self.layers.values():
            x = layer(x, inputs)
        if self.norm is not None:
            x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        if return_hidden or self.lm_head is None:
            return x
        return self.lm_head(x)

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ) -> Qwen:
        """A randomly initialised model (the reference initialisation), built directly on `device`."""
        with torch.device(device):
            model = cls(config)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=generator)
        return model.to(dtype)

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> Qwen:
        """Load a Hugging Face Qwen1.5 folder (config.json + safetensors) in eval mode; see qwen15.hf_checkpoint.
        For fast generation pass the model through qwen15.prepare_for_inference."""
        from qwen15.hf_checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(
        self,
        path: str,
        *,
        tokenizer=None,
        max_shard_size: int | str = "5GB",
        generation_config: dict | None = None,
        overwrite: bool = True,
    ) -> None:
        """Write a Hugging Face folder that transformers loads unchanged; see qwen15.hf_checkpoint (an existing
        folder is replaced only when qwen15 wrote it)."""
        from qwen15.hf_checkpoint import save_pretrained

        save_pretrained(
            self,
            path,
            tokenizer=tokenizer,
            max_shard_size=max_shard_size,
            generation_config=generation_config,
            overwrite=overwrite,
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
