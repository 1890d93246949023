"""`slimstack analyze` end to end on stories260K, the report, and the depth CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import slimstack
from slimstack.cli import main
from slimstack.depth.analyze import analyze

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, shared_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("calib") / "valid.txt"
    path.write_text((shared_dir / "data" / "wikitext-2" / "valid.txt").read_text()[:20000])
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory, stories260k_dir: Path, calib_file: Path):
    out = tmp_path_factory.mktemp("analysis") / "report"
    return analyze(stories260k_dir, calib_file, out, nsamples=4, seqlen=32, progress=False)


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"scores.json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_scores_json_has_all_five_criteria(report):
    scores = _strict_json((report.output / "scores.json").read_text())
    assert list(scores["criteria"]) == ["angular", "block_influence", "taylor", "perplexity", "snr"]
    for name, result in scores["criteria"].items():
        assert len(result["scores"]) == 5, name
        assert sorted(result["drop_order"]) == (
            [1, 2, 3] if name == "taylor" else [0, 1, 2, 3, 4]
        ), name
    angular = scores["criteria"]["angular"]
    assert [len(angular["distances"][str(n)]) for n in range(1, 6)] == [5, 4, 3, 2, 1]
    assert all(0 < d < 1 for row in angular["distances"].values() for d in row)
    assert angular["token"] == "last"
    ppl = scores["criteria"]["perplexity"]
    assert all(p > 1 for p in ppl["scores"]) and ppl["baseline"] > 1
    assert scores["criteria"]["snr"]["module"] == "self_attn.v_proj"
    assert scores["settings"]["calibration"]["nsamples"] == 4
    assert scores["settings"]["calibration"]["seqlen"] == 32
    assert scores["model"]["num_hidden_layers"] == 5 and scores["model"]["weights_sha256"]
    assert scores["agreement"][0]["n"] == 1


def test_plots_and_report_exist(report):
    names = {p.name for p in report.plots}
    assert names == {
        "angular_heatmap.png",
        "angular.png",
        "block_influence.png",
        "taylor.png",
        "perplexity.png",
        "snr.png",
    }
    for plot in report.plots:
        data = plot.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, plot.name
    text = (report.output / "report.md").read_text()
    for heading in ("Angular distance", "Block Influence", "Taylor+", "perplexity", "SNR"):
        assert heading in text
    assert "Where the criteria agree" in text
    assert "![angular_heatmap](plots/angular_heatmap.png)" in text
    assert "angular" in report.summary()


def test_analysis_drives_a_criterion_slice(report, stories260k_dir: Path, tmp_path: Path):
    out = tmp_path / "sliced"
    slimstack.slice(stories260k_dir, out, criterion="angular", n=2, scores=report.output)
    best = report.scores["criteria"]["angular"]["best_block"]["2"]
    meta = json.loads((out / "slimstack.json").read_text())
    kept = [e["layer"] for e in meta["layer_map"]]
    assert kept == [i for i in range(5) if not best["start"] <= i < best["end"]]


def test_public_names():
    from slimstack.depth.analyze import analyze as direct
    from slimstack.depth.slicing import slice_model

    assert slimstack.analyze is direct and slimstack.slice is slice_model


@pytest.mark.parametrize("first", ["submodules", "functions"])
def test_public_functions_survive_their_namesake_submodules(first):
    """slimstack.prune / .evaluate / .info share their names with submodules; importing a
    submodule (before or after the function is used) must not leave a non-callable module
    under the public name. Run in a fresh interpreter: the import order is the point."""
    submodules = "import slimstack.prune.patterns, slimstack.evaluate, slimstack.info; "
    calls = (
        "import inspect; "
        "assert 'method' in inspect.signature(slimstack.prune).parameters; "
        "assert 'reference' in inspect.signature(slimstack.evaluate).parameters; "
        "assert isinstance(slimstack.info(), dict); "
        "import slimstack.prune.patterns as p; assert p.parse_pattern; "
    )
    code = "import slimstack; " + (
        submodules + calls if first == "submodules" else calls + submodules + calls
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_snr_only_needs_no_calibration_and_mean_token_mode(
    stories260k_dir: Path, calib_file: Path, tmp_path: Path
):
    result = analyze(stories260k_dir, None, tmp_path / "snr", criteria="snr", progress=False)
    assert list(result.scores["criteria"]) == ["snr"]
    assert result.scores["settings"]["calibration"] is None
    mean = analyze(
        stories260k_dir,
        calib_file,
        tmp_path / "mean",
        criteria=["angular", "bi"],
        token="mean",
        nsamples=2,
        seqlen=16,
        progress=False,
    )
    assert mean.scores["criteria"]["angular"]["token"] == "mean"
    assert list(mean.scores["criteria"]) == ["angular", "block_influence"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criteria": "angular,cosine"}, "unknown criterion 'cosine'"),
        ({"calib": None}, "need calibration text"),
        ({"seqlen": 4096}, "seqlen 4096 exceeds the model's context \\(512 tokens\\)"),
        ({"token": "first"}, "--token must be one of last, mean"),
        ({"dtype": "int8"}, "dtype .int8. is not one of"),
        ({"seqlen": "16"}, "seqlen must be an integer, got '16'"),  # a recipe's quoted number
        # before: 0 and -1 ran one window at a time; nan died in int() with no word of why
        ({"budget_mb": 0}, r"memory budget \(--memory-mb\) must be a positive number, got 0"),
        ({"budget_mb": -1.0}, "memory budget"),
        ({"budget_mb": float("nan")}, "must be a positive number, got nan"),
    ],
)
def test_analyze_refusals_write_nothing(
    stories260k_dir: Path, calib_file: Path, tmp_path: Path, kwargs, message
):
    settings = {"calib": calib_file, "nsamples": 2, "seqlen": 16, **kwargs}
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=message):
        analyze(stories260k_dir, out=out, progress=False, **settings)
    assert list(tmp_path.iterdir()) == []


def test_analyze_refuses_an_existing_folder(stories260k_dir: Path, tmp_path: Path):
    (tmp_path / "report").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        analyze(stories260k_dir, None, tmp_path / "report", criteria="snr")
    overwritten = analyze(
        stories260k_dir, None, tmp_path / "report", criteria="snr", overwrite=True
    )
    assert (overwritten.output / "scores.json").is_file()


# ------------------------------------------------------------------------------ CLI
def test_cli_analyze_slice_apply(stories260k_dir: Path, tmp_path: Path, capsys):
    assert (
        main(["analyze", str(stories260k_dir), "--criteria", "snr", "--out", str(tmp_path / "a")])
        == 0
    )
    assert "snr" in capsys.readouterr().out
    assert (
        main(
            [
                "slice",
                str(stories260k_dir),
                "--drop",
                "1",
                "--drop",
                "3:5",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert "5 -> 2 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 2

    config = tmp_path / "up.yaml"
    config.write_text(
        f"slices:\n  - sources:\n      - model: {stories260k_dir}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {stories260k_dir}\n        layer_range: [2, 5]\n"
        "merge_method: passthrough\n"
    )
    assert main(["slice", "--config", str(config), "--out", str(tmp_path / "up")]) == 0
    assert "5 -> 6 layers" in capsys.readouterr().out

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {stories260k_dir}\nsteps:\n  - slice:\n      drop: '4'\n"
        "  - prune:\n      method: magnitude\n      sparsity: '2:4'\n"
    )
    assert main(["apply", str(recipe), "--out", str(tmp_path / "r")]) == 0
    assert "applied 2 steps" in capsys.readouterr().out


def test_cli_errors_are_one_line(stories260k_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "x"
    assert main(["slice", str(stories260k_dir), "--drop", "2:9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimstack slice: error: layer range '2:9' is out of range")
    assert not out.exists()
    assert main(["apply", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --drop and --keep are exclusive
        main(["slice", str(stories260k_dir), "--drop", "1", "--keep", "2", "--out", str(out)])
    assert "not allowed with argument" in capsys.readouterr().err
