"""Modality-generic WebDataset shard handling: patterns, the length sidecar, epoch plans, reading.

docs/method.md §4 ("Data"). The loaders never ask WebDataset which samples a rank gets: every rank
reads the length sidecar written by `d2v.data.prepare` and computes, without communication or
decoding, the same epoch plan (shard order, each stream's slice, its batches). A "stream" is
one (rank, loader worker) pair; streams read disjoint, contiguous slices of the epoch's sample
sequence, cut at sample boundaries so that their sizes differ by at most one sample.

Shards are plain tar files in the WebDataset layout (`KEY.EXT` members, members of a sample
adjacent, keys without dots); this module reads them with `tarfile` so that it can seek past
samples that a stream does not own and survive corrupt or truncated shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from braceexpand import braceexpand

SIDECAR_NAME = "lengths.json"


def expand_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Brace-expands one pattern or several (a list, or one string split on whitespace).

    Raises FileNotFoundError naming the pattern when any expanded shard does not exist: training
    silently on part of a corpus is worse than stopping.
    """
    patterns = pattern.split() if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ValueError("empty shard pattern: pass e.g. 'shards/train-{000000..000011}.tar'")
    paths: list[str] = []
    for pat in patterns:
        expanded = list(braceexpand(pat))
        missing = [p for p in expanded if not os.path.isfile(p)]
        if len(missing) == len(expanded):
            raise FileNotFoundError(f"shard pattern {pat!r} matches no existing shard (first tried: {expanded[0]})")
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shards of {pat!r} do not exist: {shown}")
        paths.extend(expanded)
    seen: dict[str, str] = {}
    for path in paths:  # one file under two spellings (x.tar, ./x.tar, a link) is one shard
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"shard pattern {pattern!r} names one shard twice ({seen[real]} and {path}): "
                             f"an epoch would read it twice")
        seen[real] = path
    return paths


def brace_pattern(prefix: str, count: int, suffix: str = ".tar") -> str:
    """`train-{000000..000011}.tar` for count 12 (the pattern to pass to the launcher)."""
    if count == 1:
        return f"{prefix}000000{suffix}"
    return f"{prefix}{{000000..{count - 1:06d}}}{suffix}"


@dataclass(frozen=True)
class ShardIndex:
    """What the sidecar says about the shards in use: paths and each shard's (key, length) list."""

    paths: list[str]
    keys: list[list[str]]
    lengths: list[np.ndarray]  # int64 per shard, in tar order

    @property
    def num_samples(self) -> int:
        return int(sum(len(k) for k in self.keys))


def load_index(paths: Sequence[str], lengths_file: str | None = None, *, scan_unlisted: bool = False) -> ShardIndex:
    """Reads the length sidecar(s): `lengths_file`, else `lengths.json` beside each shard.

    Fails before training starts when the sidecar and the files disagree: a shard it does not list,
    one whose size on disk is not the size `prepare` recorded (truncated, rewritten, or from
    another run), or one whose samples (read from its tar headers) are not the ones it lists.
    scan_unlisted (fixed-size batching only, where lengths do not matter) reads the keys of shards
    without a sidecar from their tar headers instead, every length 1.
    """
    tables: dict[str, dict | None] = {}
    keys: list[list[str]] = []
    lengths: list[np.ndarray] = []
    for path in paths:
        sidecar = lengths_file or os.path.join(os.path.dirname(path) or ".", SIDECAR_NAME)
        if sidecar not in tables:
            if os.path.isfile(sidecar):
                with open(sidecar) as f:
                    tables[sidecar] = json.load(f)
            elif scan_unlisted:
                tables[sidecar] = None
            else:
                raise FileNotFoundError(
                    f"no length sidecar {sidecar} for shard {path}: shards written by "
                    "`python -m d2v.data.prepare` have one; or pass lengths_file")
        table = tables[sidecar]
        name = os.path.basename(path)
        if table is None:
            shard_keys = scan_keys(path)
            keys.append(shard_keys)
            lengths.append(np.ones(len(shard_keys), dtype=np.int64))
            continue
        entry = table["shards"].get(name)
        if entry is None:
            raise KeyError(f"shard {name} is not listed in {sidecar}: re-run `python -m d2v.data.prepare` "
                           f"for this folder, or leave the shard out of the pattern")
        recorded = table.get("sizes", {}).get(name)
        if recorded is not None and os.path.getsize(path) != recorded:
            raise ValueError(f"shard {path} is {os.path.getsize(path)} bytes but {sidecar} records {recorded}: "
                             f"the file changed after `prepare` wrote it (truncated or replaced); restore it, "
                             f"re-run prepare, or leave it out of the pattern")
        listed = [k for k, _ in entry]
        _check_members(path, sidecar, listed)
        keys.append(listed)
        lengths.append(np.asarray([n for _, n in entry], dtype=np.int64))
    return ShardIndex(list(paths), keys, lengths)


