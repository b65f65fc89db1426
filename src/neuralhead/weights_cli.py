"""The ``neuralhead weights`` command: list, check and download pretrained weight files.

Self-contained so that the main CLI only calls :func:`add_weights_parser`; each action's
``func`` takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse

from neuralhead import weights
from neuralhead.errors import WeightsMissingError


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines)


def _state(row: dict) -> str:
    if not row["present"]:
        return "missing"
    if not row["pinned"]:
        return "present (no digest to check)"
    if row["verified"] is None:
        return "present"
    return "ok" if row["verified"] else "BAD SHA256"


def _list(args: argparse.Namespace) -> int:
    """Print every registered file, its licence and whether it is in the cache directory."""
    entries = {e.name: e for e in weights.registered_weights()}
    rows = [
        [
            row["name"],
            row["filename"],
            _state(row),
            entries[row["name"]].license,
            entries[row["name"]].used_by,
        ]
        for row in weights.status(verify=False)
    ]
    print(f"cache directory: {weights.cache_dir()}")
    print(_table(["NAME", "FILE", "STATE", "LICENCE", "USED BY"], rows))
    return 0


def _check(args: argparse.Namespace) -> int:
    """Verify every present file by SHA-256; exit 1 if any present file fails."""
    rows = weights.status(verify=True)
    print(f"cache directory: {weights.cache_dir()}")
    print(
        _table(
            ["NAME", "FILE", "STATE", "PATH"],
            [[r["name"], r["filename"], _state(r), r["path"]] for r in rows],
        )
    )
    bad = [r["name"] for r in rows if r["verified"] is False]
    if bad:
        print(f"{len(bad)} file(s) fail verification: {', '.join(bad)}; delete and download again")
        return 1
    return 0


def _download(args: argparse.Namespace) -> int:
    """Download one registered file into the cache directory (no-op if already verified)."""
    entry = weights.get_weights(args.name)
    if entry.url is None or entry.sha256 is None:
        # weights_path says how to make the file instead.
        weights.weights_path(entry.name, download=True)
    try:
        path = weights.weights_path(entry.name)
        print(f"{entry.name}: already present and verified at {path}")
        return 0
    except WeightsMissingError:
        pass
    print(f"downloading {entry.name} from {entry.url}")
    path = weights.weights_path(entry.name, download=True, progress=True)
    print(f"{entry.name}: saved to {path} (sha256 verified)")
    return 0


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``weights`` sub-command with ``list``, ``check`` and ``download NAME``."""
    parser = subparsers.add_parser(
        "weights",
        help="list, check and download pretrained weight files",
        description=(
            "Pretrained weight files live in the cache directory "
            "($NEURALHEAD_WEIGHTS, else $XDG_CACHE_HOME/neuralhead/weights, "
            "else ~/.cache/neuralhead/weights); see docs/weights.md."
        ),
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)
    actions.add_parser(
        "list", help="show registered files and whether they are present"
    ).set_defaults(func=_list)
    actions.add_parser(
        "check", help="verify present files by sha256 (exit 1 if one fails)"
    ).set_defaults(func=_check)
    download = actions.add_parser("download", help="download one file into the cache directory")
    download.add_argument("name", metavar="NAME", help="registry name, as shown by `weights list`")
    download.set_defaults(func=_download)
    return parser
