"""slimstack's decoder stack for llama / mistral / qwen2 checkpoints.

Embedding -> N x [RMSNorm, attention (RoPE, GQA, static KV cache), RMSNorm, SwiGLU MLP]
-> RMSNorm -> lm_head. Linears are whatever the loader put there (nn.Linear or a packed
SparseLinear); the elementwise pieces (RMSNorm, RoPE, SwiGLU) come from a `Kernels`
bundle: torch references on CPU, fused Triton kernels on CUDA where they pay.

Two entry points drive the cache: `prefill` (a fresh batch of left-padded prompts written
to slots 0..S-1) and `decode` (one token per row at a slot held in a device tensor, so the
step can be captured in a CUDA graph and replayed without touching the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from slimstack.engine.config import EngineConfig
from slimstack.engine.kv_cache import KVCache, LayerCache
from slimstack.engine.rotary import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from slimstack.engine.generate import GenerationResult, Stream
    from slimstack.engine.report import ModelInfo


# ----------------------------------------------------------------------------- kernels
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the HF families compute it: statistics in fp32, scale in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): a residual add and the norm after it."""
    total = x + delta
    return total, rms_norm_reference(total, weight, eps)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotary_to_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
) -> torch.Tensor:
    """Decode: q, k, v [B, 1, H, D]; returns q rotated, writes k rotated and v into the
    caches [B, Hkv, T, D] at `slot` (a device tensor [1])."""
    q, k = rotary_reference(q, k, cos, sin)
    k_cache.index_copy_(2, slot, k.transpose(1, 2))
    v_cache.index_copy_(2, slot, v.transpose(1, 2))
    return q


def decode_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q [B, Hkv, G, D] (the G query heads of each key/value head) over the cache k, v
    [B, Hkv, T, D], mask bool [B, 1, 1, T]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _drop_decoders(model: DecoderModel, incompatible_keys: Any) -> None:
    # A captured graph replays the addresses it saw: derived weight copies are rebuilt and a
    # bitmap layer's values may be resized by a load, so decoders are captured again.
    model._decoders.clear()


