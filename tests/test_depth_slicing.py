"""Slicing: sliced models equal their source with those layers skipped, up-scaled layers are
the source's tensors, mergekit configs, layer maps, and every refusal leaves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from slimstack.checkpoint import Checkpoint, read_metadata
from slimstack.checkpoint_writer import CheckpointWriter
from slimstack.depth.layer_ranges import drop_to_keep, format_layers, keep_layers, parse_range
from slimstack.depth.slicing import slice_model


# ------------------------------------------------------------------------------ helpers
def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def logits_with_layers(model, layers: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The source model run with only `layers` (in that order) of its decoder stack."""
    original = model.model.layers
    original_types = getattr(model.config, "layer_types", None)
    depth = model.config.num_hidden_layers
    try:
        model.model.layers = torch.nn.ModuleList(original[i] for i in layers)
        model.config.num_hidden_layers = len(layers)  # transformers runs layers[:this]
        if original_types is not None:
            model.config.layer_types = [original_types[i] for i in layers]
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        model.model.layers = original
        model.config.num_hidden_layers = depth
        if original_types is not None:
            model.config.layer_types = original_types


def sliced_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(path)(ids, use_cache=False).logits


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


@pytest.fixture(scope="module")
def source(stories260k_dir: Path):
    return load_hf(stories260k_dir)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, stories260k_dir: Path) -> Path:
    """stories260K with every tensor scaled: same architecture and width, other weights."""
    out = tmp_path_factory.mktemp("other") / "model"
    with Checkpoint.open(stories260k_dir) as src, CheckpointWriter(out) as writer:
        for name in src.tensor_names():
            writer.add(name, src.get_tensor(name) * 1.5)
        writer.finish(src.config, None, tokenizer_from=stories260k_dir)
    return out


def tiny_random(path: Path, model_type: str, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        **overrides,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    model.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ range specs
def test_range_parsing_is_python_style_but_strict():
    assert parse_range("20:28", 32) == range(20, 28)
    assert parse_range("-4:", 32) == range(28, 32)
    assert parse_range(":3", 32) == range(0, 3)
    assert parse_range("-1", 32) == range(31, 32)
    assert drop_to_keep(["1", "3:5"], 6) == [0, 2, 5]
    assert drop_to_keep("0:2,4", 6) == [2, 3, 5]
    assert keep_layers("0:3,1:4", 5) == [0, 1, 2, 1, 2, 3]
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0:3,5,7:9"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3:9", "'3:9' is out of range: the model has 5 layers"),
        ("7", "layer 7 is out of range"),
        ("3:3", "'3:3' is empty"),
        ("a:b", "cannot parse layer range 'a:b'"),
        ("1,,2", "empty layer range"),
        (["1:3", "2"], "drop ranges overlap: layer 2 is in both 1:3 and 2"),
        ("0:5", "removes all 5 layers"),
        (["0:2", "2:5"], "removes all 5 layers"),
    ],
)
def test_bad_drops_are_refused_and_nothing_written(
    stories260k_dir: Path, tmp_path: Path, spec, message
):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        slice_model(stories260k_dir, out, drop=spec, progress=False)
    assert_nothing_written(tmp_path, out)


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("drop", [["2"], ["0", "4"], ["1:3"], ["-2:"], ["0:4"]])
def test_sliced_model_equals_source_with_layers_skipped(
    stories260k_dir: Path, tmp_path: Path, source, ids, drop
):
    out = tmp_path / "sliced"
    report = slice_model(stories260k_dir, out, drop=drop, progress=False)
    kept = drop_to_keep(drop, 5)
    assert report.num_layers == len(kept) and report.source_layers == 5
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(kept)
    got = sliced_logits(out, ids)
    expected = logits_with_layers(source, kept, ids)
    assert (got - expected).abs().max() < 1e-5
    meta = read_metadata(out)
    assert meta["layer_map"] == [
        {"model": str(stories260k_dir.resolve()), "layer": i} for i in kept
    ]
    step = meta["steps"][-1]
    assert step["op"] == "slice" and step["mode"] == "drop" and step["keep"] == format_layers(kept)
    assert f"(layers {format_layers(kept)})" in report.summary()  # says which layers it kept
    assert (out / "tokenizer.json").is_file()


def test_keep_reorders_and_repeats(stories260k_dir: Path, tmp_path: Path, source, ids):
    out = tmp_path / "kept"
    slice_model(stories260k_dir, out, keep=["0:3", "1:5"], progress=False)
    layers = [0, 1, 2, 1, 2, 3, 4]
    assert (sliced_logits(out, ids) - logits_with_layers(source, layers, ids)).abs().max() < 1e-5


