"""`model.generate(...)`: prompts in, text and token ids out, optionally streamed.

One prompt or a batch (left-padded to a common length, each row stopping on its own),
greedy or sampled. The loop keeps the device busy: the decode step runs as a CUDA graph,
sampling stays on the device, and the host reads each step's tokens through a pinned
buffer one step behind the device, so deciding "done?" or streaming text never stalls the
GPU. A row that has stopped keeps riding along in the batch (its tokens are ignored)
until every row is done or `max_new_tokens` is reached.
"""

from __future__ import annotations

import difflib
import numbers
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slimstack.engine.cuda_graph import decode_runner, resolve_mode
from slimstack.engine.model import DecoderModel
from slimstack.engine.sampling import SamplingParams, make_generator, sample
from slimstack.engine.stopping import Row, Stopper

GENERATE_KWARGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stream",
    "mode",
)
CACHE_BUCKET = 128  # cache lengths round up to this, so similar requests reuse one graph


# ----------------------------------------------------------------------------- results
@dataclass
class Timings:
    prompt_tokens: int  # padded prompt length (columns)
    batch: int
    prefill_ms: float  # prompt forward + first token
    decode_ms: float  # every later step
    decode_steps: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of one sequence (what a streaming reader sees)."""
        return self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    @property
    def throughput_tokens_per_s(self) -> float:
        """Tokens per second over the whole batch."""
        return self.batch * self.decode_tokens_per_s

    def to_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "batch": self.batch,
            "prefill_ms": self.prefill_ms,
            "decode_ms": self.decode_ms,
            "decode_steps": self.decode_steps,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
        }


@dataclass
class GenerationResult:
    """texts[i] / token_ids[i]: the continuation of prompt i, without the EOS token and
    without the stop string (its tokens stay in token_ids); finish_reasons[i] is "eos",
    "stop" or "length". A text reads on from its prompt: prompt + text is the whole
    passage (so it may start with a space). texts are None without a tokenizer."""

    texts: list[str | None]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    timings: Timings

    @property
    def text(self) -> str | None:
        self._require_single("text")
        return self.texts[0]

    @property
    def tokens(self) -> list[int]:
        self._require_single("tokens")
        return self.token_ids[0]

    def _require_single(self, what: str) -> None:
        if len(self.token_ids) != 1:
            raise ValueError(f"result holds {len(self.token_ids)} sequences; use {what}[i]")


class Stream:
    """Iterator over text pieces as they are generated: `str` for a single prompt,
    `(index, str)` for a batch. `result` holds the GenerationResult once it is exhausted."""

    def __init__(self, events: Generator[tuple[int, str], None, GenerationResult], single: bool):
        self._events = events
        self._single = single
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str | tuple[int, str]]:
        return self

    def __next__(self) -> str | tuple[int, str]:
        try:
            index, piece = next(self._events)
        except StopIteration as done:
            if self.result is None:  # a later next() on the spent generator carries None
                self.result = done.value
            raise
        return piece if self._single else (index, piece)


class _TokenReader:
    """Device tokens -> host lists, `lag` steps behind the device (0: synchronous)."""

    def __init__(self, device: torch.device, batch: int, lag: int) -> None:
        self.lag = lag if device.type == "cuda" else 0
        self.pending: deque[int] = deque()
        self.count = 0
        if self.lag:
            self.host = torch.empty((self.lag + 1, batch), dtype=torch.long, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(self.lag + 1)]
        else:
            self.ready_now: deque[list[int]] = deque()

    def push(self, tokens: torch.Tensor) -> None:
        if not self.lag:
            self.ready_now.append(tokens.tolist())
            return
        index = self.count % (self.lag + 1)
        self.host[index].copy_(tokens, non_blocking=True)
        self.events[index].record()
        self.pending.append(index)
        self.count += 1

    def ready(self, drain: bool = False) -> Iterator[list[int]]:
        if not self.lag:
            while self.ready_now:
                yield self.ready_now.popleft()
            return
        keep = 0 if drain else self.lag
        while len(self.pending) > keep:
            index = self.pending.popleft()
            self.events[index].synchronize()
            yield self.host[index].tolist()


# ----------------------------------------------------------------------------- inputs
def _check_kwargs(unknown: dict[str, Any]) -> None:
    if not unknown:
        return
    name = next(iter(unknown))
    close = difflib.get_close_matches(name, GENERATE_KWARGS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TypeError(
        f"generate() got an unexpected keyword argument {name!r}{hint}; accepted: "
        + ", ".join(GENERATE_KWARGS)
    )


def _is_token_list(value: Any) -> bool:
    # numbers.Integral: numpy's integer scalars (a tokenizer's np.int64 ids) count too
    return isinstance(value, (list, tuple)) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value
    )


def encode_prompts(model: DecoderModel, prompts: Any) -> tuple[list[list[int]], bool]:
    """Prompts -> token id lists, and whether a single prompt was given.

    Accepted: a string, a list of strings, a list of token ids, a list of such lists, or a
    1-D / 2-D tensor of token ids.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.dtype.is_floating_point:
            raise ValueError(f"a tensor prompt must be 1-D or 2-D integer ids, got {prompts.shape}")
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (_is_token_list(prompts) and len(prompts) > 0):
        items, single = [prompts], True
    elif isinstance(prompts, (list, tuple)) and prompts:
        items, single = list(prompts), False
    else:
        raise ValueError(
            "prompts must be a non-empty string, a list of strings, a list of token ids, or "
            f"a list of token id lists; got {prompts!r}"
        )
    encoded = []
    for index, item in enumerate(items):
        where = "prompt" if single else f"prompt {index}"
        if isinstance(item, str):
            if not item:
                raise ValueError(f"{where} is an empty string; give at least one character")
            if model.tokenizer is None:
                raise ValueError(
                    f"{model.source or 'this model'} has no tokenizer files; pass token ids"
                )
            ids = list(model.tokenizer(item)["input_ids"])
        elif _is_token_list(item):
            ids = [int(t) for t in item]
        else:
            raise TypeError(f"{where} must be a string or a list of token ids, got {item!r}")
        if not ids:
            raise ValueError(f"{where} is empty (no tokens)")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(
                f"{where} has token id {bad[0]} outside the vocabulary (0..{model.config.vocab_size - 1})"
            )
        encoded.append(ids)
    return encoded, single


