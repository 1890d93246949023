"""Stopping and text for `generate()`: EOS, stop strings and length applied to each row as
its tokens reach the host, with the row's text detokenized incrementally.

Incremental, because decoding a whole continuation every step costs O(length) per token:
each step decodes only the tokens since an anchor, behind one context token, and the text
that is final (no unfinished UTF-8 character, no tail that may grow into a stop string) is
what a stream may release.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ANCHOR_EVERY = 8  # at most this many tokens (+ 1 of context) decoded per step for text
MAX_BYTE_CONTEXT = 16  # prompt tokens kept as context when the prompt ends in byte tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Row:
    """Host-side state of one sequence: its tokens, its text, why it stopped.

    Text is detokenized incrementally: `committed` is the text of tokens[:anchor], and each
    step decodes only the tail tokens[anchor:] behind one context token (a SentencePiece
    word's leading space survives), so a step costs O(1) decode work, not O(length).
    """

    prefix: list[int]  # the prompt's tail (see Stopper.context): decoded with the new ones
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters already streamed
    reason: str | None = None
    anchor: int = 0  # tokens[:anchor] are decoded into `committed`
    committed: str = ""
    lead: str | None = None  # the context token's text alone (None: not decoded yet)
    byte_run_from: int | None = None  # text length where a trailing run of byte tokens began


def _common_prefix(a: str, b: str, start: int = 0) -> int:
    """Length of the common prefix of a and b, given that they agree before `start`."""
    end = min(len(a), len(b))
    i = min(start, end)
    while i < end and a[i] == b[i]:
        i += 1
    return i


class Stopper:
    """Applies EOS / stop strings / length to rows as their tokens arrive on the host."""

    def __init__(
        self,
        tokenizer: Any,
        eos: Sequence[int],
        stops: Sequence[str],
        max_new_tokens: int,
        want_text: bool,
    ) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, set(eos), list(stops)
        self.max_new_tokens = max_new_tokens
        self.want_text = want_text  # decode text per token (streaming, stop strings)

    def add(self, row: Row, token: int) -> None:
        if row.reason is not None:
            return
        if token in self.eos:
            row.reason = "eos"
            return
        row.tokens.append(token)
        if self.want_text:
            if not self._is_byte_token(token):
                row.byte_run_from = None
            elif row.byte_run_from is None:
                row.byte_run_from = len(row.text)
            new_from = self._extend_text(row)
            cut = self._stop_at(row.text, new_from)
            if cut is not None:
                row.text, row.reason = row.text[:cut], "stop"
                return
        if len(row.tokens) >= self.max_new_tokens:
            row.reason = "length"

    def _extend_text(self, row: Row) -> int:
        """Bring row.text up to date with its tokens; returns where new text starts: where
        the old and new text first differ. Not the old length: a token that completes a
        character turns trailing U+FFFD placeholders into it, changing text before there."""
        old_text, stable = row.text, len(row.committed)  # text before `committed` is final
        context = row.tokens[row.anchor - 1 : row.anchor] if row.anchor else row.prefix
        decode = self.tokenizer.decode
        if row.lead is None:
            row.lead = decode(context, skip_special_tokens=True)
        tail = decode(context + row.tokens[row.anchor :], skip_special_tokens=True)
        if tail.startswith(row.lead):
            row.text = row.committed + tail[len(row.lead) :]
        else:  # the tail rewrote text before the anchor: decode everything, anchor anew
            row.text, row.anchor, row.committed = self.decode(row), 0, ""
            row.lead, stable = None, 0
        alone = self._anchor_text(row)
        if alone is not None:  # the last token becomes the context; its text is the lead
            row.anchor, row.committed, row.lead = len(row.tokens), row.text, alone
        return _common_prefix(old_text, row.text, start=stable)

    def _is_byte_token(self, token: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        return isinstance(piece, str) and _BYTE_TOKEN.fullmatch(piece) is not None

    def context(self, prompt: list[int]) -> list[int]:
        """The prompt tokens the continuation is decoded behind: the last one, or from the
        last non-byte token when the prompt ends in SentencePiece byte tokens (a run of them
        decodes together, so a continuation that finishes or follows it needs all of it)."""
        if self.tokenizer is None or not self.want_text:
            return prompt[-1:]
        start = len(prompt) - 1
        while (
            start > 0
            and len(prompt) - start < MAX_BYTE_CONTEXT
            and self._is_byte_token(prompt[start])
        ):
            start -= 1
        return prompt[start:]

    def _anchor_text(self, row: Row) -> str | None:
        """Whether the tail may restart after the last token, which then serves as context: a
        few tokens in, at a whole character, and only behind a token that reads the same
        alone as in the text. That rules out special tokens (skipped, so the next piece
        would lose its leading space) and SentencePiece's byte tokens <0xNN> (a run of them
        decodes together). Returns that token's text alone where it may, else None."""
        if len(row.tokens) - row.anchor < ANCHOR_EVERY or row.text.endswith("\ufffd"):
            return None
        last = row.tokens[-1]
        if self._is_byte_token(last):
            return None
        alone = self.tokenizer.decode([last], skip_special_tokens=True)
        return alone if alone and row.text.endswith(alone) else None

    def decode(self, row: Row) -> str:
        """The continuation's text as it reads after the prompt (a SentencePiece word's
        leading space included), by decoding it behind the prompt's last token."""
        prefix = self.tokenizer.decode(row.prefix, skip_special_tokens=True)
        full = self.tokenizer.decode(row.prefix + row.tokens, skip_special_tokens=True)
        if full.startswith(prefix):
            return full[len(prefix) :]
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def _stop_at(self, text: str, new_from: int = 0) -> int | None:
        """First stop string in `text`; only one ending at or after `new_from` can be new."""
        starts = (max(0, new_from - len(s) + 1) for s in self.stops)
        hits = [i for i in (text.find(s, at) for s, at in zip(self.stops, starts)) if i >= 0]
        return min(hits) if hits else None

    def streamable(self, row: Row) -> int:
        """How much of the row's text is final: all of it once the row stopped; else hold
        back an unfinished UTF-8 character and any tail that may grow into a stop string."""
        if row.reason is not None:
            return len(row.text)
        end = len(row.text)
        if row.byte_run_from is not None:  # the run may still re-decode as a whole
            end = min(end, row.byte_run_from)
        while end > 0 and row.text[end - 1] == "\ufffd":
            end -= 1
        safe = end
        for stop in self.stops:
            for n in range(min(len(stop) - 1, end), 0, -1):
                if row.text.endswith(stop[:n], 0, end):
                    safe = min(safe, end - n)
                    break
        return safe
