"""generate(): sampling, seeds, stop strings, EOS, streaming, batches, errors; the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_support import (  # noqa: F401  (single_thread is an autouse fixture)
    EXPECTED_CONTINUATION,
    PROMPT,
    single_thread,
)

from slimstack.engine.loader import load
from slimstack.engine.sampling import SamplingParams, filter_top_k, filter_top_p, sample
from slimstack.engine.stopping import ANCHOR_EVERY, Row, Stopper


@pytest.fixture(scope="module")
def engine(stories260k_dir: Path):
    return load(stories260k_dir, device="cpu")


# ----------------------------------------------------------------------------- sampling
def test_seeded_sampling_repeats_exactly_and_seeds_differ(engine) -> None:
    kwargs = dict(max_new_tokens=40, temperature=0.9, top_k=40, top_p=0.95)
    prompts = [PROMPT, "Tom had a", "The"]
    first = engine.generate(prompts, seed=1234, **kwargs)
    again = engine.generate(prompts, seed=1234, **kwargs)
    other = engine.generate(prompts, seed=4321, **kwargs)
    assert first.token_ids == again.token_ids and first.texts == again.texts
    assert first.token_ids != other.token_ids
    greedy = engine.generate(prompts, max_new_tokens=40)
    assert first.token_ids != greedy.token_ids  # it really sampled


def test_top_k_and_top_p_filters() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.5]])
    kept = filter_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, False, True]]
    probs = logits.softmax(-1)[0]  # [0.05, 0.40, 0.15, 0.02, 0.24 ...] sorted: 1, 4, 2, 0, 3
    order = probs.argsort(descending=True)
    mass = probs[order[0]] + probs[order[1]]
    kept = filter_top_p(logits, float(mass) - 1e-3)  # needs exactly the two most likely
    assert torch.isfinite(kept)[0].nonzero().flatten().tolist() == sorted(order[:2].tolist())
    kept = filter_top_p(logits, 1e-6)  # always at least one token
    assert torch.isfinite(kept).sum() == 1


def test_sampling_follows_the_distribution() -> None:
    """The exponential race draws token i with probability p_i."""
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(20000, 3).contiguous()
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.015)
    top1 = sample(logits, SamplingParams(temperature=1.0, top_k=1), gen)
    assert bool((top1 == 1).all())


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-8])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature) -> None:
    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 8
    gen = torch.Generator().manual_seed(0)
    drawn = sample(logits, SamplingParams(temperature=temperature), gen)
    assert torch.equal(drawn, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=float("inf")), "temperature must be >= 0 and finite"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(seed="x"), "seed must be an int"),
        (dict(stop=[""]), "stop strings must be non-empty"),
        (dict(stop=[3]), "stop must be a non-empty string"),
        (dict(seed=2**64), "seed must fit 64 bits"),
    ],
)
def test_bad_sampling_arguments(engine, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        engine.generate(PROMPT, max_new_tokens=4, **kwargs)


# ----------------------------------------------------------------------------- stopping
def test_stop_string_cuts_text_per_sequence(engine) -> None:
    result = engine.generate([PROMPT, "Tom had a"], max_new_tokens=40, stop=["park", "xyzzy"])
    full = engine.generate([PROMPT, "Tom had a"], max_new_tokens=40)
    assert result.texts[0] == (" " + EXPECTED_CONTINUATION).split("park")[0]
    assert result.finish_reasons[0] == "stop"
    assert full.texts[0].startswith(result.texts[0] + "park")
    # the other row did not stop early because of row 0 (unless it says "park" itself)
    if "park" not in full.texts[1]:
        assert result.texts[1] == full.texts[1] and result.finish_reasons[1] == "length"


def test_eos_stops_a_row_and_is_not_returned(engine) -> None:
    greedy = engine.generate(PROMPT, max_new_tokens=12)
    engine.eos_token_ids = (greedy.tokens[5],)  # pretend the 6th token is EOS
    try:
        result = engine.generate(PROMPT, max_new_tokens=12)
    finally:
        engine.eos_token_ids = (2,)
    assert result.tokens == greedy.tokens[:5]
    assert result.finish_reasons == ["eos"]
    assert result.text == greedy.text[: len(result.text)]
    assert result.text.strip() == engine.tokenizer.decode(greedy.tokens[:5]).strip()


def test_streaming_pieces_add_up_to_the_text(engine) -> None:
    stream = engine.generate(PROMPT, max_new_tokens=30, stream=True)
    pieces = list(stream)
    assert len(pieces) > 10 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == engine.generate(PROMPT, max_new_tokens=30).text


def test_streaming_holds_back_a_partial_stop_string(engine) -> None:
    stream = engine.generate(PROMPT, max_new_tokens=30, stream=True, stop="the park")
    pieces = list(stream)
    text = "".join(pieces)
    assert text == stream.result.text == (" " + EXPECTED_CONTINUATION).split("the park")[0]
    assert "the" not in text.split("outside")[-1]  # " the" never leaked out


def test_streaming_a_batch_tags_pieces_with_the_row(engine) -> None:
    stream = engine.generate([PROMPT, "Tom had a"], max_new_tokens=16, stream=True)
    texts = ["", ""]
    for index, piece in stream:
        texts[index] += piece
    assert texts == stream.result.texts


def test_result_fields_and_timings(engine) -> None:
    result = engine.generate(PROMPT, max_new_tokens=8)
    timings = result.timings
    assert timings.decode_steps == 7 and timings.batch == 1 and timings.prefill_ms > 0
    assert timings.decode_tokens_per_s > 0
    assert timings.to_dict()["throughput_tokens_per_s"] == timings.decode_tokens_per_s
    batch = engine.generate([PROMPT, "Hi"], max_new_tokens=8)
    with pytest.raises(ValueError, match="2 sequences"):
        _ = batch.text


def test_numpy_token_ids_are_token_ids(engine) -> None:
    import numpy as np

    ids = [1, 403, 280]
    as_numpy = engine.generate([np.int64(t) for t in ids], max_new_tokens=5)
    assert as_numpy.token_ids == engine.generate(ids, max_new_tokens=5).token_ids


def test_token_id_prompts_match_text_prompts(engine) -> None:
    ids = engine.tokenizer(PROMPT)["input_ids"]
    expected = engine.generate(PROMPT, max_new_tokens=10).tokens
    assert engine.generate(ids, max_new_tokens=10).tokens == expected
    assert engine.generate(torch.tensor(ids), max_new_tokens=10).tokens == expected
    assert engine.generate(torch.tensor([ids, ids]), max_new_tokens=10).token_ids == [expected] * 2


def test_a_stream_refuses_to_resume_after_another_call_took_its_cache(engine) -> None:
    stream = engine.generate(PROMPT, max_new_tokens=30, stream=True)
    first = [next(stream) for _ in range(3)]
    other = engine.generate("Tom had a", max_new_tokens=5)  # reuses the model's one cache
    with pytest.raises(RuntimeError, match="taken over by another generate"):
        list(stream)
    assert "".join(first) == " " + EXPECTED_CONTINUATION[: len("".join(first)) - 1]
    assert other.tokens == engine.generate("Tom had a", max_new_tokens=5).tokens
    stream = engine.generate([PROMPT, "Tom"], max_new_tokens=30, stream=True)
    next(stream)
    engine.logits(torch.tensor([[1, 2, 3]]))
    with pytest.raises(RuntimeError, match="taken over"):
        list(stream)


# ----------------------------------------------------------------------------- text
class _CountingTokenizer:
    """Forwards to a tokenizer and records how many ids each decode() call gets."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)


