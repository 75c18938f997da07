"""Brace-expanded shard patterns (`train-{000000..000011}.tar`), checked against the disk."""
from __future__ import annotations

import os

import braceexpand


def expand_shards(pattern: str, *, must_exist: bool = True) -> list[str]:
    """The shard paths a pattern names; an empty pattern, or one naming no existing file, is an error."""
    if not pattern:
        raise ValueError("empty shard pattern")
    paths = [p for part in pattern.split("::") for p in braceexpand.braceexpand(part)]
    if must_exist:
        missing = [p for p in paths if not os.path.exists(p)]
        if len(missing) == len(paths):
            raise FileNotFoundError(f"shard pattern {pattern!r} matches no existing file")
        if missing:
            raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(paths)} shards are missing, "
                                    f"e.g. {missing[0]}")
    return paths