def _check_members(path: str, sidecar: str, listed: list[str]) -> None:
    """The shard's samples (from its tar headers) must be the ones the sidecar lists, in order.

    A sidecar that lists part of a shard would make every epoch skip the rest uncounted. A shard
    that ends early (truncated: its samples a prefix of the list) is left to the reader, which
    counts what it lost; the size check above already refuses one the sidecar has a size for.
    """
    found, complete = header_keys(path)
    if found == listed or (not complete and found == listed[: len(found)]):
        return
    if len(found) != len(listed):
        what = f"holds {len(found)} samples but {sidecar} lists {len(listed)}"
        first = next((i for i, (a, b) in enumerate(zip(found, listed)) if a != b), None)
        if first is None and len(found) > len(listed):
            what += f" (first not listed: {found[len(listed)]!r})"
        elif first is None:
            what += f" (first listed but absent: {listed[len(found)]!r})"
        else:
            what += f" (sample {first} is {found[first]!r} in the tar, {listed[first]!r} in the sidecar)"
    else:
        first = next(i for i, (a, b) in enumerate(zip(found, listed)) if a != b)
        what = f"sample {first} is {found[first]!r} in the tar but {listed[first]!r} in {sidecar}"
    raise ValueError(f"shard {path} {what}: the sidecar does not describe this file; re-run prepare "
                     f"(`python -m d2v.data.prepare`) for this folder, or leave the shard out of the pattern")


