"""Hugging Face checkpoint folders, written atomically: shards + index, config, tokenizer,
slimstack.json.

Everything goes to a temporary folder beside the target that is renamed into place only
when all of it, metadata included, has been written; any failure (Ctrl-C too) removes it,
so a target is either the old folder or the complete new one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimstack.checkpoint import INDEX_FILE, METADATA_FILE, TOKENIZER_FILES, CheckpointError


def check_target(
    target: Path, overwrite: bool, inputs: Sequence[str | os.PathLike | None] = ()
) -> None:
    """Refuse an output path before any work: an existing one needs `overwrite`, and must be
    a folder; it may not be one of the `inputs` (model folders, text files) or a folder
    holding one, which replacing it would delete."""
    resolved = Path(target).resolve()
    for source in inputs:
        if source is None:
            continue
        path = Path(source).resolve()
        if path == resolved or resolved in path.parents:
            raise CheckpointError(
                f"output folder {target} would replace the input {source}"
                + ("" if path == resolved else " (which lies inside it)")
                + "; choose another output folder"
            )
    if target.exists() and not overwrite:
        raise CheckpointError(f"output folder already exists: {target} (use --overwrite)")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"output path exists and is not a folder: {target}")


def replace_folder(folder: Path, target: Path) -> None:
    """Rename a finished `folder` to `target`, replacing what was there; if the rename fails
    the old target is put back."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(folder, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        if old.is_symlink():  # the target was a link to a folder: drop the link, not its files
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_folder(
    target: str | os.PathLike,
    overwrite: bool,
    tag: str = "tmp",
    inputs: Sequence[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed into place only if the block succeeds."""
    target = Path(target)
    check_target(target, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CheckpointWriter:
    """Writes a standard HF folder atomically: shards + index, config, tokenizer, slimstack.json.

    At most `max_shard_bytes` of tensors are held in memory before a shard is written, so
    the peak memory of a pruning run is about one layer plus one shard.
    Use as a context manager; call `add` for each tensor (in any order, any number of times
    for distinct names) and `finish` once. Leaving the block without `finish`, or with an
    exception (KeyboardInterrupt included), removes the temporary folder and leaves the
    target untouched.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        overwrite: bool = False,
        max_shard_bytes: int = 1024**3,
        inputs: Sequence[str | os.PathLike | None] = (),
    ) -> None:
        self.target = Path(target)
        check_target(self.target, overwrite, inputs)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temp shard file, names
        self._names: set[str] = set()
        self._finished = False

    def __enter__(self) -> CheckpointWriter:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or not self._finished:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} written twice")
        self._names.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view: safetensors needs tensors owning their storage
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        file = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.tmp / file), metadata={"format": "pt"})
        self._shards.append((file, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(
        self,
        config: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        tokenizer_from: str | os.PathLike | None = None,
    ) -> Path:
        self._flush()
        if not self._shards:
            raise CheckpointError("refusing to write a checkpoint without tensors")
        weight_map: dict[str, str] = {}
        total = len(self._shards)
        for i, (tmp_name, names) in enumerate(self._shards):
            final = (
                "model.safetensors"
                if total == 1
                else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            )
            os.replace(self.tmp / tmp_name, self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        if total > 1:
            total_size = sum((self.tmp / f).stat().st_size for f in set(weight_map.values()))
            _write_json(
                self.tmp / INDEX_FILE,
                {"metadata": {"total_size": total_size}, "weight_map": weight_map},
            )
        _write_json(self.tmp / "config.json", config)
        if tokenizer_from is not None:
            for src in Path(tokenizer_from).iterdir():
                if src.name in TOKENIZER_FILES and src.is_file():
                    shutil.copy2(src, self.tmp / src.name)
        if metadata is not None:
            meta = {"slimstack_version": _version(), "created": _now(), **metadata}
            _write_json(self.tmp / METADATA_FILE, meta)
        replace_folder(self.tmp, self.target)
        self._finished = True
        return self.target


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _version() -> str:
    from slimstack import __version__

    return __version__