def _stopper(tokenizer, stops=()) -> Stopper:
    return Stopper(tokenizer, eos=(), stops=list(stops), max_new_tokens=10**6, want_text=True)


def test_incremental_text_equals_a_full_decode_at_every_step(engine) -> None:
    """Random ids mixing word pieces, byte tokens <0xNN> (whose runs decode together, and
    which an invalid run turns into U+FFFD each), the lone "▁" and special tokens."""
    tokenizer = engine.tokenizer
    vocab = tokenizer.vocab_size
    space = tokenizer.convert_tokens_to_ids("▁")
    pool = torch.tensor([0, 1, 2, space] + list(range(3, 259)) + list(range(259, vocab)) * 2)
    gen = torch.Generator().manual_seed(7)
    emoji = [3 + b for b in "a€ b😀 ü".encode()]
    for trial in range(120):
        ids = pool[torch.randint(0, len(pool), (40,), generator=gen)].tolist()
        if trial % 4 == 0:
            ids = emoji * 2 + ids[:20]
        stopper, row = _stopper(tokenizer), Row(prefix=ids[:1])
        for token in ids[1:]:
            stopper.add(row, token)
            assert row.text == stopper.decode(row), (trial, row.tokens)


def _byte_ids(text: str) -> list[int]:
    """SentencePiece byte-fallback ids <0xNN> of text's UTF-8 (stories260K: id = byte + 3)."""
    return [3 + b for b in text.encode()]


