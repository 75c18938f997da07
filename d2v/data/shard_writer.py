"""Writing WebDataset shards and their sidecar, the same way for every modality (docs/method.md §4).

`prepare` for audio, images and text all write through `ShardWriter`: plain USTAR tars with fixed
member metadata (reproducible bytes), a new shard past a size or count limit, and for every shard
the (key, length) of each sample in tar order plus the shard's final size in bytes. `write_sidecar`
stores that as `lengths.json`, which the loader plans every epoch from and checks the files against
before training starts. `claim_output` keeps a second `prepare` from mixing its shards with an
earlier run's; `check_output` refuses a folder that cannot be written before any work, and
`naming_full_disk` says which folder filled its device.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from typing import Any, Iterator, Sequence

from d2v.data.shards import SIDECAR_NAME, brace_pattern

# What an earlier `prepare` leaves in its output folder (shards, sidecars, reports, tokenizer).
_OUTPUT_SUFFIXES = (".tar", ".tar.tmp")
_OUTPUT_FILES = (SIDECAR_NAME, "index.json", "report.json", "prepare_report.json", "tokenizer.json",
                 "classes.json")


# A USTAR member name without a slash holds at most 100 characters: room for the key's extension.
MAX_KEY_LENGTH = 90


def unique_keys(names: Sequence[str]) -> list[str]:
    """One sample key per name, every key distinct, in the order given (sort the names first for
    keys that do not depend on listing order).

    Characters outside [A-Za-z0-9_-] become `_` (WebDataset reads a dot as the start of the
    extension), so distinct names can sanitize alike: the later ones get `_1`, `_2`, ... Overlong
    keys keep their start and a hash of the whole name.
    """
    seen: set[str] = set()
    keys = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"
        if len(base) > MAX_KEY_LENGTH:
            base = f"{base[:MAX_KEY_LENGTH - 9]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        key, n = base, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def check_output(out: str) -> None:
    """Refuses an output folder that cannot be written, before any work; creates nothing.

    An existing folder is probed with a real file (permissions, read-only mounts, squashed root);
    a folder still to be made needs a writable nearest existing parent.
    """
    if os.path.isdir(out):
        try:
            fd, probe = tempfile.mkstemp(dir=out, prefix=".d2v-write-check-")
        except OSError as err:
            raise OSError(err.errno, f"output folder {out} is not writable ({err.strerror}): choose another OUT "
                                     f"or make it writable") from None
        os.close(fd)
        os.remove(probe)
        return
    if os.path.exists(out):
        raise NotADirectoryError(f"output folder {out} is a file: choose a folder for OUT")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"output folder {out} cannot be created: {parent} is not a writable folder")


@contextlib.contextmanager
def naming_full_disk(out: str) -> Iterator[None]:
    """Turns "no space left" (or an exceeded quota) while writing into a message naming `out`:
    the error from a tar write names no file."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(err.errno, f"no space left on the device holding {out} ({err.strerror}): free space there "
                                 f"or choose another OUT, then re-run with --clean") from err


def claim_output(out: str, *, clean: bool) -> None:
    """Creates `out`, or refuses one that holds an earlier prepare's shards (or removes them with clean).

    Shards from two runs side by side would be read as one corpus: the old ones with a stale
    tokenizer or split, and a brace pattern over the new count would silently skip the rest.
    """
    os.makedirs(out, exist_ok=True)
    stale = sorted((n for n in os.listdir(out) if n.endswith(_OUTPUT_SUFFIXES) or n in _OUTPUT_FILES
                    or n.startswith("spm.")), key=lambda n: (not n.endswith(".tar"), n))  # shards first
    if not stale:
        return
    if not clean:
        shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        raise FileExistsError(f"{out} already holds the output of an earlier prepare ({shown}): choose an empty "
                              f"folder, or pass --clean to delete those files first")
    for name in stale:
        os.remove(os.path.join(out, name))


class ShardWriter:
    """Writes `{prefix}-NNNNNN.tar` shards, starting a new one past a size or count limit."""

    def __init__(self, out: str, prefix: str, max_bytes: int | None = None, max_count: int | None = None):
        if max_bytes is None and max_count is None:
            raise ValueError("give a shard size or a sample count per shard")
        self.out, self.prefix, self.max_bytes, self.max_count = out, prefix, max_bytes, max_count
        self.shards: dict[str, list[tuple[str, int]]] = {}
        self.sizes: dict[str, int] = {}
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._bytes = 0

    def _start(self) -> None:
        self.close()
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(os.path.join(self.out, self._name), "w", format=tarfile.USTAR_FORMAT)
        self.shards[self._name] = []
        self._bytes = 0

    def write(self, key: str, fields: dict[str, bytes], length: int) -> None:
        """One sample: `fields` maps an extension to its bytes; `length` is what batching plans with."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r}: keys must be non-empty, without dots or slashes")
        if key in self._keys:  # a reader would merge the two samples, or the sidecar outcount the tar
            raise ValueError(f"sample key {key!r} written twice to {self.prefix} shards")
        self._keys.add(key)
        entries = self.shards.get(self._name)
        full = entries is not None and (
            (self.max_count is not None and len(entries) >= self.max_count)
            or (self.max_bytes is not None and self._bytes >= self.max_bytes))
        if self._tar is None or full:
            self._start()
        assert self._tar is not None
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data) + 512
        self.shards[self._name].append((key, int(length)))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self.sizes[self._name] = os.path.getsize(os.path.join(self.out, self._name))

    def pattern(self) -> str | None:
        """The brace pattern of the shards written, for the launcher (None when none were)."""
        return brace_pattern(os.path.join(self.out, f"{self.prefix}-"), len(self.shards)) if self.shards else None


def write_sidecar(out: str, writers: list[ShardWriter], **extra: Any) -> None:
    """`lengths.json`: every shard's (key, length) list and byte size, plus `extra` fields."""
    shards: dict[str, list[tuple[str, int]]] = {}
    sizes: dict[str, int] = {}
    for w in writers:
        w.close()
        shards.update(w.shards)
        sizes.update(w.sizes)
    tmp = os.path.join(out, SIDECAR_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**extra, "shards": shards, "sizes": sizes}, f)
    os.replace(tmp, os.path.join(out, SIDECAR_NAME))
