"""``vrex model ...``: prepare the demo model, describe a checkpoint folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _prepare_demo(args: argparse.Namespace) -> int:
    from vrex.host import check_output_path
    from vrex.models.demo import DEMO_NOTICE, MARKER_FILE, ensure_demo_model

    # errors raise (ValueError): the CLI prints them on stderr, so stdout stays clean for --json
    check_output_path(args.cache_dir, "--cache-dir", folder=True)
    started = time.perf_counter()
    folder = ensure_demo_model(Path(args.cache_dir) if args.cache_dir else None)
    marker = json.loads((folder / MARKER_FILE).read_text())
    report = {
        "path": str(folder),
        "elapsed_s": round(time.perf_counter() - started, 2),
        "conversion_s": marker.get("conversion_s"),
        # the vision tower's tokens; a frame in the LLM adds its wrapper tokens (`vrex model info`)
        "image_tokens_per_frame": marker.get("visual_tokens_per_frame"),
        "notice": DEMO_NOTICE,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"demo model: {folder}  (converted in {report['conversion_s']} s; this call {report['elapsed_s']} s)"
        )
        print(DEMO_NOTICE)
    return 0


def _info(args: argparse.Namespace) -> int:
    from vrex.models.adapters import load_model
    from vrex.models.demo import DEMO_NOTICE, is_demo_model

    started = time.perf_counter()
    adapter = load_model(args.model)  # a ValueError reaches the CLI, which prints it on stderr
    report = {
        "path": str(adapter.path),
        "family": adapter.family,
        "load_s": round(time.perf_counter() - started, 2),
        "num_layers": adapter.num_layers,
        "num_heads": adapter.num_heads,
        "num_kv_heads": adapter.num_kv_heads,
        "head_dim": adapter.head_dim,
        "hidden_size": adapter.hidden_size,
        "kv_bytes_per_token": 2
        * adapter.num_layers
        * adapter.num_kv_heads
        * adapter.head_dim
        * adapter.dtype.itemsize,
        "eos_token_ids": list(adapter.eos_token_ids),
        "demo": is_demo_model(adapter.path),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")
        if report["demo"]:
            print(DEMO_NOTICE)
    return 0


def register(subparsers) -> None:
    """Add ``vrex model prepare-demo`` and ``vrex model info DIR``."""
    parser = subparsers.add_parser("model", help="prepare the demo model or describe a model folder")
    actions = parser.add_subparsers(dest="model_command", required=True)

    prepare = actions.add_parser("prepare-demo", help="convert the embedded demo model once into the cache")
    prepare.add_argument("--cache-dir", help="cache parent folder (default $VREX_CACHE or ~/.cache/vrex)")
    prepare.add_argument("--json", action="store_true", help="print one JSON object")
    prepare.set_defaults(func=_prepare_demo)

    info = actions.add_parser("info", help="load a local checkpoint folder and print its family and shapes")
    info.add_argument("model", help="checkpoint folder")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)
