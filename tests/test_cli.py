"""The `slimstack` command line: help texts, errors as one clear line, real runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# ----------------------------------------------------------------------------- guards
def _model_copy(stories260k_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models" / "mine"
    shutil.copytree(stories260k_dir, copy)
    for file in copy.iterdir():
        file.chmod(0o644)  # the shared folder is read-only; a copy a user owns is not
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["itself", "its parent"])
@pytest.mark.parametrize("command", ["prune", "analyze", "slice", "apply", "demo"])
def test_no_command_writes_over_its_own_input(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys, command, where
) -> None:
    """--out naming the input model (or a folder holding it) with --overwrite would delete
    the model once the output is renamed into place: refused up front, the model intact."""
    model = _model_copy(stories260k_dir, tmp_path)
    out = model if where == "itself" else model.parent
    before = _snapshot(model)
    argv = {
        "prune": ["prune", str(model), "--method", "magnitude", "--out", str(out)],
        "analyze": ["analyze", str(model), "--criteria", "snr", "--out", str(out)],
        "slice": ["slice", str(model), "--drop", "1", "--out", str(out)],
        "demo": ["demo", "--model", str(model), "--calib", str(wikitext_dir / "valid.txt"),
                 "--text", str(wikitext_dir / "test.txt"), "--out", str(out)],
    }.get(command)  # fmt: skip
    if command == "apply":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"model: {model}\nout: {out}\nsteps:\n  - slice: {{drop: '1'}}\n")
        argv = ["apply", str(recipe)]
    code = main([*argv, "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "would replace the input" in err and "Traceback" not in err
    assert _snapshot(model) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-windows", "0"], "max_windows must be a positive integer, got 0"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ],
)
def test_eval_refuses_bad_numbers_and_devices(
    stories260k_dir: Path, wikitext_dir: Path, capsys, argv, message
) -> None:
    code = main(["eval", str(stories260k_dir), "--text", str(wikitext_dir / "test.txt"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_a_missing_gpu_is_a_clear_error(stories260k_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["prune", str(stories260k_dir), "--method", "magnitude", "--device", "cuda",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "use device='cpu'" in err and not (tmp_path / "out").exists()


def test_eval_refuses_a_reference_with_another_vocabulary(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys
) -> None:
    from conftest import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", vocab_size=256)
    code = main(["eval", str(stories260k_dir), "--text", str(wikitext_dir / "test.txt"),
                 "--reference", str(other), "--max-windows", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary of 256 tokens but" in err


def test_prune_refuses_seqlen_zero(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys
):
    code = main(["prune", str(stories260k_dir), "--method", "wanda", "--calib",
                 str(wikitext_dir / "valid.txt"), "--seqlen", "0", "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and not (tmp_path / "o").exists()


def test_sigterm_unwinds_like_ctrl_c(monkeypatch, capsys) -> None:
    """A SIGTERM (timeout, a scheduler) raises KeyboardInterrupt in the command, so cleanup
    runs; the previous handler is back afterwards."""
    import signal
    import time

    from slimstack import cli

    def terminated(args) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "cmd_info", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