def _continuation(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    return tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)) :]


@pytest.mark.parametrize("stop", ["—", "日", "ü!", "😀"])
def test_a_stop_string_ending_in_a_multibyte_character_is_found(engine, stop) -> None:
    """The last byte token of a character turns trailing U+FFFD into it: the search for a
    stop must start where the text changed, not where the old text ended."""
    tokenizer = engine.tokenizer
    prompt = [1, 280]
    tokens = _byte_ids("x" + stop) + [410, 297, 412]
    stopper = _stopper(tokenizer, stops=[stop])
    row = Row(prefix=stopper.context(prompt))
    for token in tokens:
        stopper.add(row, token)
    expected = _continuation(tokenizer, prompt, tokens)
    assert row.reason == "stop" and row.text == expected[: expected.index(stop)]


def test_a_continuation_after_a_prompt_ending_in_byte_tokens_decodes_as_a_whole(engine) -> None:
    """SentencePiece decodes a run of byte tokens together: a continuation behind a prompt
    that ends in one needs the whole run as context, or its own bytes decode as U+FFFD."""
    tokenizer = engine.tokenizer
    prompt = [1, 280] + _byte_ids("🙂")
    tokens = _byte_ids("é") + [410, 297]
    stopper = _stopper(tokenizer)
    row = Row(prefix=stopper.context(prompt))
    for token in tokens:
        stopper.add(row, token)
    assert row.text == _continuation(tokenizer, prompt, tokens) == "é  n"
    assert stopper.decode(row) == row.text


def test_streamed_text_is_never_taken_back(engine) -> None:
    """What streamable() releases must stay a prefix of the text: a valid character followed
    by a stray byte token re-decodes the whole run as U+FFFD, so text from a trailing run of
    byte tokens waits for the run to end. Random runs of valid and invalid UTF-8 bytes."""
    tokenizer = engine.tokenizer
    gen = torch.Generator().manual_seed(11)
    pieces = [_byte_ids(c) for c in "é😀日—a"] + [[3 + 0x80], [3 + 0xE2], [280], [410], [297]]
    for trial in range(150):
        picks = torch.randint(0, len(pieces), (12,), generator=gen).tolist()
        tokens = [t for i in picks for t in pieces[i]]
        stopper = _stopper(tokenizer)
        row, released = Row(prefix=stopper.context([1, 280])), ""
        for token in tokens:
            stopper.add(row, token)
            released += row.text[len(released) : stopper.streamable(row)]
            assert row.text.startswith(released), (trial, tokens)
        row.reason = "length"
        released += row.text[len(released) : stopper.streamable(row)]
        assert released == row.text == _continuation(tokenizer, [1, 280], tokens), trial


def test_a_spent_stream_keeps_its_result(engine) -> None:
    stream = engine.generate(PROMPT, max_new_tokens=6, stream=True)
    text = "".join(stream)
    result = stream.result
    assert result is not None and result.text == text
    assert list(stream) == [] and stream.result is result


def test_text_decoding_costs_a_few_tokens_per_step(engine, wikitext_dir: Path) -> None:
    text = (wikitext_dir / "test.txt").read_text()[:4000]
    ids = engine.tokenizer(text, verbose=False)["input_ids"][:1500]
    counting = _CountingTokenizer(engine.tokenizer)
    stopper, row = _stopper(counting, stops=["never said"]), Row(prefix=ids[:1])
    for token in ids[1:]:
        stopper.add(row, token)
    assert row.text == _stopper(engine.tokenizer).decode(row)
    lengths = counting.lengths
    assert len(ids) == 1500 and len(lengths) <= 1.5 * len(ids)  # a decode per token, +1 per anchor
    assert max(lengths) <= 4 * ANCHOR_EVERY and sum(lengths) / len(lengths) <= ANCHOR_EVERY