@dataclass(frozen=True)
class Kernels:
    """The elementwise pieces of a decoder layer; one implementation per backend."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # (x, delta, weight, eps) -> (x + delta, rms_norm(x + delta))
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # q [B, S, H, D], k [B, S, Hkv, D], cos/sin [B, S, D] -> rotated q, k
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # (q [B, Hkv, G, D], k, v [B, Hkv, T, D], mask [B, 1, 1, T]) -> [B, Hkv, G, D]
    decode_attention: Callable[..., torch.Tensor]
    # decode: (q, k, v [B, 1, H, D], cos, sin, k_cache, v_cache, slot) -> rotated q, with
    # rotated k and v written into the caches at slot
    rotary_to_cache: Callable[..., torch.Tensor]


REFERENCE_KERNELS = Kernels(
    "torch",
    rms_norm_reference,
    add_rms_norm_reference,
    rotary_reference,
    swiglu_reference,
    decode_attention_reference,
    rotary_to_cache_reference,
)


# ----------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps


class Attention(nn.Module):
    """Projections are either fused (`qkv_proj`: one [q; k; v] matmul, one launch, one
    longer weight stream) or separate (`q_proj`, `k_proj`, `v_proj`)."""

    def __init__(
        self,
        config: EngineConfig,
        o_proj: nn.Module,
        q_proj: nn.Module | None = None,
        k_proj: nn.Module | None = None,
        v_proj: nn.Module | None = None,
        qkv_proj: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (qkv_proj is None) == (q_proj is None or k_proj is None or v_proj is None):
            raise ValueError("give either qkv_proj or all of q_proj, k_proj, v_proj")
        self.qkv_proj, self.q_proj, self.k_proj, self.v_proj = qkv_proj, q_proj, k_proj, v_proj
        self.o_proj = o_proj
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        kv = config.num_kv_heads * config.head_dim
        self.split_sizes = (config.num_heads * config.head_dim, kv, kv)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: Kernels
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, S, D], k/v [B, Hkv, S, D] with rotary applied to q and k."""
        q, k, v = self.heads(x)
        q, k = kernels.rotary(q, k, cos, sin)  # on [B, S, H, D]: the fused kernel works in place
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, S, H, D], k/v [B, S, Hkv, D]: views of the projections, no rotary yet."""
        batch, seq, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        return q, k, v

    def prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
        mask: torch.Tensor | None,
        kernels: Kernels,
    ) -> torch.Tensor:
        """Attention of a fresh prompt over itself; its keys/values go to slots 0..S-1.

        `mask` None means plain causal attention (no padding, no window in reach), which
        lets SDPA pick its flash kernel.
        """
        q, k, v = self.project(x, cos, sin, kernels)
        cache.write_prefix(k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # materialise the shared heads: SDPA's masked kernels want equal heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
        slot: torch.Tensor,
        mask: torch.Tensor,
        kernels: Kernels,
    ) -> torch.Tensor:
        """One new token per row written at `slot`, attending over the whole static cache.

        The G query heads that share a key/value head become G "query rows" against that
        head ([B, Hkv, G, D]); with one token the mask [B, 1, 1, T] is the same for all of
        them, so grouped-query attention needs no copy of the cache.
        """
        batch = x.shape[0]
        q, k, v = self.heads(x)
        q = kernels.rotary_to_cache(q, k, v, cos, sin, cache.k, cache.v, slot)
        q = q.transpose(1, 2).reshape(batch, self.num_kv_heads, -1, self.head_dim)
        out = kernels.decode_attention(q, cache.k, cache.v, mask)
        return self.o_proj(out.reshape(batch, 1, -1))


class MLP(nn.Module):
    """SwiGLU; gate and up fused into `gate_up_proj` ([gate; up]) or separate."""

    def __init__(
        self,
        down_proj: nn.Module,
        gate_proj: nn.Module | None = None,
        up_proj: nn.Module | None = None,
        gate_up_proj: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (gate_up_proj is None) == (gate_proj is None or up_proj is None):
            raise ValueError("give either gate_up_proj or both gate_proj and up_proj")
        self.gate_up_proj, self.gate_proj, self.up_proj = gate_up_proj, gate_proj, up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(kernels.swiglu(gate, up))


def add_norm(
    norm: RMSNorm, h: torch.Tensor, delta: torch.Tensor | None, kernels: Kernels
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, norm(h + delta)): each residual add happens inside the norm that follows
    it (one fused kernel); delta None: h is the whole residual (before the first layer)."""
    if delta is None:
        return h, kernels.rms_norm(h, norm.weight, norm.eps)
    return kernels.add_rms_norm(h, delta, norm.weight, norm.eps)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        input_layernorm: RMSNorm,
        self_attn: Attention,
        post_attention_layernorm: RMSNorm,
        mlp: MLP,
    ) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    # A layer's input is `h + delta`: the residual stream and the previous layer's MLP
    # output, not yet added (None before the first layer); it returns its own (h, delta).
    def prefill(self, h, delta, cos, sin, cache, mask, kernels: Kernels):
        h, normed = add_norm(self.input_layernorm, h, delta, kernels)
        attn = self.self_attn.prefill(normed, cos, sin, cache, mask, kernels)
        h, normed = add_norm(self.post_attention_layernorm, h, attn, kernels)
        return h, self.mlp(normed, kernels)

    def decode(self, h, delta, cos, sin, cache, slot, mask, kernels: Kernels):
        h, normed = add_norm(self.input_layernorm, h, delta, kernels)
        attn = self.self_attn.decode(normed, cos, sin, cache, slot, mask, kernels)
        h, normed = add_norm(self.post_attention_layernorm, h, attn, kernels)
        return h, self.mlp(normed, kernels)


