"""Recipes: slice -> prune -> eval into one folder that records every step; bad recipes are
refused before any work, and a step failing mid-way leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from slimstack.checkpoint import Checkpoint, read_metadata
from slimstack.depth.recipe import apply_recipe, load_recipe


@pytest.fixture(scope="module")
def texts(tmp_path_factory, shared_dir: Path) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("texts")
    wikitext = shared_dir / "data" / "wikitext-2"
    calib, test = folder / "valid.txt", folder / "test.txt"
    calib.write_text((wikitext / "valid.txt").read_text()[:20000])
    test.write_text((wikitext / "test.txt").read_text()[:6000])
    return calib, test


def recipe_file(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_slice_prune_eval_recipe(stories260k_dir: Path, tmp_path: Path, texts):
    calib, test = texts
    work = tmp_path / "work"
    work.mkdir()
    path = recipe_file(
        work,
        {
            "model": str(stories260k_dir),
            "out": "result",  # relative to the recipe's folder
            "steps": [
                {"slice": {"drop": "3"}},
                {
                    "prune": {
                        "method": "wanda",
                        "sparsity": "2:4",
                        "calib": str(calib),
                        "nsamples": 4,
                        "seqlen": 32,
                    }
                },
                {"eval": {"text": str(test), "seqlen": 64, "max_windows": 4}},
            ],
        },
    )
    report = apply_recipe(path, progress=False)
    out = work / "result"
    assert report.output == out and out.is_dir()
    assert leftovers(work, "result") == []
    with Checkpoint.open(out) as ckpt:
        assert ckpt.num_layers == 4
        for name in ckpt.tensor_names():
            if name.endswith("_proj.weight"):
                groups = ckpt.get_tensor(name).reshape(-1, 4)
                assert ((groups != 0).sum(-1) <= 2).all(), name
        with Checkpoint.open(stories260k_dir) as src:  # layer 3 is gone: new 3 is old 4
            assert torch.equal(
                ckpt.get_tensor("model.layers.3.input_layernorm.weight"),
                src.get_tensor("model.layers.4.input_layernorm.weight"),
            )
    meta = read_metadata(out)
    assert [s["op"] for s in meta["steps"]] == ["slice", "prune", "eval"]
    assert meta["source"]["path"] == str(stories260k_dir.resolve())
    assert meta["steps"][0]["keep"] == "0:3,4"
    assert meta["steps"][1]["method"] == "wanda" and meta["steps"][1]["pattern"] == "2:4"
    evaluation = meta["steps"][2]
    assert evaluation["model"] == str(out.resolve()) or evaluation["model"] == str(out)
    assert evaluation["reference"] == str(stories260k_dir)
    assert evaluation["perplexity"] > evaluation["reference_perplexity"] > 1
    assert 0 < evaluation["top1_agreement"] < 1 and evaluation["kl"] > 0
    assert "layer_map" not in meta  # pruned weights are no longer copies of the source's
    assert ".recipe-" not in json.dumps(meta)  # staging folders are named by their step
    assert meta["recipe"]["file"] == str(path.resolve())
    assert "slice" in report.summary() and "perplexity" in report.summary()

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)


def test_inline_mergekit_slice_uses_the_current_model(stories260k_dir: Path, tmp_path: Path):
    recipe = {
        "model": str(stories260k_dir),
        "steps": [
            {"slice": {"slices": [{"sources": [{"layer_range": [0, 2]}]}] * 2}},
            {"prune": {"method": "magnitude", "sparsity": "0.5"}},
        ],
    }
    report = apply_recipe(recipe, out=tmp_path / "up", progress=False)
    meta = read_metadata(report.output)
    assert meta["steps"][0]["num_hidden_layers"] == 4
    assert [e["layer"] for e in meta["steps"][0]["layer_map"]] == [0, 1, 0, 1]
    assert Checkpoint.open(report.output).num_layers == 4


BAD_RECIPES = {
    "unknown step": ({"steps": [{"quantize": {"bits": 4}}]}, "step 1: unknown step 'quantize'"),
    "unknown key": (
        {"steps": [{"prune": {"method": "wanda", "ratio": 0.5}}]},
        "unknown setting\\(s\\) 'ratio'",
    ),
    "bad pattern": (
        {"steps": [{"prune": {"method": "magnitude", "sparsity": "5:4"}}]},
        "step 1 \\(prune\\): .*5:4",
    ),
    "bad method": ({"steps": [{"prune": {"method": "obs"}}]}, "unknown method 'obs'"),
    "no calib": ({"steps": [{"prune": {"method": "wanda"}}]}, "wanda needs calib"),
    "drop past end": (
        {"steps": [{"slice": {"drop": "3:9"}}]},
        "step 1 \\(slice\\): .*out of range",
    ),
    "second slice": (
        {"steps": [{"slice": {"drop": "0:3"}}, {"slice": {"drop": "0:2"}}]},
        "step 2 \\(slice\\): .*removes all 2 layers",
    ),
    "two modes": (
        {"steps": [{"slice": {"drop": "1", "keep": "0:2"}}]},
        "exactly one of drop, keep",
    ),
    "eval text missing": (
        {"steps": [{"eval": {"text": "x"}}]},
        "step 1 \\(eval\\) text: 'x' not found",
    ),
    "only eval": (
        {"steps": [{"eval": {"text": __file__}}]},
        "nothing to write: add a slice or prune step",
    ),
    "no steps": ({"steps": []}, "'steps' must be a non-empty list"),
    "missing text": (
        {"steps": [{"slice": {"drop": "1"}}, {"eval": {"seqlen": 8}}]},
        "eval needs text",
    ),
    "bad criterion": (
        {"steps": [{"slice": {"criterion": "cosine", "n": 1}}]},
        "unknown criterion 'cosine'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipes_are_refused_before_any_work(stories260k_dir: Path, tmp_path: Path, case):
    raw, message = BAD_RECIPES[case]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        apply_recipe({"model": str(stories260k_dir), **raw}, out=out, progress=False)
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_recipe_file_errors(tmp_path: Path, stories260k_dir: Path):
    with pytest.raises(ValueError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text(f"model: {stories260k_dir}\nsteps: []\nmodel: other\n")
    with pytest.raises(ValueError, match="not valid YAML.*duplicate key 'model'"):
        load_recipe(tmp_path / "twice.yaml")
    # an unquoted open range is a YAML mapping inside a mapping: the message says to quote it
    (tmp_path / "open.yaml").write_text(
        f"model: {stories260k_dir}\nsteps:\n  - slice:\n      drop: -2:\n"
    )
    with pytest.raises(ValueError, match="(?s)not valid YAML.*must be quoted, as in drop: '-4:'"):
        load_recipe(tmp_path / "open.yaml")
    with pytest.raises(ValueError, match="unknown key\\(s\\) 'outdir'"):
        load_recipe({"model": str(stories260k_dir), "steps": [], "outdir": "x"})
    with pytest.raises(ValueError, match="'model' .* is required"):
        load_recipe({"steps": [{"slice": {"drop": "1"}}]})
    with pytest.raises(ValueError, match="no output folder"):
        apply_recipe({"model": str(stories260k_dir), "steps": [{"slice": {"drop": "1"}}]})
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        apply_recipe(
            {"model": str(stories260k_dir), "steps": [{"slice": {"drop": "1"}}]},
            out=tmp_path / "taken",
        )


def test_failure_in_a_later_step_leaves_nothing(stories260k_dir: Path, tmp_path: Path):
    # statically fine (the models' settings are compared when the step opens them), but the
    # other model's layers were trained with another norm epsilon
    other = tmp_path / "other"
    other.mkdir()
    for file in stories260k_dir.iterdir():
        (other / file.name).symlink_to(file.resolve())
    (other / "config.json").unlink()
    config = json.loads((stories260k_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    slices = [
        {"sources": [{"layer_range": [0, 2]}]},
        {"sources": [{"model": str(other), "layer_range": [2, 5]}]},
    ]
    recipe = {
        "model": str(stories260k_dir),
        "steps": [{"slice": {"drop": "0"}}, {"slice": {"slices": slices}}],
    }
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="step 2 \\(slice\\): .*different rms_norm_eps"):
        apply_recipe(recipe, out=out, progress=False)
    assert not out.exists() and leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------------------ docs/recipes
RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"


def test_documented_recipes_use_only_known_settings():
    from slimstack.depth.recipe import RECIPE_KEYS, STEP_KEYS

    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 2
    for file in files:
        raw = yaml.safe_load(file.read_text())
        assert set(raw) <= set(RECIPE_KEYS), file.name
        for step in raw["steps"]:
            ((op, params),) = step.items()
            assert set(params) <= set(STEP_KEYS[op]), (file.name, op)


def test_documented_stories260k_recipe_checks_out(stories260k_dir: Path):
    """Its paths resolve from the recipe's folder and every step passes the checks that run
    before any work (running it is test_slice_prune_eval_recipe at a smaller scale)."""
    from slimstack.depth.recipe import check_recipe

    recipe = load_recipe(RECIPES / "stories260K-4-of-5-layers-wanda24.yaml")
    assert recipe.model.resolve() == stories260k_dir.resolve()
    assert [s.op for s in recipe.steps] == ["slice", "prune", "eval"]
    assert recipe.steps[2].params["text"].name == "test.txt"
    check_recipe(recipe)


def _binary_text(stories260k_dir: Path) -> str:
    return str(stories260k_dir / "model.safetensors")


LATER_STEP_MISTAKES = {
    "exclude typo": (
        {"prune": {"method": "magnitude", "exclude": "mlp.down_prj"}},
        "step 2 \\(prune\\): no linear layer matches --exclude 'mlp.down_prj'",
    ),
    "glob past the sliced depth": (
        {"prune": {"method": "magnitude", "include": ["model.layers.3.*"]}},
        "step 2 \\(prune\\): no linear layer matches --include 'model.layers.3.\\*'",
    ),
    "binary calib": (
        {"prune": {"method": "wanda", "calib": _binary_text, "seqlen": 64}},
        "step 2 \\(prune\\): .*not (a text file|UTF-8)",
    ),
    "pattern the shapes cannot take": (
        {"prune": {"method": "magnitude", "sparsity": "4:8"}},
        "step 2 \\(prune\\): .*in_features 172 is not divisible by M=8",
    ),
    "calibration windows past the context": (
        {"prune": {"method": "wanda", "calib": __file__, "seqlen": 4096}},
        "step 2 \\(prune\\): seqlen 4096 exceeds the model's context \\(512 tokens\\)",
    ),
    "eval windows": (
        {"eval": {"text": __file__, "max_windows": 0}},
        "step 2 \\(eval\\): max_windows must be a positive integer, got 0",
    ),
    "eval seqlen past the context": (
        {"eval": {"text": __file__, "seqlen": 4096}},
        "step 2 \\(eval\\): seqlen must be in \\[2, 512\\]",
    ),
    "binary eval text": (
        {"eval": {"text": _binary_text}},
        "step 2 \\(eval\\): .*not (a text file|UTF-8)",
    ),
}


@pytest.mark.parametrize("case", list(LATER_STEP_MISTAKES))
def test_mistakes_in_a_step_after_a_slice_are_found_before_any_step_runs(
    stories260k_dir: Path, case: str
):
    """check_recipe (run before the first step) finds them: before, the slice ran in full and
    the mistake surfaced only when the step holding it began."""
    from slimstack.depth.recipe import check_recipe, load_recipe

    step, message = LATER_STEP_MISTAKES[case]
    ((op, params),) = step.items()
    params = {k: v(stories260k_dir) if callable(v) else v for k, v in params.items()}
    # drop 0:3 of stories260K's 5 layers: the later step sees 2 (model.layers.0 and .1)
    raw = {"model": str(stories260k_dir), "steps": [{"slice": {"drop": "0:3"}}, {op: params}]}
    with pytest.raises(ValueError, match=message):
        check_recipe(load_recipe(raw))


# ------------------------------------------------------------------------------ slice settings
def test_unquoted_layer_ranges_in_yaml_are_the_ranges_typed(stories260k_dir: Path, tmp_path: Path):
    """YAML 1.1 reads an unquoted 1:3 as the base-60 integer 63 and 3 as an integer: before,
    `drop: 1:3` failed with "'int' object is not iterable", and `keep: [1:3]` named layer 63
    (on a deep enough model, silently another layer)."""
    text = f"model: {stories260k_dir}\nsteps:\n  - slice:\n      drop: 1:3\n"
    assert load_recipe_text(tmp_path, text).steps[0].params["drop"] == "1:3"
    recipe = load_recipe_text(tmp_path, text.replace("drop: 1:3", "keep: [1:3, 4]"))
    assert recipe.steps[0].params["keep"] == ["1:3", "4"]
    report = apply_recipe(recipe, out=tmp_path / "kept", progress=False)
    assert read_metadata(report.output)["steps"][0]["keep"] == "1:3,4"
    recipe = load_recipe_text(tmp_path, text.replace("drop: 1:3", "drop: 3"))
    report = apply_recipe(recipe, out=tmp_path / "dropped", progress=False)
    assert read_metadata(report.output)["steps"][0]["keep"] == "0:3,4"


def load_recipe_text(folder: Path, text: str):
    path = folder / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_upscaling_then_dropping_is_checked_at_the_upscaled_depth(
    stories260k_dir: Path, tmp_path: Path
):
    """Before, a config / inline slices step left the checked depth at the source's: a drop of
    layers the up-scaled model has (6:8 of 8) was refused as out of range, and a drop past a
    down-sliced config ran the config step first."""
    from slimstack.depth.recipe import check_recipe

    upscale = {
        "slices": [{"sources": [{"layer_range": [0, 4]}]}, {"sources": [{"layer_range": [1, 5]}]}]
    }
    recipe = {
        "model": str(stories260k_dir),
        "steps": [{"slice": upscale}, {"slice": {"drop": "6:8"}}],
    }
    report = apply_recipe(recipe, out=tmp_path / "up", progress=False)
    meta = read_metadata(report.output)
    assert [e["layer"] for e in meta["layer_map"]] == [0, 1, 2, 3, 1, 2]
    config = tmp_path / "two.yaml"
    config.write_text(
        yaml.safe_dump(
            {"slices": [{"sources": [{"layer_range": [0, 2]}]}], "merge_method": "passthrough"}
        )
    )
    for first in ({"slices": [{"sources": [{"layer_range": [0, 2]}]}]}, {"config": str(config)}):
        recipe = {
            "model": str(stories260k_dir),
            "steps": [{"slice": first}, {"slice": {"drop": "3"}}],
        }
        with pytest.raises(
            ValueError, match="step 2 \\(slice\\): layer 3 is out of range: the model has 2"
        ):
            check_recipe(load_recipe(recipe))
    past = {
        "slices": [{"sources": [{"layer_range": [0, 2]}]}, {"sources": [{"layer_range": [1, 3]}]}]
    }
    recipe = {"model": str(stories260k_dir), "steps": [{"slice": {"drop": "0:2"}}, {"slice": past}]}
    check_recipe(load_recipe(recipe))  # 3 layers left: [1, 3) fits
    past["slices"][1]["sources"][0]["layer_range"] = [1, 4]
    with pytest.raises(
        ValueError, match="step 2 \\(slice\\): slices\\[1\\]: layer_range \\[1, 4\\].*0..2 here"
    ):
        check_recipe(load_recipe(recipe))
    # a config file naming only another model: its run refused it after the steps before
    other = tmp_path / "other.yaml"
    other.write_text(
        yaml.safe_dump(
            {
                "slices": [{"sources": [{"model": str(stories260k_dir), "layer_range": [0, 2]}]}],
                "merge_method": "passthrough",
            }
        )
    )
    recipe = {
        "model": str(stories260k_dir),
        "steps": [{"slice": {"drop": "0"}}, {"slice": {"config": str(other)}}],
    }
    with pytest.raises(
        ValueError, match="step 2 \\(slice\\): the config takes no layers from the model"
    ):
        check_recipe(load_recipe(recipe))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"drop": "1", "tokenizer_source": "base"}, "'tokenizer_source' cannot go with drop"),
        ({"drop": "1", "merge_method": "slerp"}, "'merge_method' cannot go with drop"),
        ({"keep": "0:2", "n": 2}, "'n' cannot go with keep"),
        ({"keep": "0:2", "calib": __file__}, "'calib' cannot go with keep"),
        (
            {"slices": [{"sources": [{"layer_range": [0, 2]}]}], "seqlen": 8},
            "'seqlen' cannot go with slices",
        ),
        ({"criterion": "snr", "n": 1, "base_model": "x"}, "'base_model' cannot go with criterion"),
    ],
)
def test_slice_settings_the_mode_ignores_are_refused(
    stories260k_dir: Path, tmp_path: Path, settings, message
):
    """Before, tokenizer_source / merge_method beside drop: were silently ignored (the output
    had the source's tokenizer), and n beside keep: failed only once the step ran."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="step 1 \\(slice\\): " + message):
        apply_recipe(
            {"model": str(stories260k_dir), "steps": [{"slice": settings}]}, out=out, progress=False
        )
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_step_settings_that_are_not_a_mapping(stories260k_dir: Path):
    with pytest.raises(ValueError, match="step 1 \\(slice\\): its settings must be a mapping"):
        load_recipe({"model": str(stories260k_dir), "steps": [{"slice": ["drop", "1"]}]})


def test_output_cannot_replace_a_model_a_slice_config_reads(stories260k_dir: Path, tmp_path: Path):
    """Before, only the recipe's model and files were guarded: --overwrite onto a model that
    inline slices read replaced (deleted) it."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(stories260k_dir, other)
    slices = [
        {"sources": [{"layer_range": [0, 2]}]},
        {"sources": [{"model": str(other), "layer_range": [2, 4]}]},
    ]
    recipe = {"model": str(stories260k_dir), "steps": [{"slice": {"slices": slices}}]}
    with pytest.raises(ValueError, match="would replace the input"):
        apply_recipe(recipe, out=other, overwrite=True, progress=False)
    assert Checkpoint.open(other).num_layers == 5 and leftovers(tmp_path, "other") == []


def test_a_bad_slice_dtype_is_found_before_any_step_runs(stories260k_dir: Path):
    """Before, the slice step ran its layers and only then refused the dtype."""
    from slimstack.depth.recipe import check_recipe

    raw = {"model": str(stories260k_dir), "steps": [{"slice": {"drop": 1, "dtype": "int8"}}]}
    with pytest.raises(ValueError, match="step 1 \\(slice\\): dtype 'int8' is not one of"):
        check_recipe(load_recipe(raw))
    check_recipe(load_recipe({**raw, "steps": [{"slice": {"drop": 1, "dtype": "bf16"}}]}))
