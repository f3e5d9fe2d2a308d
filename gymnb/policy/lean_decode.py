"""Policy server, decode step: one new token per row through a Llama-shaped model, its K/V written in place.

transformers' forward is general (any cache, any mask, hooks and output capture), and in a decode step of a
small model its generality is most of the cost. `LeanDecoder.step` runs the same submodules on the same
tensors (the layer norms, projection weights, rotary embedding and head of the model itself, so a refit or
a packed weight is seen at once) and does four things differently:
  - the cache: `DynamicCache` appends a step's K/V by `torch.cat`, a copy of the whole cache per layer and
    step; here each layer's K/V live in a buffer with spare columns and a step writes its own column;
  - the mask: one boolean (B, 1, 1, L) view of the batch's padding mask per step, where transformers builds
    its causal-mask machinery each call;
  - the attention: scaled-dot-product on the query heads grouped by their KV head (as transformers' sdpa path
    does for a single query), against the cache as it lies;
  - fewer, larger ops: q/k/v and gate/up each run as one matmul (gymnb.policy.packed_linear.PackedGroup), and
    queries and keys take their rotary embedding in one pass. A step of 16 rows at 60 cached tokens (2
    cores, AVX-512 and AMX) took 61-64 -> 58-59 ms in float32 and 33-42 -> 32-37 ms in bf16 (1.07x and 1.09x,
    medians of 5 alternating rounds), with the same logits.
The math is transformers' sdpa path for a padded batch, op for op: on the same cache the logits are
bit-identical (`tests/test_lean_decode.py`). (With no padded row transformers drops the mask and takes its
other GQA kernel, which rounds differently in the last bits; this step keeps one path.)

Measured on 2 cores, SmolLM2-135M, 16 rows: at 1,000 cached tokens a step takes 136-145 -> 91-93 ms in bf16
and 243-247 -> 192-210 ms in float32 (the copy grows with the context, so long multi-turn rollouts gain
most); at 60 tokens the two are within the machine's noise.

Only plain Llama-shaped decoders qualify (see `supports`); any other model keeps transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gymnb.policy.packed_linear import PackedGroup

# Model types whose decoder layer is exactly: norm, q/k/v projections, rotary, attention, o projection,
# residual, norm, gated MLP, residual (Qwen2 adds biases to q/k/v, which the projections carry).
LLAMA_SHAPED = ("llama", "qwen2")
SPARE_COLUMNS = 64  # columns added when a layer's buffer is full: one copy every 64 steps, not every step


def supports(model) -> str | None:
    """None if `LeanDecoder` can run `model`, else why not (logged; the engine keeps the model's forward)."""
    config = model.config
    if config.model_type not in LLAMA_SHAPED:
        return f"model type {config.model_type!r} is not one of {LLAMA_SHAPED}"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "not a *ForCausalLM with model.rotary_emb and lm_head"
    return None


class LeanDecoder:
    """The decode step of a Llama-shaped model over the engine's left-padded batch (see module docstring)."""

    def __init__(self, model):
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups  # query heads per KV head
        self.scaling = attn.scaling
        self.heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        # Per layer, the projections that read the same input as one matmul each (gymnb.policy.packed_linear).
        self.qkv = [PackedGroup([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in self.layers]
        self.gate_up = [PackedGroup([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]

    def step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, V) for one token per row; appends its K/V to `cache` (a DynamicCache, L columns).

        ids, positions: (B,) the token fed and its position; mask: (B, L + 1), 1 = attend, the last column
        is the new token.
        """
        batch, heads, kv_heads = ids.shape[0], self.heads, self.kv_heads
        hidden = self.embed(ids[:, None])  # (B, 1, E)
        cos, sin = self.rotary(hidden, positions[:, None])  # (B, 1, D)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, 1, 1, D): every head of a row at its position
        attend = mask.bool()[:, None, None, :]  # (B, 1, 1, L + 1)
        layers = zip(self.layers, self.qkv, self.gate_up, cache.layers, strict=True)
        for layer, qkv_proj, gate_up_proj, cache_layer in layers:
            residual = hidden
            qkv = qkv_proj(layer.input_layernorm(hidden)).view(batch, 1, -1, self.head_dim)  # (B, 1, H+2Hk, D)
            # Queries and keys rotate together: the same elementwise ops as the model's rotary, once, not twice.
            qk = rotate(qkv[:, :, :heads + kv_heads], cos, sin)  # (B, 1, H + Hk, D)
            query = qk[:, :, :heads].transpose(1, 2)  # (B, H, 1, D)
            key = qk[:, :, heads:].transpose(1, 2)  # (B, Hk, 1, D)
            value = qkv[:, :, heads + kv_heads:].transpose(1, 2)
            keys, values = append_in_place(cache_layer, key, value)  # (B, Hk, L + 1, D)
            grouped = query.reshape(batch, kv_heads, self.groups, self.head_dim)  # (B, Hk, G, D)
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=attend, scale=self.scaling)
            hidden = residual + layer.self_attn.o_proj(out.reshape(batch, 1, -1))
            gate, up = gate_up_proj(layer.post_attention_layernorm(hidden)).split(gate_up_proj.sizes, dim=-1)
            hidden = hidden + layer.mlp.down_proj(F.silu(gate) * up)
        return self.lm_head(self.norm(hidden))[:, -1, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as Llama and Qwen2 apply it: x * cos + rotate_half(x) * sin, where
    rotate_half swaps the two halves of the head dimension and negates the second (now first) one."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def append_in_place(layer, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one column of K/V (B, Hk, 1, D) after the cache layer's L columns; (keys, values) as views.

    The layer's keys/values stay views of a buffer with spare columns (kept on the layer as `spare`). When
    the engine replaced them (a merge, a removal) or the room ran out, a new buffer is made, SPARE_COLUMNS
    wider, and the columns are copied into it once.
    """
    keys, values = layer.keys, layer.values
    used = keys.shape[2]
    spare = getattr(layer, "spare", None)
    if spare is None or not _is_view_of(keys, spare[0]) or not _is_view_of(values, spare[1]) \
            or used == spare[0].shape[2]:
        shape = (*keys.shape[:2], used + SPARE_COLUMNS, keys.shape[3])
        spare = (keys.new_empty(shape), values.new_empty(shape))
        spare[0][:, :, :used] = keys
        spare[1][:, :, :used] = values
        layer.spare = spare
    spare[0][:, :, used] = key[:, :, 0]
    spare[1][:, :, used] = value[:, :, 0]
    layer.keys, layer.values = spare[0][:, :, :used + 1], spare[1][:, :, :used + 1]
    return layer.keys, layer.values


def _is_view_of(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `tensor` is `buffer[:, :, :n]` for some n (same start, rows, heads and strides)."""
    return (tensor.data_ptr() == buffer.data_ptr() and tensor.shape[:2] == buffer.shape[:2]
            and tensor.stride() == buffer.stride())