def member_key_ext(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member name: WebDataset's `dir/KEY.EXT`, keys without dots."""
    key, _, ext = name.rpartition("/")[2].partition(".")
    return key, ext


_BLOCK = 512


def _scan_plain(path: str, keys: list[str]) -> bool | None:
    """_scan for archives of plain ustar headers (what d2v's prepare writes): one 512-byte read per
    member, about 15 times faster than tarfile, which matters at start for thousands of shards.
    None when a header needs tarfile (long names, pax records) or does not parse."""
    with open(path, "rb") as f:
        size_on_disk = os.fstat(f.fileno()).st_size
        offset = 0
        while True:
            f.seek(offset)
            header = f.read(_BLOCK)
            if len(header) < _BLOCK:
                return False  # the file ends inside the archive
            if not header.strip(b"\0"):
                return len(f.read(_BLOCK)) == _BLOCK and offset + 2 * _BLOCK <= size_on_disk
            kind = header[156:157]
            if kind not in (b"0", b"\0"):
                return None
            try:
                name = header[:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                return None
            key = member_key_ext(f"{prefix}/{name}" if prefix else name)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
            offset += _BLOCK + -(-size // _BLOCK) * _BLOCK


def _scan(path: str, keys: list[str]) -> bool:
    """Appends the sample keys of a tar shard to `keys` in member order, from its headers (no
    payload is read: tarfile seeks past it); True when the archive ends with its end-of-archive
    blocks, False when the file ends before them (truncated). Raises on an unreadable file."""
    complete = _scan_plain(path, keys)
    if complete is not None:
        return complete
    keys.clear()
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            key = member_key_ext(member.name)[0]
            if member.isfile() and (not keys or keys[-1] != key):
                keys.append(key)
        end = tar.offset  # where iteration stopped: the end-of-archive blocks of a whole file
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(1024)
    return len(marker) == 1024 and not marker.strip(b"\0")


def header_keys(path: str) -> tuple[list[str], bool]:
    """(sample keys in member order, whether the archive is whole); a file that cannot be read
    to its end gives the keys read before the damage and False."""
    keys: list[str] = []
    try:
        return keys, _scan(path, keys)
    except (OSError, tarfile.TarError, EOFError):
        return keys, False


def scan_keys(path: str) -> list[str]:
    """Sample keys of a tar shard in member order, from its headers (no data read)."""
    keys: list[str] = []
    try:
        _scan(path, keys)
    except (OSError, tarfile.TarError, EOFError) as err:
        raise ValueError(f"shard {path} cannot be read ({err}) and has no lengths.json beside it") from err
    return keys


def iter_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of one shard in order, as (key, {extension: bytes}); raises on a damaged shard
    (for tools that read a whole held-out set and must not silently evaluate part of it)."""
    current_key, fields = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = member_key_ext(member.name)
                if current_key is not None and key != current_key:
                    yield current_key, fields
                    fields = {}
                current_key = key
                fields[ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as err:
        raise ValueError(f"shard {path} is damaged after sample {current_key!r} ({type(err).__name__}: {err}): "
                         f"restore it or re-run prepare") from err
    if current_key is not None:
        yield current_key, fields


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, epoch, rank, worker, position).

    A hash rather than arithmetic so that neighbouring tuples give unrelated generators.
    """
    digest = hashlib.sha256(np.asarray(parts, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The order in which shards are read in `epoch`: a permutation seeded by (seed, epoch)."""
    rng = np.random.default_rng(stream_seed(seed, epoch, 0x5A4D))
    return rng.permutation(num_shards).tolist()


def slice_bounds(total: int, num_streams: int, stream: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of `total` items for `stream`; sizes differ by at most one."""
    return total * stream // num_streams, total * (stream + 1) // num_streams


# An item is (shard number in the ShardIndex, sample number inside that shard).
Item = tuple[int, int]


class ShardReader:
    """Reads raw samples (`{ext: bytes}`) of given items, tolerating damaged shards.

    Keeps the last shard open so that a stream walking forward through a shard does not rescan
    its headers. A shard that ends early (truncated tar) or cannot be opened is counted in
    `stats["bad_shards"]`; its requested samples that never appear count as `missing`.
    """

    def __init__(self, index: ShardIndex, stats: dict[str, int]):
        self.index = index
        self.stats = stats
        self._shard = -1
        self._tar: tarfile.TarFile | None = None
        self._pending: tarfile.TarInfo | None = None
        self._cursor = -1  # sample position of the last member read from the open shard
        self.broken: set[int] = set()
        self._positions: dict[int, dict[str, int]] = {}

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._shard, self._pending, self._cursor = None, -1, None, -1

    def _open(self, shard: int) -> None:
        self.close()
        try:
            self._tar = tarfile.open(self.index.paths[shard], mode="r:")
            self._shard = shard
        except (OSError, tarfile.TarError, EOFError):
            self._mark_broken(shard)

    def _mark_broken(self, shard: int) -> None:
        if shard not in self.broken:
            self.broken.add(shard)
            self.stats["bad_shards"] = self.stats.get("bad_shards", 0) + 1
        self.close()

    def _next_member(self) -> tarfile.TarInfo | None:
        if self._pending is not None:
            member, self._pending = self._pending, None
            return member
        assert self._tar is not None
        try:
            return self._tar.next()
        except (OSError, tarfile.TarError, EOFError):
            self._mark_broken(self._shard)
            return None

    def _key_position(self, shard: int, key: str) -> int:
        table = self._positions.get(shard)
        if table is None:
            table = self._positions[shard] = {k: i for i, k in enumerate(self.index.keys[shard])}
        return table.get(key, -1)

    def read(self, items: Sequence[Item]) -> dict[Item, dict[str, bytes]]:
        """Raw samples for `items`; samples that cannot be read are left out (and counted)."""
        wanted: dict[int, dict[str, int]] = {}
        for shard, sample in items:
            wanted.setdefault(shard, {})[self.index.keys[shard][sample]] = sample
        found: dict[Item, dict[str, bytes]] = {}
        for shard, by_key in wanted.items():
            if shard in self.broken:
                continue
            if shard != self._shard or min(by_key.values()) <= self._cursor:
                self._open(shard)
            last = max(by_key.values())
            while self._tar is not None:
                member = self._next_member()
                if member is None:
                    if any((shard, i) not in found for i in by_key.values()):
                        self._mark_broken(shard)  # ended before samples its sidecar lists: truncated
                    break
                key, ext = member_key_ext(member.name)
                position = self._key_position(shard, key)
                if position > last:
                    # First member past what this request needs: keep it for the next request.
                    self._pending = member
                    break
                self._cursor = max(self._cursor, position)
                sample = by_key.get(key)
                if sample is None or not member.isfile():
                    continue  # passed over without reading its data
                try:
                    found.setdefault((shard, sample), {})[ext] = self._tar.extractfile(member).read()
                except (OSError, tarfile.TarError, EOFError):
                    found.pop((shard, sample), None)
                    self._mark_broken(shard)
        missing = len(items) - len(found)
        if missing:
            self.stats["missing"] = self.stats.get("missing", 0) + missing
        return found
