"""Run one benchmark scenario: ``python -m bench <scenario> [--help]``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def scenarios() -> list[str]:
    """Names of the scenario modules in this package (those defining ``main``)."""
    here = Path(__file__).parent
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(here)])
        if not m.name.startswith("_") and "\ndef main(" in (here / f"{m.name}.py").read_text()
    )


def main(argv: list[str]) -> int:
    names = scenarios()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench <scenario> [options]\nscenarios: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown scenario {name!r}; expected one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
