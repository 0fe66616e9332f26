"""The one `vrex` command line. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# (module, function, commands it adds): each function takes the subparsers object and adds its
# commands. Only the named command's module is imported, so `vrex sim ...` never pays for
# torch/transformers (seconds) and vice versa. `vrex --help` imports them all, so these modules
# define their parsers without torch and import it in the handlers (tests/test_cli.py checks).
_REGISTRARS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vrex.engine.cli", "register", ("run",)),
    ("vrex.models.cli", "register", ("model",)),
    ("vrex.kv.cli", "register", ("kv-bench",)),
    ("vrex.engine.bench", "register", ("engine-bench",)),
    ("server.cli", "register", ("serve", "stream")),
    ("sim.cli", "register", ("sim",)),
    ("vrex.codesign", "register", ("codesign",)),
    ("vrex.power", "register", ("power",)),
    ("benchmarks.cli", "register", ("bench",)),
]


DESCRIPTION = (
    "V-Rex: real-time streaming video-LLM inference (iterative prefill, a tiered KV cache, ReSV "
    "retrieval), its gRPC server and clients, and a cycle-level simulator of the V-Rex "
    "accelerator. `vrex COMMAND --help` for each command."
)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrex", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), None)
    wanted = [r for r in _REGISTRARS if command in r[2]] or _REGISTRARS
    for module_name, func_name, _ in wanted:
        module = __import__(module_name, fromlist=[func_name])
        register: Callable[[argparse._SubParsersAction], None] = getattr(module, func_name)
        register(sub)
    return parser


def _version() -> str:
    from vrex import __version__

    return f"vrex {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    # a progress bar per model load is noise on a command line (read before transformers loads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser(argv)
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
    except OSError as exc:  # an unwritable --out, a file where a folder should be, a full disk
        where = f": {exc.filename}" if exc.filename else ""
        print(f"vrex: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