def _check_lengths(model: DecoderModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    context = model.config.context_length
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise ValueError(
            f"prompt of {longest} tokens is longer than the model's context ({context} tokens, "
            "including the generated ones)"
        )
    if longest == context:
        raise ValueError(
            f"prompt of {longest} tokens fills the model's context ({context} tokens) and "
            "leaves no room for new tokens"
        )
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {context} tokens; use max_new_tokens <= {context - longest}"
        )


def _check_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise TypeError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    if not all(stops):
        raise ValueError(
            f"stop strings must be non-empty (an empty one matches at once), got {stop!r}"
        )
    return list(stops)


def _cache_length(model: DecoderModel, needed: int) -> int:
    bucket = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
    return min(bucket, model.config.context_length)


def _left_pad(
    prompts: list[list[int]], device: torch.device, pad_id: int
) -> tuple[torch.Tensor, list[int]]:
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    rows = [[pad_id] * n + p for n, p in zip(pads, prompts)]
    return torch.tensor(rows, dtype=torch.long, device=device), pads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- generate
def generate(
    model: DecoderModel,
    prompts: Any,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    mode: str = "auto",
    **unknown: Any,
) -> GenerationResult | Stream:
    """Continue one prompt or a batch.

    prompts: a string, a list of strings, a list of token ids or a list of token id lists.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p, reproducible
    with `seed`. Generation of a row stops at an EOS token, at the first of the `stop`
    strings, or after `max_new_tokens`. stream=True returns a `Stream` of text pieces.
    mode: "auto" (CUDA graph on CUDA, eager on CPU), "eager", "graph" or "compile".
    """
    _check_kwargs(unknown)
    params = SamplingParams(temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit 64 bits (-2**63 .. 2**64 - 1), got {seed}")
    stops = _check_stop(stop)
    encoded, single = encode_prompts(model, prompts)
    _check_lengths(model, encoded, max_new_tokens)
    mode = resolve_mode(mode, model.device)
    if (stops or stream) and model.tokenizer is None:
        raise ValueError("stop strings and streaming need text: this model has no tokenizer")
    stopper = Stopper(
        model.tokenizer, model.eos_token_ids, stops, max_new_tokens, bool(stops or stream)
    )
    events = _run(model, encoded, params, seed, stopper, mode, stream)
    if stream:
        return Stream(events, single)
    try:
        while True:
            next(events)
    except StopIteration as done:
        return done.value


@torch.no_grad()
def _run(
    model: DecoderModel,
    prompts: list[list[int]],
    params: SamplingParams,
    seed: int | None,
    stopper: Stopper,
    mode: str,
    stream: bool,
) -> Generator[tuple[int, str], None, GenerationResult]:
    device, batch = model.device, len(prompts)
    tokens, pads = _left_pad(prompts, device, pad_id=0)
    width = tokens.shape[1]
    model.setup_cache(batch, _cache_length(model, width + stopper.max_new_tokens))
    epoch = model.cache_epoch  # a stream must notice another call reusing this cache
    runner = decode_runner(model, mode)  # captured before prefill touches the cache
    generator = make_generator(device, seed)
    rows = [Row(prefix=stopper.context(p)) for p in prompts]
    reader = _TokenReader(device, batch, lag=2)

    def consume(drain: bool = False) -> Iterator[tuple[int, str]]:
        for step_tokens in reader.ready(drain):
            for index, (row, token) in enumerate(zip(rows, step_tokens)):
                stopper.add(row, token)
                if stream:
                    end = stopper.streamable(row)
                    if end > row.emitted:
                        yield index, row.text[row.emitted : end]
                        row.emitted = end

    _sync(device)
    start = time.perf_counter()
    next_tokens = sample(model.prefill(tokens, pads), params, generator)
    reader.push(next_tokens)
    _sync(device)
    prefill_done = time.perf_counter()
    runner.slot.fill_(width)
    steps = 0
    for _ in range(stopper.max_new_tokens - 1):
        yield from consume()
        if all(row.reason is not None for row in rows):
            break
        if model.cache_epoch != epoch:
            raise RuntimeError(
                "this generation's KV cache was taken over by another generate() or logits() "
                "call on the same model while it was being streamed; finish (or drop) a "
                "stream before starting another call on its model"
            )
        runner.tokens.copy_(next_tokens[:, None])
        logits = runner.step()
        runner.slot.add_(1)
        next_tokens = sample(logits, params, generator)
        reader.push(next_tokens)
        steps += 1
    yield from consume(drain=True)
    _sync(device)
    decode_done = time.perf_counter()
    for row in rows:
        row.reason = row.reason or "length"
    timings = Timings(
        prompt_tokens=width,
        batch=batch,
        prefill_ms=(prefill_done - start) * 1e3,
        decode_ms=(decode_done - prefill_done) * 1e3,
        decode_steps=steps,
    )
    texts = [row.text if stopper.want_text else _final_text(stopper, row) for row in rows]
    return GenerationResult(
        texts=texts,
        token_ids=[row.tokens for row in rows],
        finish_reasons=[row.reason for row in rows],
        timings=timings,
    )


def _final_text(stopper: Stopper, row: Row) -> str | None:
    return stopper.decode(row) if stopper.tokenizer is not None else None
