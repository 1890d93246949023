"""The `slimstack` command: one thin function per subcommand, each calling the Python API."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence

from slimstack.dtype_names import canonical_dtype

Handler = Callable[[argparse.Namespace], int]


# Range checks at the flag, so a bad value is refused naming the flag (argparse prefixes
# "argument --top-p:") before anything loads; the Python API checks the same ranges itself.
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def _float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise argparse.ArgumentTypeError(f"must be in {left}{low}, {high}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _dtype(text: str) -> str:
    return canonical_dtype(text, argparse.ArgumentTypeError)


_dtype.__name__ = "dtype"

POSITIVE = _int_at_least(1)
NONNEGATIVE = _int_at_least(0)
SEQLEN = _int_at_least(2)  # a window needs a token to predict from and one to predict


# --------------------------------------------------------------------------- prune
def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a checkpoint's linear layers (magnitude, Wanda, SparseGPT)",
        description="Prune every linear layer of the decoder blocks and write a standard "
        "Hugging Face folder plus slimstack.json. Embeddings and lm_head stay dense.",
    )
    p.add_argument("model", help="Hugging Face model folder (safetensors)")
    p.add_argument(
        "--method",
        default="wanda",
        choices=["magnitude", "wanda", "sparsegpt"],
        help="pruning method (default wanda)",
    )
    p.add_argument(
        "--sparsity",
        default="2:4",
        help="N:M pattern with 0 < N < M (2:4, 4:8, 1:4) or a ratio in (0, 1) (0.5, 50%%)",
    )
    p.add_argument("--calib", help="calibration text: plain text or JSONL with a 'text' field")
    p.add_argument(
        "--nsamples", type=POSITIVE, default=128, help="calibration windows (default 128)"
    )
    p.add_argument(
        "--seqlen", type=SEQLEN, help="tokens per window (default: 2048, or the model's context)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the window sampling")
    p.add_argument("--include", action="append", help="glob of modules to prune (repeatable)")
    p.add_argument("--exclude", action="append", help="glob of modules to keep dense (repeatable)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from slimstack.prune.driver import prune

    if args.method == "magnitude" and args.calib:
        # said, not refused: a script may pass one --calib to every method it tries
        print(
            "slimstack prune: note: magnitude uses no calibration; --calib is ignored",
            file=sys.stderr,
        )
    report = prune(
        args.model,
        args.out,
        method=args.method,
        sparsity=args.sparsity,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        include=args.include,
        exclude=args.exclude,
        overwrite=args.overwrite,
        device=args.device,
    )
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a model; KL and top-1 agreement against a reference",
        description="Perplexity on non-overlapping windows of a text file; with --reference, "
        "KL divergence and top-1 agreement against it on the same windows.",
    )
    p.add_argument("model", help="Hugging Face model folder")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--reference", help="dense source model folder to compare against")
    p.add_argument("--seqlen", type=SEQLEN, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="windows per forward pass")
    p.add_argument("--max-windows", type=POSITIVE, help="evaluate only the first N windows")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from slimstack.evaluate import evaluate

    result = evaluate(
        args.model,
        args.text,
        reference=args.reference,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        device=args.device,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


# --------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions and which kernel backends are available")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from slimstack.info import format_info, info

    facts = info()
    print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="prune the built-in default model with Wanda 2:4 and compare it with the dense one",
        description="Prune ../shared/models/stories260K (or --model) with --method to "
        "--sparsity, calibrated on wikitext-2 valid, evaluate on wikitext-2 test against the "
        "dense model, print the table, then serve both models from slimstack's engine (sparse "
        "linears packed) and print what each generates.",
    )
    p.add_argument("--model", help="model folder (default: ../shared/models/stories260K)")
    p.add_argument("--calib", help="calibration text (default: ../shared wikitext-2 valid)")
    p.add_argument("--text", help="evaluation text (default: ../shared wikitext-2 test)")
    p.add_argument(
        "--method",
        default="wanda",
        choices=["magnitude", "wanda", "sparsegpt"],
        help="pruning method (default wanda)",
    )
    p.add_argument("--sparsity", default="2:4", help="N:M pattern or ratio (default 2:4)")
    p.add_argument("--max-windows", type=POSITIVE, help="evaluate only the first N windows")
    p.add_argument("--out", help="keep the pruned folder here (default: a temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--prompt", default=None, help='prompt to continue (default "Once upon a time")')
    p.add_argument(
        "--max-new-tokens",
        type=POSITIVE,
        default=40,
        help="tokens each model generates (default 40)",
    )
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from slimstack.demo import DEFAULT_PROMPT, format_samples, format_table, run_demo

    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    result = run_demo(
        args.model,
        args.calib,
        args.text,
        method=args.method,
        sparsity=args.sparsity,
        max_windows=args.max_windows,
        out=args.out,
        overwrite=args.overwrite,
        prompt=prompt,
        max_new_tokens=args.max_new_tokens,
    )
    print(format_table(result.dense, result.pruned, f"{args.method} {args.sparsity}"))
    print()
    print(format_samples(prompt, result.samples))
    return 0


# --------------------------------------------------------------------------- generate
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="load a (pruned) model into slimstack's engine and stream a continuation",
        description="Load MODEL with sparse linears packed and stream the continuation of "
        "PROMPT to stdout; timings go to stderr.",
    )
    p.add_argument("model", help="Hugging Face model folder (safetensors)")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="default 128")
    p.add_argument(
        "--temperature", type=_float_in(0.0, math.inf), default=0.0, help="0 (default) is greedy"
    )
    p.add_argument("--top-k", type=POSITIVE, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=_float_in(0.0, 1.0, low_open=True),
        help="sample among the most likely tokens up to p",
    )
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", type=_dtype, help="compute dtype: float32, float16 or bfloat16")
    p.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "eager", "graph", "compile"],
        help="decode step: CUDA graph (auto on CUDA), eager (auto on CPU) or torch.compile",
    )
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from slimstack.engine.loader import load

    model = load(args.model, device=args.device, dtype=getattr(torch, args.dtype or "", None))
    stream = model.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stream=True,
        mode=args.mode,
    )
    print(args.prompt, end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    t = stream.result.timings
    print(
        f"[{stream.result.finish_reasons[0]}; prefill {t.prefill_ms:.1f} ms, "
        f"{t.decode_steps} decode steps at {t.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


# --------------------------------------------------------------------------- analyze
def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="score every layer (angular distance, Block Influence, Taylor+, perplexity, SNR)",
        description="Score the decoder layers of MODEL by five depth-pruning criteria and write "
        "REPORT_DIR/scores.json, report.md (rankings, where the criteria agree) and plots/.",
    )
    p.add_argument("model", help="Hugging Face model folder (safetensors)")
    p.add_argument("--calib", help="calibration text (every criterion but snr needs it)")
    p.add_argument("--out", required=True, help="report folder (refused if it exists)")
    p.add_argument(
        "--criteria",
        help="comma-separated subset of angular, bi, taylor, ppl, snr (default: all five)",
    )
    p.add_argument("--nsamples", type=POSITIVE, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=SEQLEN, default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for the window sampling")
    p.add_argument(
        "--token",
        default="last",
        choices=["last", "mean"],
        help="angular distance at the last token (PruneMe, default) or over every token",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        type=_dtype,
        help="compute dtype of the passes: float32 (default), float16 or bfloat16",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="windows per layer call")
    p.add_argument(
        "--memory-mb",
        type=_float_in(0.0, math.inf, low_open=True),
        default=4096,
        help="budget for the hidden states the forward pass keeps (default 4096)",
    )
    p.add_argument(
        "--taylor-keep-first", type=NONNEGATIVE, help="Taylor+ never drops these first layers"
    )
    p.add_argument(
        "--taylor-keep-last", type=NONNEGATIVE, help="Taylor+ never drops these last layers"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from slimstack.depth.analyze import analyze

    result = analyze(
        args.model,
        args.calib,
        args.out,
        criteria=args.criteria,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        token=args.token,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        budget_mb=args.memory_mb,
        taylor_keep_first=args.taylor_keep_first,
        taylor_keep_last=args.taylor_keep_last,
        overwrite=args.overwrite,
    )
    print(result.summary())
    return 0


# --------------------------------------------------------------------------- slice
def _add_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slice",
        help="drop, keep or repeat layers (ranges, mergekit passthrough config, a criterion)",
        description="Write a standard Hugging Face folder with some decoder layers dropped, "
        "kept, reordered or repeated (SOLAR up-scaling), plus slimstack.json with the layer "
        "map. Ranges are Python-style and half-open: 20:28 is layers 20..27.",
    )
    p.add_argument("model", nargs="?", help="model folder (not needed with --config)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--drop",
        action="append",
        help="layers to drop: 20:28, 5, 0:4,8 (repeatable; write --drop=-4: for a leading minus)",
    )
    how.add_argument("--keep", action="append", help="layers to keep, in order (repeatable)")
    how.add_argument("--config", help="mergekit YAML with slices and merge_method: passthrough")
    how.add_argument("--criterion", help="drop what angular, bi, taylor, ppl or snr picks")
    p.add_argument("--n", type=POSITIVE, help="with --criterion: how many layers to drop")
    p.add_argument("--scores", help="with --criterion: an analysis (scores.json or its folder)")
    p.add_argument("--calib", help="with --criterion and no --scores: text to score layers on")
    p.add_argument("--nsamples", type=POSITIVE, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=SEQLEN, default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for the window sampling")
    p.add_argument("--dtype", type=_dtype, help="convert weights: float32, float16 or bfloat16")
    p.add_argument("--device", help="cpu or cuda, for --criterion scoring")
    p.add_argument("--out", required=True, help="output folder (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=cmd_slice)


def cmd_slice(args: argparse.Namespace) -> int:
    from slimstack.depth.slicing import slice_model

    report = slice_model(
        args.model,
        args.out,
        drop=args.drop,
        keep=args.keep,
        config=args.config,
        criterion=args.criterion,
        n=args.n,
        scores=args.scores,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        dtype=args.dtype,
        overwrite=args.overwrite,
        device=args.device,
    )
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- apply
def _add_apply(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="run a recipe: slice, prune and eval steps into one output folder",
        description="Run the steps of RECIPE (YAML: model, out, steps: slice / prune / eval) "
        "and write one folder whose slimstack.json records every step.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--out", help="output folder (default: the recipe's 'out')")
    p.add_argument("--device", help="cpu or cuda (default: the recipe's, else cuda if any)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=cmd_apply)


def cmd_apply(args: argparse.Namespace) -> int:
    from slimstack.depth.recipe import apply_recipe

    report = apply_recipe(args.recipe, out=args.out, overwrite=args.overwrite, device=args.device)
    print(report.summary())
    return 0


# --------------------------------------------------------------------------- main
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prune,
    _add_eval,
    _add_info,
    _add_demo,
    _add_generate,
    _add_analyze,
    _add_slice,
    _add_apply,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimstack",
        description="Sparse inference for pruned LLMs: prune, slice, pack, serve, measure.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def _interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM (timeout, docker stop, a batch scheduler) unwinds like Ctrl-C, so the atomic
    writers' cleanup runs and no temporary folder is left beside the output. Returns the
    function that puts the previous handler back."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (main() called from a worker): leave it
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore = _interrupt_on_sigterm()
    try:
        return _run(args)
    finally:
        restore()


def _refused(args: argparse.Namespace, exc: Exception) -> int:
    """A user error (bad spec, missing files, refused checkpoints): one clear line, no trace."""
    print(f"slimstack {args.command}: error: {exc}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    try:  # importing the ops reads $SLIMSTACK_DISPATCH_TABLE: a bad one is a ValueError
        from slimstack.ops.dispatch import BackendUnavailable, forced_backend
    except ValueError as exc:
        return _refused(args, exc)
    try:
        forced_backend()  # a misspelt $SLIMSTACK_BACKEND: refused before any work or output
        return args.handler(args)
    except (ValueError, FileNotFoundError, BackendUnavailable) as exc:
        return _refused(args, exc)
    except KeyboardInterrupt:
        print(f"slimstack {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `slimstack generate ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # a full disk, an unwritable folder: the writers have removed their temporary folders
        print(f"slimstack {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
