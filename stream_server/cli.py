"""The ``sana-wm-stream`` command line. Every failure ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_info(args: argparse.Namespace) -> int:
    from world_model.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(info.__dict__, indent=2, default=str))
    else:
        print("\n".join(info.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sana-wm-stream", description="Live SANA-WM world streaming server and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="check a checkpoint folder and print what it holds")
    info.add_argument("--checkpoint", required=True, help="release folder, transformer/ folder or weights file")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"sana-wm-stream {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"sana-wm-stream {args.command}: error: missing dependency {exc.name!r}; install the project (and the 'gpu' extra for GPU features)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