# ----------------------------------------------------------------------------- masks
def prefill_mask(pad: torch.Tensor, seq: int, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, S, S]: causal, no padding columns, within the window.

    A padding row may see itself only, so no row is fully masked (SDPA would return NaN,
    and 0 * NaN leaks through the value product of later layers).
    """
    cols = torch.arange(seq, device=pad.device)
    rows = cols[:, None]
    allowed = (cols[None, :] <= rows) & (cols[None, None, :] >= pad[:, None, None])
    if window is not None:
        allowed = allowed & (rows - cols[None, :] < window)
    allowed = allowed | (rows == cols[None, :])
    return allowed[:, None]


def decode_mask(
    pad: torch.Tensor, slot: torch.Tensor, slot_ids: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean [B, 1, 1, T] for the token at `slot` (a device tensor [1])."""
    allowed = (slot_ids[None, :] <= slot) & (slot_ids[None, :] >= pad[:, None])
    if window is not None:
        allowed = allowed & (slot - slot_ids[None, :] < window)
    return allowed[:, None, None]


# ----------------------------------------------------------------------------- model
class DecoderModel(nn.Module):
    """The whole stack. Layers may repeat (an up-scaled model shares their weights); every
    position still has its own cache."""

    def __init__(
        self,
        config: EngineConfig,
        embed_tokens: nn.Embedding,
        layers: Sequence[DecoderLayer],
        norm: RMSNorm,
        lm_head: nn.Module,
    ) -> None:
        super().__init__()
        if len(layers) != config.num_layers:
            raise ValueError(f"{len(layers)} layers for a config of {config.num_layers}")
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = RotaryEmbedding(config)
        self.kernels = REFERENCE_KERNELS
        self.cache: KVCache | None = None
        self.tokenizer: Any = None
        self.eos_token_ids: tuple[int, ...] = config.eos_token_ids  # generation stops on these
        self.source: str | None = None  # the folder it was loaded from
        self.sources: list[str] = []  # what each layer position was loaded as (for info())
        self.huge_page_nbytes = 0  # weight bytes the loader moved into huge pages (CPU)
        self._decoders: dict[str, Any] = {}  # decode runners (CUDA graphs) for the cache
        self.cache_epoch = 0  # bumped whenever a caller (re)claims the cache
        self.register_load_state_dict_post_hook(_drop_decoders)

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ cache
    def setup_cache(self, batch: int, length: int) -> KVCache:
        """A static cache for `batch` rows of up to `length` tokens (reused when it fits).

        Whoever calls this owns the cache until the next call: `cache_epoch` tells a paused
        stream that its cache now holds someone else's sequences."""
        self.cache_epoch += 1
        if length > self.config.context_length:
            raise ValueError(
                f"a cache of {length} tokens exceeds the model's context of "
                f"{self.config.context_length}"
            )
        if self.cache is None or not self.cache.matches(batch, length, self.dtype, self.device):
            self.release_cache()
            cfg = self.config
            self.cache = KVCache(
                cfg.num_layers,
                batch,
                cfg.num_kv_heads,
                length,
                cfg.head_dim,
                self.dtype,
                self.device,
            )
        return self.cache

    def release_cache(self) -> None:
        """Free the cache and everything captured against it."""
        self.cache_epoch += 1
        self._decoders.clear()
        self.cache = None

    def _require_cache(self) -> KVCache:
        if self.cache is None:
            raise RuntimeError("no KV cache: call setup_cache(batch, length) first")
        return self.cache

    # ------------------------------------------------------------------ steps
    def _norm_head(
        self, h: torch.Tensor, delta: torch.Tensor | None, kernels: Kernels
    ) -> torch.Tensor:
        _, normed = add_norm(self.norm, h, delta, kernels)
        return self.lm_head(normed).float()

    @torch.no_grad()
    def prefill(
        self, tokens: torch.Tensor, pad: Sequence[int], all_logits: bool = False
    ) -> torch.Tensor:
        """Run left-padded prompts [B, S] from slot 0; `pad[b]` = padding columns of row b.

        Returns fp32 logits of the last column [B, V] (or of every column, [B, S, V]).
        """
        cache = self._require_cache()
        batch, seq = tokens.shape
        if batch != cache.batch or seq > cache.length:
            raise ValueError(
                f"prefill of {batch} x {seq} tokens does not fit the cache "
                f"({cache.batch} x {cache.length})"
            )
        pad_t = torch.as_tensor(list(pad), dtype=torch.long, device=self.device)
        cache.set_padding(pad_t)
        positions = (torch.arange(seq, device=self.device)[None, :] - pad_t[:, None]).clamp(min=0)
        cos, sin = self.rotary(positions, self.dtype)
        masks = self._prefill_masks(pad_t, seq, any(pad))
        h, delta = self.embed_tokens(tokens), None
        for index, layer in enumerate(self.layers):
            mask = masks[self.config.sliding_windows[index]]
            h, delta = layer.prefill(h, delta, cos, sin, cache.layers[index], mask, self.kernels)
        if not all_logits:
            h, delta = h[:, -1], None if delta is None else delta[:, -1]
        return self._norm_head(h, delta, self.kernels)

    def _prefill_masks(
        self, pad: torch.Tensor, seq: int, padded: bool
    ) -> dict[int | None, torch.Tensor | None]:
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.config.sliding_windows):
            in_reach = window is not None and window < seq
            masks[window] = prefill_mask(pad, seq, window) if padded or in_reach else None
        return masks

    def decode(
        self, tokens: torch.Tensor, slot: torch.Tensor, kernels: Kernels | None = None
    ) -> torch.Tensor:
        """One token per row [B, 1] at `slot` (long tensor [1] on the device) -> logits [B, V].

        Pure device work: no Python branch depends on tensor values, so it can be captured.
        """
        cache = self._require_cache()
        kernels = kernels or self.kernels
        positions = slot[None, :] - cache.pad[:, None]  # [B, 1]
        cos, sin = self.rotary(positions, self.dtype)
        masks = {
            window: decode_mask(cache.pad, slot, cache.slot_ids, window)
            for window in set(self.config.sliding_windows)
        }
        h, delta = self.embed_tokens(tokens), None
        for index, layer in enumerate(self.layers):
            mask = masks[self.config.sliding_windows[index]]
            h, delta = layer.decode(h, delta, cos, sin, cache.layers[index], slot, mask, kernels)
        return self._norm_head(h[:, -1], None if delta is None else delta[:, -1], kernels)

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """fp32 logits [B, S, V] of left-padded `input_ids`, as an HF model's forward gives
        (`attention_mask` 1 for tokens, 0 for left padding). Uses a fresh cache of S slots."""
        input_ids = input_ids.to(self.device)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq > 0, got {input_ids.shape}")
        pad = left_padding(attention_mask, input_ids.shape) if attention_mask is not None else None
        self.setup_cache(input_ids.shape[0], input_ids.shape[1])
        return self.prefill(input_ids, pad or [0] * input_ids.shape[0], all_logits=True)

    # ------------------------------------------------------------------ user API
    def generate(self, prompts: Any, **kwargs: Any) -> GenerationResult | Stream:
        """See `slimstack.engine.generate.generate`."""
        from slimstack.engine.generate import generate

        return generate(self, prompts, **kwargs)

    def info(self) -> ModelInfo:
        """Layers, which linears are sparse and in which format, bytes against dense."""
        from slimstack.engine.report import model_info

        return model_info(self)


def left_padding(attention_mask: torch.Tensor, shape: torch.Size) -> list[int]:
    """Per-row padding counts of a left-padded mask; refuses right padding or holes."""
    mask = attention_mask.to("cpu", torch.long)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(shape)}")
    counts = (mask == 0).sum(dim=1)
    expected = torch.arange(shape[1])[None, :] >= counts[:, None]
    if not torch.equal(mask.bool(), expected):
        raise ValueError("attention_mask must be left padding: zeros first, then ones, per row")
    if bool((counts == shape[1]).any()):
        raise ValueError("attention_mask has a row with no tokens")
    return counts.tolist()