# ----------------------------------------------------------------------------- errors
def test_prompt_longer_than_context_is_refused(engine) -> None:
    context = engine.config.context_length
    with pytest.raises(ValueError, match=f"longer than the model's context \\({context}"):
        engine.generate([1] * (context + 1), max_new_tokens=1)
    with pytest.raises(ValueError, match="leaves no room for new tokens"):
        engine.generate([1] * context, max_new_tokens=1)
    with pytest.raises(ValueError, match=f"use max_new_tokens <= {context - 500}"):
        engine.generate([1] * 500, max_new_tokens=100)


@pytest.mark.parametrize("prompts", ["", [""], [], [[]], ["ok", ""]])
def test_empty_prompts_are_refused(engine, prompts) -> None:
    with pytest.raises(ValueError, match="empty|non-empty"):
        engine.generate(prompts, max_new_tokens=4)


@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_max_new_tokens_is_refused(engine, value: int) -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        engine.generate(PROMPT, max_new_tokens=value)


def test_unknown_keyword_is_refused_with_a_hint(engine) -> None:
    with pytest.raises(TypeError, match="'max_tokens'.*did you mean 'max_new_tokens'"):
        engine.generate(PROMPT, max_tokens=4)
    with pytest.raises(TypeError, match="'beam_width'.*accepted: max_new_tokens"):
        engine.generate(PROMPT, beam_width=4)


def test_other_bad_inputs(engine) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 99999], max_new_tokens=2)
    with pytest.raises(TypeError, match="string or a list of token ids"):
        engine.generate([PROMPT, 3.5], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        engine.generate(PROMPT, max_new_tokens=2, mode="graph")
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.generate(PROMPT, max_new_tokens=2, mode="fast")


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_streams_the_continuation(stories260k_dir: Path, capsys) -> None:
    from slimstack.cli import main

    code = main(
        ["generate", str(stories260k_dir), PROMPT, "--max-new-tokens", "20", "--device", "cpu"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith(PROMPT + " girl named Lily.")
    assert "tokens/s" in err


def test_cli_generate_reports_bad_input(stories260k_dir: Path, capsys) -> None:
    from slimstack.cli import main

    code = main(["generate", str(stories260k_dir), "", "--device", "cpu"])
    assert code == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["bogus", "triton"])
def test_cli_generate_reports_a_forced_backend_in_one_line(
    stories260k_dir: Path, tmp_path: Path, monkeypatch, capsys, backend: str
) -> None:
    """A misspelt $SLIMSTACK_BACKEND is refused before anything streams; one that cannot run
    here (Triton without CUDA) is a one-line error, not a traceback."""
    from slimstack.cli import main
    from slimstack.prune.driver import prune

    pruned = tmp_path / "pruned"
    prune(stories260k_dir, pruned, method="magnitude", sparsity="2:4", progress=False)
    monkeypatch.setenv("SLIMSTACK_BACKEND", backend)
    code = main(["generate", str(pruned), PROMPT, "--max-new-tokens", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert err.startswith("slimstack generate: error: SLIMSTACK_BACKEND")
    if backend == "bogus":
        assert out == "", "nothing streams before the refusal"


def test_loading_weights_drops_the_captured_decoders(stories260k_dir: Path) -> None:
    """A captured decode graph replays the tensor addresses it saw; a load_state_dict may
    move them (derived copies rebuilt, bitmap values resized), so runners are made again."""
    model = load(stories260k_dir, device="cpu")
    before = model.generate(PROMPT, max_new_tokens=8)
    assert model._decoders, "generate keeps its decode runner for the cache"
    model.load_state_dict(model.state_dict())
    assert not model._decoders
    assert model.generate(PROMPT, max_new_tokens=8).token_ids == before.token_ids
