"""Checkpoint folders: lazy validated reading, atomic writing, refusal of bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from slimstack.checkpoint import (
    METADATA_FILE,
    Checkpoint,
    CheckpointError,
    read_metadata,
    sha256_file,
)
from slimstack.checkpoint_writer import CheckpointWriter

STORIES_SHA = "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_reads_stories_layer_by_layer(stories260k_dir: Path) -> None:
    with Checkpoint.open(stories260k_dir) as ckpt:
        assert (ckpt.model_type, ckpt.num_layers, ckpt.hidden_size) == ("llama", 5, 64)
        layer = ckpt.layer_tensors(3)
        assert layer["mlp.down_proj.weight"].shape == (64, 172)
        assert ckpt.tensor_shape("model.layers.0.self_attn.k_proj.weight") == (32, 64)
        assert ckpt.tensor_dtype("model.norm.weight") == torch.float32
        assert ckpt.weight_hashes() == {"model.safetensors": STORIES_SHA}
        assert {p.name for p in ckpt.tokenizer_files()} >= {
            "tokenizer.json",
            "tokenizer_config.json",
        }
        with pytest.raises(CheckpointError, match=r"layer index 5 out of range.*0\.\.4"):
            ckpt.layer_tensors(5)


def _write_from(ckpt: Checkpoint, target: Path, max_shard_bytes: int, **kw) -> Path:
    with CheckpointWriter(target, max_shard_bytes=max_shard_bytes, **kw) as writer:
        for name in ckpt.tensor_names():
            writer.add(name, ckpt.get_tensor(name))
        writer.finish(ckpt.config, {"steps": [{"op": "copy"}]}, tokenizer_from=ckpt.path)
    return target


@pytest.mark.parametrize("max_shard_bytes", [200_000, 2**31])
def test_written_folder_loads_in_transformers(
    stories260k_dir: Path, tmp_path: Path, max_shard_bytes: int
) -> None:
    with Checkpoint.open(stories260k_dir) as ckpt:
        out = _write_from(ckpt, tmp_path / "copy", max_shard_bytes)
    sharded = max_shard_bytes < 2**31
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert (len(list(out.glob("*.safetensors"))) > 1) == sharded
    assert read_metadata(out)["steps"] == [{"op": "copy"}]
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary left beside it
    reread = Checkpoint.open(out)
    assert len(reread.weight_files()) == len(list(out.glob("*.safetensors")))
    a = AutoModelForCausalLM.from_pretrained(stories260k_dir, local_files_only=True)
    b = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_writer_is_atomic_on_failure(stories260k_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(target, max_shard_bytes=1000) as w:
        w.add("a", torch.randn(1000))
        w.add("b", torch.randn(1000))  # flushes a shard into the temporary folder
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_unless_overwrite(stories260k_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        CheckpointWriter(target)
    assert (target / "keep.txt").read_text() == "precious"
    with Checkpoint.open(stories260k_dir) as ckpt:
        _write_from(ckpt, target, 2**31, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ bad input
def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model folder not found"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path / "empty")


def test_unknown_model_type_lists_supported(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = _copy(stories260k_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2"
    ):
        Checkpoint.open(folder)


def test_pickle_only_checkpoint_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(stories260k_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*safetensors only.*arbitrary code"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_truncated_safetensors_refused(stories260k_dir: Path, tmp_path: Path, cut: int) -> None:
    folder = _copy(stories260k_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        Checkpoint.open(folder)


def test_fp8_tensors_are_unsupported_not_corrupt(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = _copy(stories260k_dir, tmp_path / "m")
    with Checkpoint.open(stories260k_dir) as ckpt:
        tensors = {n: ckpt.get_tensor(n) for n in ckpt.tensor_names()}
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name}' is stored as F8_E4M3.*dequantize"):
        Checkpoint.open(folder)


def test_garbage_header_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = _copy(stories260k_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"}}}}garbage!"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint.open(folder)


def test_missing_layer_tensor_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = _copy(stories260k_dir, tmp_path / "m")
    with Checkpoint.open(stories260k_dir) as ckpt:
        tensors = {n: ckpt.get_tensor(n) for n in ckpt.tensor_names()}
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"layer 2 is missing tensors: model\.layers\.2\.mlp\.up_proj"
    ):
        Checkpoint.open(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_missing_final_norm_or_untied_lm_head_refused(
    stories260k_dir: Path, tmp_path: Path, tied: bool
) -> None:
    """Without model.norm.weight, or lm_head.weight when the embeddings are not tied,
    transformers would load the folder with those initialised at random."""
    folder = _copy(stories260k_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = tied
    (folder / "config.json").write_text(json.dumps(config))
    with Checkpoint.open(stories260k_dir) as ckpt:
        tensors = {n: ckpt.get_tensor(n) for n in ckpt.tensor_names()}
    tensors.pop("lm_head.weight", None)
    save_file(tensors, str(folder / "model.safetensors"))
    if tied:
        Checkpoint.open(folder).close()  # tied: no lm_head needed
    else:
        with pytest.raises(CheckpointError, match="missing lm_head.weight.*tie_word_embeddings"):
            Checkpoint.open(folder)
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing .*model.norm.weight"):
        Checkpoint.open(folder)


def test_overwriting_a_linked_output_keeps_what_the_link_pointed_to(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    """--out may be a symlink to a folder: the link is replaced by the new folder, the old
    folder it pointed to stays, and no stray link is left beside it."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("kept")
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    with Checkpoint.open(stories260k_dir) as ckpt:
        _write_from(ckpt, link, 2**31, overwrite=True)
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert (real / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]


