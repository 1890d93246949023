"""The `slimstack` command line: help texts, errors as one clear line, real runs."""

from __future__ import annotations

import json
import os
import re
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


@pytest.mark.parametrize("method, noted", [("magnitude", True), ("wanda", False)])
def test_prune_notes_that_magnitude_ignores_calib(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys, method, noted
) -> None:
    code = main(["prune", str(stories260k_dir), "--method", method, "--calib",
                 str(wikitext_dir / "valid.txt"), "--nsamples", "2", "--seqlen", "32",
                 "--device", "cpu", "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and ("--calib is ignored" in err) == noted


def test_info_json_runs_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slimstack.cli", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    facts = json.loads(proc.stdout)
    assert facts["torch"] == torch.__version__ and facts["torch_cuda"] == torch.version.cuda
    # the command reports what this install has, as the library itself sees it
    from slimstack.ops.backends import available_backends

    assert facts["backends"] == available_backends()


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


def _exit_code(argv: list[str]) -> int:
    """main()'s return code, or argparse's exit code for a flag it refused itself."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-windows", "0"], "argument --max-windows: must be >= 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--seqlen", "1"], "argument --seqlen: must be >= 2, got 1"),
        (["--seqlen", "100000"], "seqlen must be in [2, 512] (the model's context), got 100000"),
        (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ],
)
def test_eval_refuses_bad_numbers_and_devices(
    stories260k_dir: Path, wikitext_dir: Path, capsys, argv, message
) -> None:
    code = _exit_code(
        ["eval", str(stories260k_dir), "--text", str(wikitext_dir / "test.txt"), *argv]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "command, flag, value, message",
    [
        ("generate", "--top-p", "1.5", "must be in (0.0, 1.0], got 1.5"),
        ("generate", "--top-p", "0", "must be in (0.0, 1.0], got 0"),
        ("generate", "--top-k", "0", "must be >= 1, got 0"),
        ("generate", "--temperature", "-0.5", "must be in [0.0, inf), got -0.5"),
        ("generate", "--temperature", "nan", "must be in [0.0, inf), got nan"),
        ("generate", "--max-new-tokens", "0", "must be >= 1, got 0"),
        ("generate", "--top-k", "two", "expected an integer, got 'two'"),
        ("prune", "--nsamples", "0", "must be >= 1, got 0"),
        ("analyze", "--memory-mb", "0", "must be in (0.0, inf), got 0"),
        ("analyze", "--taylor-keep-first", "-1", "must be >= 0, got -1"),
        ("slice", "--n", "0", "must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_refused_naming_the_flag_before_any_work(
    stories260k_dir: Path, tmp_path: Path, capsys, command, flag, value, message
) -> None:
    out = tmp_path / "out"
    argv = {
        "generate": ["generate", str(stories260k_dir), "Once"],
        "prune": ["prune", str(stories260k_dir), "--out", str(out)],
        "analyze": ["analyze", str(stories260k_dir), "--out", str(out)],
        "slice": ["slice", str(stories260k_dir), "--out", str(out)],
    }[command]
    code = _exit_code([*argv, flag, value])
    err = capsys.readouterr().err
    assert code == 2 and f"argument {flag}: {message}" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_a_missing_gpu_is_a_clear_error(stories260k_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["prune", str(stories260k_dir), "--method", "magnitude", "--device", "cuda",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        code == 2 and "use device='cpu' (--device cpu)" in err and not (tmp_path / "out").exists()
    )


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
    code = _exit_code(["prune", str(stories260k_dir), "--method", "wanda", "--calib",
                 str(wikitext_dir / "valid.txt"), "--seqlen", "0", "--out", str(tmp_path / "o")])  # fmt: skip
    assert (
        code == 2
        and "argument --seqlen" in capsys.readouterr().err
        and not (tmp_path / "o").exists()
    )


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


# ----------------------------------------------------------------------------- one check for all
def _commands(model: Path, out: Path, calib: Path) -> dict[str, list[str]]:
    """Every command that reads a model folder, as a user would run it."""
    return {
        "prune-magnitude": ["prune", str(model), "--method", "magnitude", "--out", str(out)],
        "prune-wanda": ["prune", str(model), "--calib", str(calib), "--nsamples", "2",
                        "--seqlen", "32", "--out", str(out)],
        "analyze-snr": ["analyze", str(model), "--criteria", "snr", "--out", str(out)],
        "analyze-angular": ["analyze", str(model), "--criteria", "angular", "--calib", str(calib),
                            "--nsamples", "2", "--seqlen", "32", "--out", str(out)],
        "slice": ["slice", str(model), "--drop", "2", "--out", str(out)],
        "eval": ["eval", str(model), "--text", str(calib), "--max-windows", "1"],
    }  # fmt: skip


def _edit(folder: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    if config is not None:
        current = json.loads((folder / "config.json").read_text())
        current.update(config)
        (folder / "config.json").write_text(
            json.dumps({k: v for k, v in current.items() if v is not None})
        )
    if tensors is not None:
        weights = load_file(folder / "model.safetensors")
        weights.update(tensors)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


MISFITS = {
    "q_proj": (
        {"tensors": {"model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 60)}},
        r"model\.layers\.1\.self_attn\.q_proj\.weight has shape \[64, 60\], but config\.json "
        r"implies \[64, 64\]",
    ),
    "hidden_size": (
        {"config": {"hidden_size": 128}},
        r"model\.embed_tokens\.weight has shape \[512, 64\], but config\.json implies \[512, 128\]",
    ),
    "stray_bias": (
        {"tensors": {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}},
        r"the weights hold model\.layers\.0\.self_attn\.o_proj\.bias, but config\.json implies "
        r"no bias there",
    ),
}


@pytest.mark.parametrize("command", list(_commands(Path(), Path(), Path())))
@pytest.mark.parametrize("misfit", list(MISFITS))
def test_weights_that_do_not_fit_the_config_are_refused_by_every_command(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys, misfit, command
) -> None:
    """Before: magnitude pruning and slicing wrote a broken folder, the calibrated passes
    died in a size-mismatch traceback deep inside transformers."""
    edit, message = MISFITS[misfit]
    model = _edit(_model_copy(stories260k_dir, tmp_path), **edit)
    argv = _commands(model, tmp_path / "out", wikitext_dir / "valid.txt")[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no output, no temp folder


REFUSED_CONFIGS = {
    # the engine's parser refuses these; transformers' layers would have run them
    "longrope": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                                     "original_max_position_embeddings": 256}},
    "gelu": {"hidden_act": "gelu"},
    "kv_heads": {"num_key_value_heads": 3},
    "no_context": {"max_position_embeddings": None},
    # transformers 5 refuses these (the engine would derive the factor): a KeyError traceback
    # from inside the pass before, or from the engine's tokenizer loading
    "yarn_no_factor": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                           "original_max_position_embeddings": 256}},
    "llama3_no_freqs": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0,
                                            "factor": 2.0}},
}  # fmt: skip


@pytest.mark.parametrize("command", list(_commands(Path(), Path(), Path())))
@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_offline_tools_refuse_what_the_engine_refuses_in_its_words(
    stories260k_dir: Path, wikitext_dir: Path, tmp_path: Path, capsys, case, command
) -> None:
    """Before: prune, analyze and slice ran transformers' layers on the first four and wrote
    folders that slimstack.load then refused (after the work was done); the last two died
    in a KeyError traceback, in load() as well. Now one check, one message, for all."""
    from slimstack.engine.loader import load

    model = _edit(_model_copy(stories260k_dir, tmp_path), config=REFUSED_CONFIGS[case])
    with pytest.raises(ValueError) as refused:
        load(model, device="cpu")
    code = main(_commands(model, tmp_path / "out", wikitext_dir / "valid.txt")[command])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"slimstack {command.split('-')[0]}: error: {refused.value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def _binary_files(stories260k_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(128, 256)) * 4)  # no NUL, not UTF-8
    return {
        # resolved: the commands name the file they read (../shared may be a link)
        "safetensors": (
            (stories260k_dir / "model.safetensors").resolve(),
            "not a text file (NUL byte",
        ),
        "noise": (noise, "not UTF-8 text (invalid byte 0x80 at offset 0)"),
    }


@pytest.mark.parametrize("kind", ["safetensors", "noise"])
@pytest.mark.parametrize("command", ["prune", "eval", "analyze"])
def test_binary_text_files_are_refused_by_name(
    stories260k_dir: Path, tmp_path: Path, capsys, kind, command
) -> None:
    """Before: decoded with replacement characters and tokenized as if it were text."""
    text, message = _binary_files(stories260k_dir, tmp_path)[kind]
    out = tmp_path / "out"
    argv = {
        "prune": ["prune", str(stories260k_dir), "--calib", str(text), "--seqlen", "16", "--out", str(out)],
        "eval": ["eval", str(stories260k_dir), "--text", str(text)],
        "analyze": ["analyze", str(stories260k_dir), "--calib", str(text), "--seqlen", "16",
                    "--out", str(out)],
    }[command]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"{text}: {message}" in err and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_full_disk_is_one_line_and_leaves_no_temp_folder(
    stories260k_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import errno

    import slimstack.checkpoint_writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slimstack.checkpoint_writer, "save_file", full)
    out = tmp_path / "out"
    code = main(["prune", str(stories260k_dir), "--method", "magnitude", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_info_text_says_triton_needs_cuda(monkeypatch) -> None:
    """On a machine without CUDA, Triton shows as installed but not usable; with CUDA, plain."""
    from slimstack.info import format_info

    facts = {"slimstack": "0", "python": "3", "torch": "2", "gpu": None,
             "backends": {"cuda_device": False, "triton": "3.9.0"}}  # fmt: skip
    assert "3.9.0 (installed; its kernels need a CUDA device)" in format_info(facts)
    facts["backends"]["cuda_device"] = True
    assert format_info(facts).splitlines()[-1].split() == ["triton", "3.9.0"]


def test_a_misspelt_forced_backend_is_refused_by_every_command(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLIMSTACK_BACKEND", "cdua")
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimstack info: error: SLIMSTACK_BACKEND='cdua' is not a backend")


@pytest.mark.parametrize("content", [None, "{not json", '{"version": 1, "rules": [{"op": 3}]}'])
def test_a_bad_dispatch_table_is_one_line_from_every_command(tmp_path: Path, content) -> None:
    """The table is read when slimstack.ops is first imported: a fresh process, so the
    import happens inside the command."""
    table = tmp_path / "table.json"
    if content is not None:
        table.write_text(content)
    env = {**os.environ, "SLIMSTACK_DISPATCH_TABLE": str(table)}
    proc = subprocess.run(
        [sys.executable, "-m", "slimstack.cli", "info"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"slimstack info: error: dispatch table {table}")


def test_dtype_flags_take_the_short_names_and_refuse_others(capsys):
    args = build_parser().parse_args(["slice", "m", "--drop", "1", "--dtype", "bf16", "--out", "o"])
    assert args.dtype == "bfloat16"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["slice", "m", "--drop", "1", "--dtype", "int8", "--out", "o"])
    assert info.value.code == 2
    assert "argument --dtype: dtype 'int8' is not one of float32, float16, bfloat16" in (
        capsys.readouterr().err
    )
