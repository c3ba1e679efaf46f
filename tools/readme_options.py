"""Write (``--write``) or check the README's "All options" block, made by
:func:`onnxzip.cli.options_reference` from the parser, the pass schemas and the recipe keys."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from onnxzip.cli import options_reference

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- options -->\n)(.*?)(<!-- /options -->)", re.S)


def current_block(text: str) -> str:
    """The README's block between the markers."""
    match = BLOCK.search(text)
    if match is None:
        raise SystemExit("README.md has no <!-- options --> ... <!-- /options --> block")
    return match.group(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the block in README.md")
    args = parser.parse_args()
    text = README.read_text()
    wanted = options_reference()
    if current_block(text) == wanted:
        print("README options are up to date")
        return 0
    if not args.write:
        print("README options are stale: run python tools/readme_options.py --write")
        return 1
    README.write_text(BLOCK.sub(lambda m: m.group(1) + wanted + m.group(3), text))
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
