"""`python -m d2v COMMAND ...` (also the `d2v` console script)."""
from __future__ import annotations

import os
import sys

COMMANDS = {
    "describe": "d2v.estimate.describe",
    "export": "d2v.export",
    "import-fairseq": "d2v.interop.fairseq_import",
    "plan": "d2v.plan",
    "probe": "d2v.finetune.probe:main_shards",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m d2v {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    from d2v.safe_load import RefusedFile

    try:
        module, _, function = COMMANDS[argv[0]].partition(":")
        getattr(importlib.import_module(module), function or "main")(argv[1:])
    except RefusedFile as e:  # a file that is not plain weights: the message says which and why
        print(f"python -m d2v {argv[0]}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, KeyError, OSError) as e:  # bad input: one line (the traceback with D2V_TRACEBACK=1)
        if os.environ.get("D2V_TRACEBACK"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: python -m d2v {argv[0]}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
