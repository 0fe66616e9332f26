"""Regenerate the Python stubs in this folder from proto/vrex/v1/vrex.proto.

    python -m vrex.api.generate            # rewrite vrex/api/vrex_pb2*.py(i)
    python -m vrex.api.generate --check    # exit 1 if the committed stubs are stale

protoc writes `vrex/v1/vrex_pb2*.py` (the proto's own path); we flatten them into this
package and point the grpc module's import at `vrex.api`, so the generated `vrex.v1` path
never shadows our `vrex` package. The descriptor keeps its full name `vrex/v1/vrex.proto`,
which is what reflection clients (grpcurl) see.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
PROTO_ROOT = API_DIR.parents[1] / "proto"
PROTO_FILE = "vrex/v1/vrex.proto"
OUTPUT_NAMES = ("vrex_pb2.py", "vrex_pb2.pyi", "vrex_pb2_grpc.py")


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Run grpc_tools.protoc and return {file name: text} of the flattened stubs.

    Args:
        out_dir: where to write the files (created if missing).
        proto_root: the folder holding `vrex/v1/vrex.proto`.
    """
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto_root / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO_FILE}")
        texts = {name: (Path(tmp) / "vrex" / "v1" / name).read_text() for name in OUTPUT_NAMES}
    texts["vrex_pb2_grpc.py"] = texts["vrex_pb2_grpc.py"].replace(
        "from vrex.v1 import vrex_pb2 as", "from vrex.api import vrex_pb2 as"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    return texts


def stale_files(api_dir: Path = API_DIR) -> list[str]:
    """Names of the stubs in `api_dir` that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = []
    for name, text in fresh.items():
        path = api_dir / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that the stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale gRPC stubs: {', '.join(stale)}; run `python -m vrex.api.generate`", file=sys.stderr)
            return 1
        print("gRPC stubs are current")
        return 0
    generate(API_DIR)
    print(f"wrote {', '.join(OUTPUT_NAMES)} to {API_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