# ------------------------------------------------------------------------------ up-scaling
def write_config(path: Path, slices: list[tuple[str, list[int]]], **extra) -> Path:
    config = {
        "slices": [{"sources": [{"model": m, "layer_range": r}]} for m, r in slices],
        "merge_method": "passthrough",
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_solar_upscaling_copies_source_tensors_in_order(
    stories260k_dir: Path, tmp_path: Path, source, ids
):
    config = write_config(
        tmp_path / "solar.yaml", [(str(stories260k_dir), [0, 4]), (str(stories260k_dir), [1, 5])]
    )
    out = tmp_path / "solar"
    report = slice_model(out=out, config=config, progress=False)
    order = [0, 1, 2, 3, 1, 2, 3, 4]
    assert report.num_layers == 8 and report.layers == "0:4,1:5"
    with Checkpoint.open(stories260k_dir) as src, Checkpoint.open(out) as new:
        assert new.num_layers == 8
        for position, layer in enumerate(order):
            ours, theirs = new.layer_tensors(position), src.layer_tensors(layer)
            assert ours.keys() == theirs.keys()
            for name in theirs:
                assert torch.equal(ours[name], theirs[name]), (position, name)
        for name in src.non_layer_names():
            assert torch.equal(new.get_tensor(name), src.get_tensor(name))
    meta = read_metadata(out)
    assert [e["layer"] for e in meta["layer_map"]] == order
    assert meta["steps"][-1]["slices"][1]["layer_range"] == [1, 5]
    assert meta["steps"][-1]["config_file"] == str(config.resolve())
    assert (sliced_logits(out, ids) - logits_with_layers(source, order, ids)).abs().max() < 1e-5


def test_config_dtype_and_relative_paths(stories260k_dir: Path, tmp_path: Path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    config = write_config(
        folder / "c.yaml",
        [(str(stories260k_dir.resolve()), [0, 2])],
        dtype="BF16",  # an alias, any case
    )
    monkeypatch.chdir(tmp_path)
    slice_model(out="bf16", config=config, progress=False)
    with Checkpoint.open(tmp_path / "bf16") as new:
        assert new.num_layers == 2
        assert new.tensor_dtype("model.layers.0.mlp.up_proj.weight") == torch.bfloat16
        assert new.config["dtype"] == "bfloat16"
    load_hf(tmp_path / "bf16")

    # a model path relative to the YAML's folder (not the working directory)
    (folder / "models").mkdir()
    (folder / "models" / "tiny").symlink_to(stories260k_dir.resolve())
    config = write_config(folder / "rel.yaml", [("models/tiny", [1, 3])])
    slice_model(out="rel", config=config, progress=False)
    assert read_metadata(tmp_path / "rel")["steps"][-1]["num_hidden_layers"] == 2


def test_layers_from_two_models(stories260k_dir: Path, other_model: Path, tmp_path: Path):
    out = tmp_path / "mixed"
    config = write_config(
        tmp_path / "mix.yaml", [(str(stories260k_dir), [0, 3]), (str(other_model), [3, 5])]
    )
    slice_model(out=out, config=config, progress=False)
    with (
        Checkpoint.open(stories260k_dir) as a,
        Checkpoint.open(other_model) as b,
        Checkpoint.open(out) as new,
    ):
        for position, (ckpt, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 3), (b, 4)]):
            name = "mlp.down_proj.weight"
            assert torch.equal(new.layer_tensors(position)[name], ckpt.layer_tensors(layer)[name])
        # embeddings and norm from the first slice's model (no base_model given)
        assert torch.equal(
            new.get_tensor("model.embed_tokens.weight"), a.get_tensor("model.embed_tokens.weight")
        )
    meta = read_metadata(out)
    assert {s["path"] for s in meta["sources"]} == {
        str(stories260k_dir.resolve()),
        str(other_model.resolve()),
    }
    assert meta["layer_map"][3] == {"model": str(other_model.resolve()), "layer": 3}
    load_hf(out)


