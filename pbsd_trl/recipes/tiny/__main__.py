"""`python -m pbsd_trl.recipes.tiny build|verify`: build a base model with its manifest, or check one."""

import argparse
import json

from .sft import DEFAULT_WARM_START_STEPS
from .shipped import build_base_model, verify_base_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbsd_trl.recipes.tiny", description="Tiny offline base models.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="Build the default recipe's base model of a task, with its manifest.")
    build.add_argument("task", choices=sorted(DEFAULT_WARM_START_STEPS))
    build.add_argument("--output_dir", required=True)
    build.add_argument("--num_threads", type=int, default=1, help="torch threads (the shipped copies used 1).")
    build.add_argument("--no_evaluate", action="store_true", help="Skip the held-out quality measurement.")
    verify = commands.add_parser("verify", help="Check a base-model directory against its checksums.")
    verify.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "build":
        manifest = build_base_model(
            args.task, args.output_dir, num_threads=args.num_threads, evaluate=not args.no_evaluate
        )
        print(
            json.dumps(
                {
                    k: manifest[k]
                    for k in ("task", "steps", "build_seconds", "build_cpu_seconds", "cpu", "quality")
                    if k in manifest
                },
                indent=2,
            )
        )
    else:
        verify_base_model(args.path)
        print(f"{args.path}: every file matches its checksum.")


if __name__ == "__main__":
    main()
