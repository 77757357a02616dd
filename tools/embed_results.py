"""Copy generated tables into README.md between markers, so the README never holds a typed number.

    <!-- BEGIN results/real_iemocap6/table.md -->
    ...replaced by the file's content...
    <!-- END results/real_iemocap6/table.md -->

Usage: python tools/embed_results.py [README.md]   (--check: exit 1 if the README is out of date)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MARKER = re.compile(r"(<!-- BEGIN (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END (?P=path) -->)", re.S)


def embed(text: str, root: Path) -> str:
    def repl(m: re.Match[str]) -> str:
        path = root / m.group("path")
        body = path.read_text().rstrip("\n") + "\n" if path.is_file() else f"*(not generated yet: {path.name})*\n"
        return m.group(1) + body + m.group(4)

    return MARKER.sub(repl, text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    readme = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "README.md"
    old = readme.read_text()
    new = embed(old, readme.parent)
    if check:
        return int(new != old)
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