def test_per_layer_config_lists_are_sliced(tmp_path: Path):
    """qwen2 with sliding-window layers (from max_window_layers, layer_types not written):
    the output carries layer_types sliced with the layers and equals the source with those
    layers skipped."""
    src = tiny_random(
        tmp_path / "qwen2",
        "qwen2",
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    config = json.loads((src / "config.json").read_text())
    config.pop("layer_types", None)  # as older configs: derived from max_window_layers
    (src / "config.json").write_text(json.dumps(config))
    model = load_hf(src)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    out = tmp_path / "sliced"
    slice_model(src, out, drop="0", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert written["num_hidden_layers"] == 3
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    got = sliced_logits(out, ids)
    assert (got - logits_with_layers(model, [1, 2, 3], ids)).abs().max() < 1e-5

    # an explicit per-layer list is re-indexed too, repeats included
    out2 = tmp_path / "up"
    slice_model(src, out2, keep="2:4,0:2", progress=False)
    written = json.loads((out2 / "config.json").read_text())
    assert written["layer_types"] == ["sliding_attention"] * 2 + ["full_attention"] * 2


# ------------------------------------------------------------------------------ layer maps
def test_layer_map_follows_an_unmodified_slice(stories260k_dir: Path, tmp_path: Path):
    upscaled = tmp_path / "up"
    slice_model(stories260k_dir, upscaled, keep="0:4,1:5", progress=False)
    again = tmp_path / "again"
    slice_model(upscaled, again, drop="0:2", progress=False)  # keeps up layers 2..7
    meta = read_metadata(again)
    assert [e["layer"] for e in meta["layer_map"]] == [2, 3, 1, 2, 3, 4]
    assert {e["model"] for e in meta["layer_map"]} == {str(stories260k_dir.resolve())}
    assert [s["op"] for s in meta["steps"]] == ["slice", "slice"]


def test_slicing_a_pruned_model_keeps_its_history(stories260k_dir: Path, tmp_path: Path):
    from slimstack.prune.driver import prune

    pruned = tmp_path / "pruned"
    prune(stories260k_dir, pruned, method="magnitude", sparsity="2:4", progress=False)
    out = tmp_path / "sliced"
    slice_model(pruned, out, drop="4", progress=False)
    meta = read_metadata(out)
    assert [s["op"] for s in meta["steps"]] == ["prune", "slice"]
    assert meta["layer_map"][0]["model"] == str(pruned.resolve())


# ------------------------------------------------------------------------------ criterion
def test_criterion_pick_from_an_analysis(stories260k_dir: Path, tmp_path: Path, source, ids):
    with Checkpoint.open(stories260k_dir) as ckpt:
        hashes = ckpt.weight_hashes()
    scores = {
        "model": {"path": str(stories260k_dir), "weights_sha256": hashes},
        "criteria": {
            "angular": {"best_block": {"2": {"start": 2, "end": 4, "distance": 0.1}}},
            "perplexity": {"drop_order": [3, 1, 2, 0, 4]},
        },
    }
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "angular"
    slice_model(stories260k_dir, out, criterion="angular", n=2, scores=tmp_path / "report")
    assert (sliced_logits(out, ids) - logits_with_layers(source, [0, 1, 4], ids)).abs().max() < 1e-5
    step = read_metadata(out)["steps"][-1]
    assert step["mode"] == "criterion" and step["drop"] == "2:4" and step["criterion"] == "angular"
    out = tmp_path / "ppl"
    slice_model(stories260k_dir, out, criterion="ppl", n=2, scores=scores, progress=False)
    assert read_metadata(out)["steps"][-1]["keep"] == "0,2,4"

    bad = tmp_path / "bad"
    wrong = dict(scores, model={"path": "elsewhere", "weights_sha256": {"x": "y"}})
    with pytest.raises(ValueError, match="made for another model"):
        slice_model(stories260k_dir, bad, criterion="angular", n=2, scores=wrong)
    with pytest.raises(ValueError, match="no 'taylor' scores"):
        slice_model(stories260k_dir, bad, criterion="taylor", n=1, scores=scores)
    with pytest.raises(ValueError, match="needs the analysis: give --scores"):
        slice_model(stories260k_dir, bad, criterion="bi", n=1)
    with pytest.raises(ValueError, match="--criterion needs --n"):
        slice_model(stories260k_dir, bad, criterion="bi", scores=scores)
    assert_nothing_written(tmp_path, bad)


def test_criterion_scored_on_the_fly(stories260k_dir: Path, tmp_path: Path, shared_dir: Path):
    calib = tmp_path / "calib.txt"
    calib.write_text((shared_dir / "data" / "wikitext-2" / "valid.txt").read_text()[:20000])
    out = tmp_path / "bi"
    slice_model(
        stories260k_dir,
        out,
        criterion="bi",
        n=1,
        calib=calib,
        nsamples=2,
        seqlen=32,
        progress=False,
    )
    step = read_metadata(out)["steps"][-1]
    assert step["criterion"] == "block_influence" and step["scores"]["calibration"]["nsamples"] == 2
    assert Checkpoint.open(out).num_layers == 4


# ------------------------------------------------------------------------------ refusals
def _config_case(tmp_path: Path, stories: Path, width: Path, arch: Path, case: str) -> dict:
    one = {"sources": [{"model": str(stories), "layer_range": [0, 2]}]}
    cases = {
        "merge_method": {"slices": [one], "merge_method": "slerp"},
        "no_method": {"slices": [one]},
        "two_sources": {
            "slices": [{"sources": [one["sources"][0], one["sources"][0]]}],
            "merge_method": "passthrough",
        },
        "past_end": {
            "slices": [{"sources": [{"model": str(stories), "layer_range": [3, 9]}]}],
            "merge_method": "passthrough",
        },
        "bad_range": {
            "slices": [{"sources": [{"model": str(stories), "layer_range": [2, 2]}]}],
            "merge_method": "passthrough",
        },
        "width": {
            "slices": [one, {"sources": [{"model": str(width), "layer_range": [0, 1]}]}],
            "merge_method": "passthrough",
        },
        "arch": {
            "slices": [one, {"sources": [{"model": str(arch), "layer_range": [0, 1]}]}],
            "merge_method": "passthrough",
        },
        "missing": {
            "slices": [{"sources": [{"model": "meta-llama/Llama-2-7b-hf", "layer_range": [0, 1]}]}],
            "merge_method": "passthrough",
        },
        "parameters": {
            "slices": [
                {"sources": [{**one["sources"][0], "parameters": {"scale": [{"value": 0.5}]}}]}
            ],
            "merge_method": "passthrough",
        },
        "unknown_key": {"slices": [one], "merge_method": "passthrough", "models": []},
        "dtype": {"slices": [one], "merge_method": "passthrough", "dtype": "int8"},
    }
    return cases[case]


CONFIG_ERRORS = {
    "merge_method": "merge_method 'slerp' is not supported: slimstack slices with merge_method: passthrough only",
    "no_method": "merge_method None is not supported",
    "two_sources": "exactly one source per slice, got 2 sources",
    "past_end": "asks for layer 5 of .*which has layers 0..4 \\(a layer_range past the end\\?\\)",
    "bad_range": "layer_range \\[2, 2\\] is empty",
    "width": "different widths: hidden_size is 64 in .* but 32 in",
    "arch": "different architectures: .* is 'llama', .* is 'qwen2'",
    "missing": "model folder 'meta-llama/Llama-2-7b-hf' not found .*local folders only",
    "parameters": "unsupported key\\(s\\) 'parameters'.*scale are not supported",
    "unknown_key": "unsupported key\\(s\\) 'models'",
    "dtype": "dtype 'int8' is not one of float32, float16, bfloat16",
}


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory) -> Path:
    return tiny_random(
        tmp_path_factory.mktemp("narrow") / "m",
        "llama",
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    return tiny_random(tmp_path_factory.mktemp("qwen") / "m", "qwen2", intermediate_size=172)


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_configs_are_refused_and_nothing_written(
    stories260k_dir: Path, narrow_model: Path, qwen_model: Path, tmp_path: Path, case: str
):
    raw = _config_case(tmp_path, stories260k_dir, narrow_model, qwen_model, case)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=CONFIG_ERRORS[case]):
        slice_model(out=out, config=config, progress=False)
    assert_nothing_written(tmp_path, out)


def test_other_refusals_leave_nothing(stories260k_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="exactly one of --drop, --keep, --config or --criterion"):
        slice_model(stories260k_dir, out, drop="1", keep="0:2")
    with pytest.raises(ValueError, match="got none"):
        slice_model(stories260k_dir, out)
    with pytest.raises(ValueError, match="--n goes with --criterion"):
        slice_model(stories260k_dir, out, drop="1", n=2)
    with pytest.raises(ValueError, match="--scores goes with --criterion"):
        slice_model(stories260k_dir, out, drop="1", scores=tmp_path)
    with pytest.raises(ValueError, match="--calib goes with --criterion"):
        slice_model(stories260k_dir, out, keep="0:2", calib=tmp_path / "valid.txt")
    # a MODEL that no slice of the config uses was silently ignored
    elsewhere = write_config(tmp_path / "elsewhere.yaml", [(str(stories260k_dir), [0, 2])])
    with pytest.raises(ValueError, match="is not used: every slice of the config names"):
        slice_model(tmp_path, out, config=elsewhere)
    with pytest.raises(ValueError, match="slice config not found"):
        slice_model(out=out, config=tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("slices: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        slice_model(out=out, config=tmp_path / "broken.yaml")
    (tmp_path / "twice.yaml").write_text(
        "slices:\n  - sources:\n      - layer_range: [0, 2]\n        layer_range: [0, 5]\n"
    )
    with pytest.raises(ValueError, match="duplicate key 'layer_range'"):
        slice_model(out=out, config=tmp_path / "twice.yaml")
    with pytest.raises(ValueError, match="dtype 'int4' is not one of"):
        slice_model(stories260k_dir, out, drop="1", dtype="int4")
    with pytest.raises(ValueError, match="model folder not found"):
        slice_model(tmp_path / "missing", out, drop="1")
    assert_nothing_written(tmp_path, out)
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        slice_model(stories260k_dir, out, drop="1")
    assert list(out.iterdir()) == []


def test_a_criterion_scored_now_refuses_windows_past_the_context(
    stories260k_dir: Path, shared_dir: Path, tmp_path: Path
):
    """Before: 4096-token windows ran through a 512-token model and its scores picked the
    layers to drop, without a word (analyze refused the same settings)."""
    out = tmp_path / "out"
    calib = shared_dir / "data" / "wikitext-2" / "valid.txt"
    for seqlen, message in ((4096, r"seqlen 4096 exceeds the model's context \(512 tokens\)"),
                            (1, "seqlen must be at least 2")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            slice_model(stories260k_dir, out, criterion="bi", n=1, calib=calib, nsamples=2,
                        seqlen=seqlen, progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_output_cannot_be_a_source(stories260k_dir: Path, other_model: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="would replace the input"):
        slice_model(other_model, other_model, drop="1", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="which lies inside it"):  # a folder holding it
        slice_model(other_model, other_model.parent, drop="1", overwrite=True, progress=False)
    assert Checkpoint.open(other_model).num_layers == 5


# ------------------------------------------------------------------------------ layer settings
def config_variant(path: Path, source: Path, **changes) -> Path:
    """`source`'s weights and tokenizer under a config with `changes`."""
    path.mkdir(parents=True)
    for file in source.iterdir():
        (path / file.name).symlink_to(file.resolve())
    (path / "config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}},
         "different rope theta: 10000.0 in .* but 500.0 in"),
        ({"rms_norm_eps": 1e-3}, "different rms_norm_eps: 1e-05 in .* but 0.001 in"),
        ({"vocab_size": 1024}, "different vocab_size: 512 in .* but 1024 in"),
    ],
)  # fmt: skip
def test_layers_of_models_that_run_them_otherwise_are_refused(
    stories260k_dir: Path, tmp_path: Path, changes, message
):
    """Before, only widths and tensor shapes were compared: the other model's layers were
    written under the base's rope theta / norm epsilon (or beside another vocabulary's
    embeddings) and the output ran them as a model nobody trained, without a word."""
    if "vocab_size" in changes:  # a real one: embeddings grown to the new vocabulary
        other = tmp_path / "other"
        with Checkpoint.open(stories260k_dir) as src, CheckpointWriter(other) as writer:
            for name in src.tensor_names():
                tensor = src.get_tensor(name)
                if name == "model.embed_tokens.weight":
                    tensor = torch.cat([tensor, tensor])
                writer.add(name, tensor)
            writer.finish({**src.config, **changes}, None, tokenizer_from=stories260k_dir)
    else:
        other = config_variant(tmp_path / "other", stories260k_dir, **changes)
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "c.yaml", [(str(stories260k_dir), [0, 2]), (str(other), [2, 5])]
    )
    with pytest.raises(ValueError, match=message):
        slice_model(out=out, config=config, progress=False)
    assert_nothing_written(tmp_path, out)


def test_sliding_windows_must_survive_the_stacking(tmp_path: Path):
    """A layer keeps the window it was trained with, or the stacking is refused. Before, a
    qwen2 sliding layer stacked onto a base without sliding windows was written as a config
    transformers cannot load, and a mistral layer without a window ran with the base's."""
    full = tiny_random(tmp_path / "full", "qwen2")
    sliding = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}
    windowed = tiny_random(tmp_path / "windowed", "qwen2", **sliding)
    out = tmp_path / "out"
    config = write_config(tmp_path / "a.yaml", [(str(full), [0, 2]), (str(windowed), [2, 4])])
    with pytest.raises(ValueError, match="new layer 2 \\(layer 2 of .*windowed\\) attends over "
                       "a window of 4 tokens there but would attend over all tokens"):  # fmt: skip
        slice_model(out=out, config=config, progress=False)
    mistral = tiny_random(tmp_path / "mistral", "mistral", sliding_window=8)
    unwindowed = tiny_random(tmp_path / "unwindowed", "mistral", sliding_window=None)
    config = write_config(tmp_path / "b.yaml", [(str(mistral), [0, 2]), (str(unwindowed), [0, 1])])
    with pytest.raises(ValueError, match="new layer 2 .* attends over all tokens there but "
                       "would attend over a window of 8 tokens"):  # fmt: skip
        slice_model(out=out, config=config, progress=False)
    assert_nothing_written(tmp_path, out)

    # a base whose window covers no layer (max_window_layers = depth) can take sliding ones
    late = tiny_random(tmp_path / "late", "qwen2", **{**sliding, "max_window_layers": 4})
    config = write_config(tmp_path / "c.yaml", [(str(late), [0, 2]), (str(windowed), [2, 4])])
    slice_model(out=out, config=config, progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    # against the windowed model holding late's embeddings, norm, head and first layers
    expected, base = load_hf(windowed), load_hf(late)
    expected.model.embed_tokens, expected.model.norm = base.model.embed_tokens, base.model.norm
    expected.lm_head = base.lm_head
    expected.model.layers = torch.nn.ModuleList(
        [*base.model.layers[:2], *expected.model.layers[2:]]
    )
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = expected(ids, use_cache=False).logits
    assert (sliced_logits(out, ids) - want).abs().max() < 1e-5


def test_output_cannot_replace_the_tokenizer_source(stories260k_dir: Path, tmp_path: Path):
    """Before, the tokenizer_source folder was not among the guarded inputs: --overwrite onto
    it replaced (deleted) that folder."""
    import shutil

    tokenizer = tmp_path / "tok"
    shutil.copytree(stories260k_dir, tokenizer)
    config = write_config(
        tmp_path / "c.yaml", [(str(stories260k_dir), [0, 2])], tokenizer_source=str(tokenizer)
    )
    with pytest.raises(ValueError, match="would replace the input"):
        slice_model(out=tokenizer, config=config, overwrite=True, progress=False)
    assert Checkpoint.open(tokenizer).num_layers == 5


def test_integer_layer_specs(stories260k_dir: Path, tmp_path: Path, source, ids):
    """Before: drop=3 failed with "'int' object is not iterable"."""
    slice_model(stories260k_dir, tmp_path / "d", drop=3, progress=False)
    assert read_metadata(tmp_path / "d")["steps"][-1]["keep"] == "0:3,4"
    slice_model(stories260k_dir, tmp_path / "k", keep=[4, 0, "1:3"], progress=False)
    expected = logits_with_layers(source, [4, 0, 1, 2], ids)
    assert (sliced_logits(tmp_path / "k", ids) - expected).abs().max() < 1e-5


def test_a_tokenizer_source_without_a_fitting_tokenizer_is_refused(
    stories260k_dir: Path, tmp_path: Path
):
    """Before, a tokenizer_source folder without tokenizer files gave an output without any
    tokenizer, and one of another vocabulary a tokenizer whose ids the embeddings lack."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((stories260k_dir / "config.json").read_text())
    wide = config_variant(tmp_path / "wide", stories260k_dir, vocab_size=32000)
    out = tmp_path / "out"
    for folder, message in ((empty, "holds no tokenizer files"),
                            (wide, "vocab_size 32000, but the embeddings come from")):  # fmt: skip
        config = write_config(
            tmp_path / "c.yaml", [(str(stories260k_dir), [0, 2])], tokenizer_source=str(folder)
        )
        with pytest.raises(ValueError, match=message):
            slice_model(out=out, config=config, progress=False)
    assert_nothing_written(tmp_path, out)
    # a tokenizer of the same vocabulary is taken
    same = config_variant(tmp_path / "same", stories260k_dir)
    config = write_config(
        tmp_path / "c.yaml", [(str(stories260k_dir), [0, 2])], tokenizer_source=str(same)
    )
    slice_model(out=out, config=config, progress=False)
    assert (out / "tokenizer.json").is_file()