def test_index_naming_missing_shard_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    with Checkpoint.open(stories260k_dir) as ckpt:
        out = _write_from(ckpt, tmp_path / "sharded", 200_000)
    next(iter(sorted(out.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        Checkpoint.open(out)


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_metadata_corrupt_is_an_error(tmp_path: Path) -> None:
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_metadata(tmp_path)
    assert read_metadata(tmp_path / "none") is None


def test_shards_without_index_are_read(stories260k_dir: Path, tmp_path: Path) -> None:
    with Checkpoint.open(stories260k_dir) as ckpt:
        out = _write_from(ckpt, tmp_path / "sharded", 200_000)
        (out / "model.safetensors.index.json").unlink()
        reread = Checkpoint.open(out)
        assert len(reread.weight_files()) > 1
        assert sorted(reread.tensor_names()) == sorted(ckpt.tensor_names())
        for name in ckpt.tensor_names():
            assert torch.equal(reread.get_tensor(name), ckpt.get_tensor(name)), name


def test_tensor_in_two_shards_refused(stories260k_dir: Path, tmp_path: Path) -> None:
    folder = _copy(stories260k_dir, tmp_path / "m")
    save_file({"model.norm.weight": torch.ones(64)}, str(folder / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' appears in two shards"):
        Checkpoint.open(folder)


@pytest.mark.parametrize(
    ("model_type", "drop", "add", "message"),
    [
        # qwen2 always has q/k/v biases: a folder without one is not a qwen2 checkpoint
        ("qwen2", "model.layers.1.self_attn.k_proj.bias", None,
         r"config\.json implies model\.layers\.1\.self_attn\.k_proj\.bias, but the weights lack it"),
        # a bias llama's config does not ask for would be ignored by every loader, silently
        ("llama", None, "model.layers.0.mlp.down_proj.bias",
         r"the weights hold model\.layers\.0\.mlp\.down_proj\.bias, but config\.json implies no "
         r"bias there \(model_type='llama', attention_bias=False, mlp_bias=False\)"),
    ],
)  # fmt: skip
def test_biases_must_match_the_config(
    tiny_checkpoint, tmp_path: Path, model_type: str, drop, add, message: str
) -> None:
    """Before: only slimstack.load checked (and only for missing biases); magnitude pruning
    copied such a folder and the calibrated passes died in transformers' strict loading."""
    from safetensors.torch import load_file

    from slimstack.prune.driver import prune

    folder = tiny_checkpoint(model_type)
    weights = load_file(folder / "model.safetensors")
    if drop:
        del weights[drop]
    if add:
        weights[add] = torch.zeros(64)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(folder)
    with pytest.raises(CheckpointError, match=message):
        prune(folder, tmp_path / "out", method="magnitude", progress=False)
    assert not (tmp_path / "out").exists()


def _with_config(stories260k_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of stories260K whose config.json has `changes` applied."""
    folder = _copy(stories260k_dir, tmp_path / "m")
    (folder / "config.json").chmod(0o644)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_config_the_engine_cannot_run_is_refused_naming_the_file(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    from slimstack.engine.config import ConfigError

    folder = _with_config(stories260k_dir, tmp_path, num_attention_heads=0)
    with pytest.raises(
        ConfigError, match=rf"{folder / 'config.json'}: config 'num_attention_heads'"
    ):
        Checkpoint.open(folder)


def test_a_config_transformers_refuses_is_named_not_a_key_error(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    from slimstack.engine.config import ConfigError

    folder = _with_config(
        stories260k_dir,
        tmp_path,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0},
    )
    with pytest.raises(
        ConfigError, match=r"config\.json: transformers refuses this config: .*high_freq_factor"
    ):
        Checkpoint.open(folder)


@pytest.mark.parametrize(
    ("extra", "refused"),
    [("self_attn.rotary_emb.inv_freq", False), ("self_attn.q_norm.weight", True)],
)
def test_extra_layer_tensors(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, extra: str, refused: bool
) -> None:
    """An old transformers' saved inv_freq is read past (recomputed from the config); any
    other tensor a layer does not have is refused up front (transformers' strict layer
    loading died on both deep inside a pruning pass)."""
    from slimstack.prune.driver import prune

    folder = _copy(stories260k_dir, tmp_path / "m")
    with Checkpoint.open(stories260k_dir) as ckpt:
        tensors = {n: ckpt.get_tensor(n) for n in ckpt.tensor_names()}
    name = f"model.layers.1.{extra}"
    tensors[name] = torch.rand(8)
    save_file(tensors, str(folder / "model.safetensors"))
    if refused:
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is not a tensor of a llama"):
            Checkpoint.open(folder)
        return
    with Checkpoint.open(folder) as ckpt:
        assert name not in ckpt.layer_names(1)
    prune(folder, tmp_path / "out", method="wanda", sparsity="2:4",
                calib=wikitext_dir / "valid.txt", nsamples=2, seqlen=64, progress=False)  # fmt: skip
    with Checkpoint.open(tmp_path / "out") as pruned:
        assert name not in pruned.tensor_names()
