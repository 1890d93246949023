"""Quality of a (pruned) model: perplexity, and KL / top-1 agreement against its source.

Text is cut into non-overlapping windows of the model's context (or `seqlen`); every token
of a window but the first is predicted, and the scores are averaged over those tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimstack._callable_module import make_callable
from slimstack.calibration import tokenize_file
from slimstack.checkpoint import Checkpoint
from slimstack.devices import resolve_device


@dataclass
class EvalResult:
    model: str
    text: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens the averages are over
    perplexity: float
    reference: str | None = None
    reference_perplexity: float | None = None
    kl: float | None = None  # mean KL(reference || model) per token, nats
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"model        {self.model}",
            f"text         {self.text} ({self.tokens} tokens, {self.windows} windows of {self.seqlen})",
            f"perplexity   {self.perplexity:.4f}",
        ]
        if self.reference is not None:
            lines += [
                f"reference    {self.reference}: perplexity {self.reference_perplexity:.4f}",
                f"KL(ref||m)   {self.kl:.5f} nats/token",
                f"top-1 agree  {self.top1_agreement:.4f}",
            ]
        return "\n".join(lines)


def load_hf_model(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None):
    """A transformers model from a validated local folder (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    ckpt = Checkpoint.open(path)  # refuses pickles, corrupt files, unknown architectures
    ckpt.close()
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=dtype or torch.float32,
    )
    return model.to(device).eval()


def text_windows(
    model: str | os.PathLike, text_file: str | os.PathLike, seqlen: int
) -> torch.Tensor:
    tokens = tokenize_file(model, text_file)
    count = tokens.numel() // seqlen
    if count == 0:
        raise ValueError(
            f"{text_file} has {tokens.numel()} tokens, fewer than one window of {seqlen}"
        )
    return tokens[: count * seqlen].reshape(count, seqlen)


def check_eval_settings(
    seqlen: int | None,
    batch_size: int = 8,
    max_windows: int | None = None,
    context: int | None = None,
) -> None:
    """The settings of `evaluate`, checked before any model is loaded (recipes check them
    before their first step): positive integers, seqlen within [2, context] when known."""
    for name, value in (("batch_size", batch_size), ("max_windows", max_windows)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seqlen is None:
        return
    if isinstance(seqlen, bool) or not isinstance(seqlen, int):
        raise ValueError(f"seqlen must be an integer, got {seqlen!r}")
    if seqlen < 2 or (context is not None and seqlen > context):
        top = f"{context}] (the model's context)" if context is not None else "the model's context]"
        raise ValueError(f"seqlen must be in [2, {top}, got {seqlen}")


@torch.no_grad()
def evaluate(
    model: str | os.PathLike,
    text: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    seqlen: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> EvalResult:
    check_eval_settings(seqlen, batch_size, max_windows)
    device = resolve_device(device)
    lm = load_hf_model(model, device, dtype)
    ref = load_hf_model(reference, device, dtype) if reference is not None else None
    if ref is not None and ref.config.vocab_size != lm.config.vocab_size:
        raise ValueError(
            f"reference {reference} has a vocabulary of {ref.config.vocab_size} tokens but "
            f"{model} has {lm.config.vocab_size}: KL and agreement need the same tokenizer"
        )
    context = int(lm.config.max_position_embeddings)
    seqlen = context if seqlen is None else seqlen
    check_eval_settings(seqlen, batch_size, max_windows, context)
    windows = text_windows(model, text, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]

    nll = ref_nll = kl = agree = 0.0
    tokens = 0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        targets = ids[:, 1:].reshape(-1)
        logp = F.log_softmax(lm(ids).logits[:, :-1].float(), -1).reshape(targets.numel(), -1)
        nll += float(F.nll_loss(logp, targets, reduction="sum"))
        tokens += targets.numel()
        if ref is not None:
            ref_logp = F.log_softmax(ref(ids).logits[:, :-1].float(), -1).reshape_as(logp)
            ref_nll += float(F.nll_loss(ref_logp, targets, reduction="sum"))
            kl += float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
            agree += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    result = EvalResult(
        model=str(Path(model)),
        text=str(Path(text)),
        seqlen=seqlen,
        windows=windows.shape[0],
        tokens=tokens,
        perplexity=math.exp(nll / tokens),
    )
    if ref is not None:
        result.reference = str(Path(reference))
        result.reference_perplexity = math.exp(ref_nll / tokens)
        result.kl = kl / tokens
        result.top1_agreement = agree / tokens
    return result


# slimstack.evaluate(...) calls evaluate() (see slimstack._callable_module)
make_callable(__name__, __name__, "evaluate")
