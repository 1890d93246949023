"""The `slimstack` command line: help texts, errors as one clear line, real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimstack.cli import build_parser, main


def test_every_subcommand_documents_its_options(capsys) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"prune", "eval", "info", "demo"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:  # noqa: SLF001
            if action.option_strings and action.dest != "help":
                assert action.help, f"slimstack {name} {action.option_strings[0]} has no help"


def test_prune_help_lists_patterns(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["prune", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--sparsity" in out and "2:4" in out and "--calib" in out and "--overwrite" in out


def test_bad_sparsity_is_one_line_and_writes_nothing(
    stories260k_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "prune",
            str(stories260k_dir),
            "--method",
            "magnitude",
            "--sparsity",
            "2x4",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("slimstack prune: error: unrecognised sparsity '2x4'")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_prune_then_eval(stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            str(stories260k_dir),
            "--method",
            "wanda",
            "--sparsity",
            "2:4",
            "--calib",
            str(wikitext_dir / "valid.txt"),
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "pruned 35 modules with wanda to 2:4" in capsys.readouterr().out
    code = main(
        [
            "eval",
            str(out),
            "--text",
            str(wikitext_dir / "test.txt"),
            "--reference",
            str(stories260k_dir),
            "--seqlen",
            "64",
            "--max-windows",
            "4",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 4 * 63
    assert result["perplexity"] > result["reference_perplexity"] > 1.0
    assert result["kl"] > 0.0 and 0.0 <= result["top1_agreement"] <= 1.0
    # the output exists: a second run without --overwrite is refused
    code = main(["prune", str(stories260k_dir), "--method", "magnitude", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_info_json_runs_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slimstack.cli", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    facts = json.loads(proc.stdout)
    assert facts["torch"] and "backends" in facts
    assert facts["backends"]["cpu_extension"] in (True, False)


def test_demo_prints_table(stories260k_dir: Path, wikitext_dir: Path, capsys) -> None:
    code = main(
        [
            "demo",
            "--model",
            str(stories260k_dir),
            "--calib",
            str(wikitext_dir / "valid.txt"),
            "--text",
            str(wikitext_dir / "test.txt"),
            "--max-windows",
            "2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    table, served = out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[-4].split()[:2] == ["model", "perplexity"]
    assert lines[-2].startswith("dense") and lines[-1].startswith("wanda 2:4")
    # Both models were served by the engine: the dense one holds only dense linears, the
    # pruned one only packed 2:4 ones (under 0.6x the bytes), and each continued the prompt.
    dense_head, dense_text, pruned_head, pruned_text = served.splitlines()
    assert dense_head.startswith("[dense]") and "sparse24" not in dense_head
    assert pruned_head.startswith("[wanda 2:4]") and "dense;" not in pruned_head
    ratio = float(pruned_head.split("; ")[1].split("x")[0])
    assert 0.5 < ratio < 0.6
    for text in (dense_text, pruned_text):
        assert text.startswith("  Once upon a time") and len(text) > len("  Once upon a time")
