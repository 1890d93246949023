"""`slimstack.load`: an HF folder -> slimstack's decoder stack, sparse linears packed.

The folder may come from slimstack (pruned, depth-sliced, up-scaled) or from anyone else;
it is read layer by layer through the validated `Checkpoint` reader (no pickles), so the
peak memory is the model plus one layer. Every linear of a decoder layer whose weight is
2:4 or unstructured sparse is packed by `slimstack.ops`; dense ones, and lm_head, are
`DenseLinear` (an nn.Linear that takes the native CPU kernel at bf16 decode). Embeddings
and norms stay as they are. On CPU the large weights move into memory advised for huge
pages (`engine.huge_pages`; SLIMSTACK_HUGE_PAGES=0 keeps torch's allocations).

An up-scaled model's slimstack.json records where each layer came from ("layer_map");
layer positions that name the same source layer share one module in memory, but only
after their tensors are checked to be identical in the folder.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimstack.checkpoint import (
    ATTENTION_PROJ,
    MLP_PROJ,
    Checkpoint,
    CheckpointError,
    implied_biases,
    read_metadata,
)
from slimstack.devices import resolve_device
from slimstack.engine import huge_pages
from slimstack.engine.config import EngineConfig
from slimstack.engine.fused import select_kernels
from slimstack.engine.model import MLP, Attention, DecoderLayer, DecoderModel, RMSNorm
from slimstack.formats import is_sparse24, zero_fraction
from slimstack.ops.dense_linear import DenseLinear
from slimstack.ops.sparsify import BITMAP_MIN_ZEROS, sparsify_model

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPARSE_MIN_ZEROS = 0.25  # below this a weight is dense: its layer is not handed to packing


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    pack: bool = True,
    kernels: str = "auto",
    fuse: bool = True,
) -> DecoderModel:
    """Load an HF llama/mistral/qwen2 folder into slimstack's engine.

    device: "cuda" or "cpu" (default: cuda when available). dtype: the compute dtype, a
    torch.dtype or its name (default: bfloat16 on CUDA, float32 on CPU). pack: pack sparse
    linears (False keeps every linear dense, e.g. for a dense baseline of the same weights).
    kernels: "auto", "torch", "triton" (CUDA) or "native" (CPU) for RMSNorm / RoPE /
    SwiGLU / decode attention. fuse: one q/k/v and
    one gate/up projection per layer where the parts are alike (see `build_layer`).
    """
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):  # "bfloat16" or "torch.bfloat16", as a CLI or config says it
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (or their names), "
            f"got {dtype!r}"
        )
    # open() refuses what the engine cannot run: config (engine_config), tensors, shapes
    with Checkpoint.open(path) as ckpt:
        config = ckpt.engine_config()
        sharing = shared_layers(ckpt, read_metadata(ckpt.path))
        layers: list[DecoderLayer] = []
        sources: list[str] = []
        packed_any = False
        for index in range(config.num_layers):
            if index in sharing:
                layers.append(layers[sharing[index]])
                sources.append(f"shared with layer {sharing[index]}")
                continue
            layer = build_layer(ckpt, config, index, device, dtype, fuse)
            if pack:
                packed_any = pack_layer(layer) or packed_any
            layers.append(layer)
            sources.append("loaded")
        embed = nn.Embedding.from_pretrained(
            _tensor(ckpt, "model.embed_tokens.weight", device, dtype), freeze=True
        )
        norm = RMSNorm(_tensor(ckpt, "model.norm.weight", device, dtype), config.rms_norm_eps)
        lm_head = _lm_head(ckpt, config, embed, device, dtype)
    model = DecoderModel(config, embed, layers, norm, lm_head).to(device)
    if device.type == "cpu" and huge_pages.available():
        model.huge_page_nbytes = huge_pages.move_weights(model)
    model.kernels = select_kernels(device, kernels)
    model.source = str(Path(path))
    model.sources = sources
    model.tokenizer = _tokenizer(Path(path))
    model.eos_token_ids = _eos_token_ids(Path(path), config)
    if packed_any:
        # torch runs a custom op's first call through torch._dynamo, imported then (~0.5 s
        # on CPU): paid here, so the first generate's prefill_ms times the prefill alone
        importlib.import_module("torch._dynamo")
    return model.eval()


# ----------------------------------------------------------------------------- layers
def build_layer(
    ckpt: Checkpoint,
    config: EngineConfig,
    index: int,
    device: torch.device,
    dtype: torch.dtype,
    fuse: bool = True,
) -> DecoderLayer:
    """Decoder layer `index` with dense (DenseLinear) projections, weights on `device`.

    fuse: concatenate q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj` when
    the parts are alike (all 2:4, all other-sparse or all dense), so that packing sees
    one weight and a decode step streams one longer matrix instead of several short ones.
    """
    tensors = ckpt.layer_tensors(index)
    bias_of = implied_biases(config)  # Checkpoint.open checked: present exactly when implied

    def parts(module: str, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = f"{module}.{name}"
        weight = tensors[f"{key}.weight"].to(device=device, dtype=dtype)
        bias = tensors[f"{key}.bias"].to(device=device, dtype=dtype) if bias_of[key] else None
        return weight, bias

    def group(module: str, names: tuple[str, ...], fused_name: str) -> dict[str, nn.Linear]:
        loaded = [parts(module, n) for n in names]
        if fuse and len({_sparsity_kind(w) for w, _ in loaded}) == 1:
            weight = torch.cat([w for w, _ in loaded])
            bias = torch.cat([b for _, b in loaded]) if loaded[0][1] is not None else None
            return {fused_name: _linear(weight, bias)}
        return {n: _linear(w, b) for n, (w, b) in zip(names, loaded)}

    def norm(name: str) -> RMSNorm:
        return RMSNorm(
            tensors[f"{name}.weight"].to(device=device, dtype=dtype), config.rms_norm_eps
        )

    attention = Attention(
        config,
        o_proj=_linear(*parts("self_attn", "o_proj")),
        **group("self_attn", ATTENTION_PROJ[:3], "qkv_proj"),
    )
    mlp = MLP(
        down_proj=_linear(*parts("mlp", "down_proj")), **group("mlp", MLP_PROJ[:2], "gate_up_proj")
    )
    return DecoderLayer(norm("input_layernorm"), attention, norm("post_attention_layernorm"), mlp)


def _sparsity_kind(weight: torch.Tensor) -> str:
    """The format ops would pack this weight in: "sparse24", "bitmap" or "dense"."""
    zeros = zero_fraction(weight)
    if zeros < SPARSE_MIN_ZEROS:
        return "dense"
    if is_sparse24(weight):
        return "sparse24"
    return "bitmap" if zeros >= BITMAP_MIN_ZEROS else "dense"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    module = DenseLinear(in_features, out_features, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module


def pack_layer(layer: DecoderLayer) -> bool:
    """Swap the layer's sparse linears for packed SparseLinear modules (ops decides which
    format each weight takes and leaves dense ones alone); whether any was packed."""
    weights = [m.weight for m in layer.modules() if isinstance(m, nn.Linear)]
    if not any(zero_fraction(w) >= SPARSE_MIN_ZEROS for w in weights):
        return False  # a dense layer: nothing to pack
    return bool(sparsify_model(layer, pattern="auto").swapped)


def shared_layers(ckpt: Checkpoint, metadata: dict[str, Any] | None) -> dict[int, int]:
    """Layer position -> earlier position whose module it can share.

    Candidates come from slimstack.json's layer_map (same source model and layer); a
    candidate is accepted only if every tensor of both layers is bit-identical in the
    folder, so a map that no longer matches the weights (fine-tuned after up-scaling) is
    harmless.
    """
    layer_map = _layer_map(metadata or {})
    if not isinstance(layer_map, list) or len(layer_map) != ckpt.num_layers:
        return {}
    first_seen: dict[tuple[str, int], int] = {}
    sharing: dict[int, int] = {}
    for index, entry in enumerate(layer_map):
        if not isinstance(entry, dict) or "layer" not in entry:
            return {}
        key = (str(entry.get("model")), int(entry["layer"]))
        if key in first_seen and _same_layer(ckpt, first_seen[key], index):
            sharing[index] = first_seen[key]
        else:
            first_seen.setdefault(key, index)
    return sharing


def _layer_map(metadata: dict[str, Any]) -> Any:
    """The folder's own layer_map (a sliced or up-scaled copy), else the last one a step
    recorded: pruning after slicing keeps the positions but drops the top-level map, since
    its layers are no longer copies; identical ones (magnitude pruning of repeats) still
    share, as the tensor comparison decides."""
    if "layer_map" in metadata:
        return metadata["layer_map"]
    steps = metadata.get("steps")
    for step in reversed(steps if isinstance(steps, list) else []):
        if isinstance(step, dict) and "layer_map" in step:
            return step["layer_map"]
    return None


def _same_layer(ckpt: Checkpoint, a: int, b: int) -> bool:
    names_a = {n.split(".", 3)[3]: n for n in ckpt.layer_names(a)}
    names_b = {n.split(".", 3)[3]: n for n in ckpt.layer_names(b)}
    if set(names_a) != set(names_b):
        return False
    for short, name_a in names_a.items():
        ta, tb = ckpt.get_tensor(name_a), ckpt.get_tensor(names_b[short])
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            return False
    return True


# ----------------------------------------------------------------------------- the rest
def _tensor(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.path}: missing {name}")
    return ckpt.get_tensor(name).to(device=device, dtype=dtype)


def _lm_head(
    ckpt: Checkpoint,
    config: EngineConfig,
    embed: nn.Embedding,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Linear:
    if config.tie_word_embeddings:
        head = DenseLinear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        head.weight = embed.weight  # one tensor in memory, as transformers ties them
        return head
    if "lm_head.weight" not in ckpt:
        raise CheckpointError(
            f"{ckpt.path}: no lm_head.weight and the config does not tie word embeddings"
        )
    return _linear(_tensor(ckpt, "lm_head.weight", device, dtype), None)


def _eos_token_ids(folder: Path, config: EngineConfig) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list: what transformers' generate
    stops on), else the config's.

    One deliberate difference: transformers stops on nothing when a generation_config.json
    without eos_token_id exists (it does not fall back on config.json); the engine still
    stops at the model's own EOS there.
    """
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            settings = json.loads(gen_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{gen_path}: not valid JSON ({exc})") from None
        if not isinstance(settings, dict):
            raise CheckpointError(f"{gen_path}: not a JSON object")
        value = settings.get("eos_token_id")
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
                raise CheckpointError(
                    f"{gen_path}: eos_token_id must be a token id or a list of them, got {value!r}"
                )
            return tuple(ids)
    return config.eos_token_ids


def _tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none (token-id prompts still work)."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{folder}: its tokenizer files (tokenizer.json / tokenizer.model / "
            f"tokenizer_config.json) do not load: {exc}"
        ) from None
