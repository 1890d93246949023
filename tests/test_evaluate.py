"""Perplexity, KL and top-1 agreement against a hand computation with transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from slimstack.evaluate import evaluate, text_windows


def test_perplexity_matches_manual(stories260k_dir: Path, wikitext_dir: Path) -> None:
    text = wikitext_dir / "test.txt"
    result = evaluate(
        stories260k_dir, text, seqlen=128, max_windows=6, batch_size=4, progress=False
    )
    windows = text_windows(stories260k_dir, text, 128)[:6]
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir, local_files_only=True)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 512), windows[:, 1:].reshape(-1))
    assert result.tokens == 6 * 127 and result.windows == 6
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result.kl is None


def test_against_itself_kl_zero_agreement_one(stories260k_dir: Path, wikitext_dir: Path) -> None:
    result = evaluate(
        stories260k_dir,
        wikitext_dir / "test.txt",
        reference=stories260k_dir,
        seqlen=64,
        max_windows=4,
        progress=False,
    )
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.reference_perplexity == pytest.approx(result.perplexity)


def test_bad_seqlen(stories260k_dir: Path, wikitext_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"seqlen must be in \[2, 512\]"):
        evaluate(stories260k_dir, wikitext_dir / "test.txt", seqlen=1024, progress=False)


def test_evaluation_runs_without_autograd(
    stories260k_dir: Path, wikitext_dir: Path, monkeypatch
) -> None:
    """No graph is kept for the forward passes (it would hold every activation)."""
    import slimstack.evaluate as ev

    seen = []
    windows = ev.text_windows

    def recording(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return windows(*args, **kwargs)

    monkeypatch.setattr(ev, "text_windows", recording)
    evaluate(stories260k_dir, wikitext_dir / "test.txt", seqlen=64, max_windows=2, progress=False)
    assert seen == [False]
