"""The ``sdpa-slicer`` command (also ``python -m sdpa_slicer``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sdpa_slicer._demo import HEADS, TOKENS, llama_attention_program
from sdpa_slicer._rewrite import slice_attention


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpa-slicer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help=f"slice a built-in Llama-style attention layer ({HEADS} heads, L = S = {TOKENS}, fp16)"
    )
    demo.set_defaults(run=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    prog = llama_attention_program()
    report = slice_attention(prog)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
