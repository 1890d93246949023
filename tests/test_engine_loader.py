"""Loading pruned, depth-sliced and up-scaled folders; model.info(); loader errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_support import (  # noqa: F401  (single_thread is an autouse fixture)
    PROMPT,
    hf_greedy,
    hf_model,
    single_thread,
    write_tiny_model,
)

from slimstack.checkpoint import Checkpoint, CheckpointError
from slimstack.checkpoint_writer import CheckpointWriter
from slimstack.engine.loader import load


def sliced(source: Path, out: Path, **how) -> Path:
    """A copy made with slimstack's own depth tool (drop=..., keep=... with repeats)."""
    from slimstack.depth.slicing import slice_model

    slice_model(source, out, progress=False, **how)
    return out


def _greedy_matches_transformers(folder: Path, new_tokens: int = 50):
    engine = load(folder, device="cpu")
    prompt = engine.tokenizer(PROMPT)["input_ids"]
    result = engine.generate(PROMPT, max_new_tokens=new_tokens)
    assert result.tokens == hf_greedy(hf_model(folder), [prompt], new_tokens)[0]
    return engine, result


def test_depth_sliced_copy_runs_only_its_layers(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = sliced(stories260k_dir, tmp_path / "sliced", drop="2,4")
    engine, result = _greedy_matches_transformers(folder)
    assert len(engine.layers) == 3
    assert engine.info().num_layers == 3
    full = load(stories260k_dir, device="cpu").generate(PROMPT, max_new_tokens=50)
    assert result.tokens != full.tokens  # dropping layers changed the model


def test_upscaled_copy_shares_identical_repeated_layers(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    folder = sliced(stories260k_dir, tmp_path / "up", keep="0,1,2,2,3,4")
    engine, _ = _greedy_matches_transformers(folder, new_tokens=30)
    assert engine.layers[3] is engine.layers[2]
    info = engine.info()
    assert info.num_layers == 6 and info.unique_layers == 5 and info.shared == {3: 2}
    assert len(info.linears) == 5 * 4  # a shared layer's weights are counted once


def test_an_upscaled_copy_pruned_by_magnitude_still_shares(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    """Magnitude pruning keeps identical repeated layers identical: the output keeps the
    source's layer map, and the engine still runs the repeat on one packed module."""
    from slimstack.prune.driver import prune

    folder = sliced(stories260k_dir, tmp_path / "up", keep="0,1,2,2,3,4")
    pruned = tmp_path / "up-24"
    prune(folder, pruned, method="magnitude", sparsity="2:4", progress=False)
    engine = load(pruned, device="cpu")
    assert engine.layers[3] is engine.layers[2] and engine.info().shared == {3: 2}


def test_layer_map_is_not_trusted_when_tensors_differ(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    folder = sliced(stories260k_dir, tmp_path / "up", keep="0,1,2,2,3,4")
    # a later edit (e.g. fine-tuning) changed one repeated layer: no sharing, correct output
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.layers.3.mlp.up_proj.weight"] *= 1.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    engine, _ = _greedy_matches_transformers(folder, new_tokens=30)
    assert engine.layers[3] is not engine.layers[2]
    assert engine.info().shared == {}


def test_info_counts_bytes_of_dense_model(stories260k_dir: Path) -> None:
    engine = load(stories260k_dir, device="cpu")
    info = engine.info()
    cfg = engine.config
    expected_linear = cfg.num_layers * (
        4
        * (
            2 * cfg.hidden_size * cfg.num_heads * cfg.head_dim
            + 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
            + 3 * cfg.hidden_size * cfg.intermediate_size
        )
    )
    assert info.formats == {"dense": 20}  # qkv_proj, o_proj, gate_up_proj, down_proj
    assert info.linear_nbytes == info.dense_linear_nbytes == expected_linear
    # tied embeddings: lm_head is not counted twice; norms: 2 per layer + final
    norms = 4 * cfg.hidden_size * (2 * cfg.num_layers + 1)
    assert info.other_nbytes == 4 * cfg.vocab_size * cfg.hidden_size + norms
    assert engine.lm_head.weight is engine.embed_tokens.weight
    assert "20 dense" in info.table()
    unfused = load(stories260k_dir, device="cpu", fuse=False).info()
    assert unfused.formats == {"dense": 35} and unfused.linear_nbytes == info.linear_nbytes


def test_fusion_only_joins_alike_projections(stories260k_dir: Path, tmp_path: Path) -> None:
    """q_proj made 2:4 while k/v stay dense: q/k/v stay separate, gate/up still fuse; the
    logits are the same either way."""
    from slimstack.prune.methods import magnitude_prune
    from slimstack.prune.patterns import parse_pattern

    out = tmp_path / "mixed"
    with Checkpoint.open(stories260k_dir) as ckpt, CheckpointWriter(out) as writer:
        for name in ckpt.tensor_names():
            tensor = ckpt.get_tensor(name)
            if name.endswith("q_proj.weight"):
                tensor = magnitude_prune(tensor, parse_pattern("2:4"))
            writer.add(name, tensor)
        writer.finish(ckpt.config, tokenizer_from=stories260k_dir)
    fused = load(out, device="cpu", pack=False)
    separate = load(out, device="cpu", pack=False, fuse=False)
    attention, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert attention.qkv_proj is None and attention.q_proj is not None
    assert mlp.gate_up_proj is not None and mlp.gate_proj is None
    ids = torch.tensor([fused.tokenizer(PROMPT)["input_ids"]])
    assert torch.allclose(fused.logits(ids), separate.logits(ids), atol=1e-5)


def test_load_errors_are_clear(stories260k_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="dtype must be"):
        load(stories260k_dir, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="kernels must be one of"):
        load(stories260k_dir, device="cpu", kernels="cuda")
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing", device="cpu")
    # qwen2 needs its q/k/v biases
    folder = write_tiny_model(tmp_path / "qwen2", "qwen2")
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.bias"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="k_proj.bias"):
        load(folder, device="cpu")
    # an unsupported rope scaling is refused, naming the supported ones
    other = tmp_path / "longrope"
    shutil.copytree(stories260k_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="longrope.*supported: default, linear"):
        load(other, device="cpu")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        load(stories260k_dir, device="tpu")
    # a corrupt tokenizer names the folder and its files
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(stories260k_dir, broken)
    (broken / "tokenizer.json").chmod(0o644)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer files .* do not load"):
        load(broken, device="cpu")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[2]", "generation_config.json: not a JSON object"),
        ('{"eos_token_id": "</s>"}', "eos_token_id must be a token id or a list of them"),
        ('{"eos_token_id": [2, null]}', "eos_token_id must be a token id or a list of them"),
    ],
)
def test_a_bad_generation_config_is_named(
    stories260k_dir: Path, tmp_path: Path, text: str, message: str
) -> None:
    """Before: an AttributeError / TypeError traceback from inside load()."""
    folder = tmp_path / "gen"
    shutil.copytree(stories260k_dir, folder)
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load(folder, device="cpu")


@pytest.mark.parametrize(
    ("key", "value", "tensor"),
    [
        ("head_dim", 16, "q_proj.weight"),  # q/k/v rows follow heads x head_dim
        ("vocab_size", 1000, "model.embed_tokens.weight"),
        ("intermediate_size", 100, "gate_proj.weight"),
        ("num_key_value_heads", 8, "k_proj.weight"),
    ],
)
def test_config_that_does_not_fit_the_weights_is_refused(
    stories260k_dir: Path, tmp_path: Path, key: str, value: int, tensor: str
) -> None:
    folder = tmp_path / key
    shutil.copytree(stories260k_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{tensor} has shape .* config.json implies"):
        load(folder, device="cpu")


def test_load_accepts_dtype_names(stories260k_dir: Path) -> None:
    assert load(stories260k_dir, device="cpu", dtype="float16").dtype == torch.float16
    with pytest.raises(TypeError, match="got torch.int8"):
        load(stories260k_dir, device="cpu", dtype="int8")
    with pytest.raises(TypeError, match="got 'half-ish'"):
        load(stories260k_dir, device="cpu", dtype="half-ish")


@pytest.fixture(scope="module")
def wanda24(stories260k_dir: Path, shared_dir: Path, tmp_path_factory) -> Path:
    from slimstack.prune.driver import prune

    out = tmp_path_factory.mktemp("wanda") / "stories-wanda24"
    calib = shared_dir / "data" / "wikitext-2" / "valid.txt"
    prune(
        stories260k_dir, out, method="wanda", sparsity="2:4", calib=calib, nsamples=8,
        seqlen=128, progress=False,
    )  # fmt: skip
    return out


def test_wanda_24_copy_is_packed_and_matches_transformers(wanda24: Path) -> None:
    engine, result = _greedy_matches_transformers(wanda24)
    info = engine.info()
    assert info.formats == {"sparse24": 20}  # every fused projection packed, none dense
    assert info.linear_nbytes < 0.6 * info.dense_linear_nbytes
    dense = load(wanda24, device="cpu", pack=False)
    ids = torch.tensor([engine.tokenizer(PROMPT)["input_ids"]])
    assert torch.allclose(engine.logits(ids), dense.logits(ids), atol=1e-4)


def test_unstructured_50_copy_is_packed_as_bitmap(stories260k_dir: Path, tmp_path: Path) -> None:
    from slimstack.prune.driver import prune

    out = tmp_path / "magnitude50"
    prune(stories260k_dir, out, method="magnitude", sparsity="0.5", progress=False)
    engine = load(out, device="cpu")
    info = engine.info()
    assert info.formats == {"bitmap": 20}
    dense = load(out, device="cpu", pack=False)
    # the packed linears report the sparsity of the weights they hold, as the dense ones do
    measured = {row.name: row.sparsity for row in dense.info().linears}
    for row in info.linears:
        assert row.sparsity == pytest.approx(measured[row.name], abs=1e-12), row.name
        assert 0.49 < row.sparsity < 0.51
    ids = torch.tensor([engine.tokenizer(PROMPT)["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    assert torch.allclose(engine.logits(ids, mask), dense.logits(ids, mask), atol=1e-4)
    assert engine.generate(PROMPT, max_new_tokens=30).tokens == (
        dense.generate(PROMPT, max_new_tokens=30).tokens
    )


def test_one_time_op_setup_is_paid_at_load_not_in_the_first_prefill(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    """torch routes a custom op's first call through torch._dynamo, imported then (~0.5 s):
    load() of a packed model imports it, so the first generate's prefill_ms is the prefill."""
    import subprocess
    import sys

    from slimstack.prune.driver import prune

    prune(stories260k_dir, tmp_path / "p", method="magnitude", sparsity="2:4", progress=False)
    script = (
        "import sys, slimstack; "
        f"slimstack.load({str(tmp_path / 'p')!r}, device='cpu'); "
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"]


def test_a_generation_config_without_eos_keeps_the_models_eos(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    """transformers' generate would stop on nothing here; the engine keeps config.json's
    EOS (a deliberate difference, see loader._eos_token_ids)."""
    folder = tmp_path / "gen"
    shutil.copytree(stories260k_dir, folder)
    (folder / "generation_config.json").write_text('{"bos_token_id": 1}')
    model = load(folder, device="cpu")
    assert model.eos_token_ids == model.config.eos_token_ids != ()


def test_load_resolves_the_config_once(stories260k_dir: Path, monkeypatch) -> None:
    """Checkpoint.open resolves and checks config.json (engine and transformers); load()
    reuses that result instead of parsing it again."""
    import slimstack.checkpoint as checkpoint
    import slimstack.engine.loader as loader

    calls = []
    original = checkpoint.engine_config

    def counted(config):
        calls.append(config)
        return original(config)

    monkeypatch.setattr(checkpoint, "engine_config", counted)
    # a loader that parsed the config itself would call its own import of the function
    monkeypatch.setattr(loader, "engine_config", counted, raising=False)
    model = load(stories260k_dir, device="cpu", dtype=torch.float32)
    assert len(calls) == 1 and model.config.num_layers == len(model.layers)
