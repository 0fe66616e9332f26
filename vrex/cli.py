"""The one `vrex` command line. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# (module, function) pairs: each function takes the subparsers object and adds its commands.
# Imported lazily so `vrex sim ...` never pays for torch/transformers and vice versa.
_REGISTRARS: list[tuple[str, str]] = [
    ("vrex.engine.cli", "register"),
    ("vrex.models.cli", "register"),
    ("vrex.kv.cli", "register"),
    ("vrex.engine.bench", "register"),
    ("server.cli", "register"),
    ("sim.cli", "register"),
    ("vrex.codesign", "register"),
    ("vrex.power", "register"),
    ("benchmarks.cli", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrex", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name, func_name in _REGISTRARS:
        module = __import__(module_name, fromlist=[func_name])
        register: Callable[[argparse._SubParsersAction], None] = getattr(module, func_name)
        register(sub)
    return parser


def _version() -> str:
    from vrex import __version__

    return f"vrex {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vrex ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"vrex: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
