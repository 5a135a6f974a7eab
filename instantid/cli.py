"""The ``instantid`` command: ``instantid doctor [MODELS_DIR]`` and ``instantid --version`` (console script
after ``pip install``), also ``python -m instantid ...`` from the pack's folder without installing it."""

from __future__ import annotations

import argparse
import sys


def _parser(prog: str) -> argparse.ArgumentParser:
    from instantid import __version__, doctor

    parser = argparse.ArgumentParser(prog=prog, description="InstantID tools.")
    parser.add_argument("--version", action="version", version=f"instantid {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_doctor = commands.add_parser(
        "doctor",
        help="check a ComfyUI models folder for the antelopev2 models, the InstantID adapter and IdentityNet",
        description=doctor.DESCRIPTION,
    )
    doctor.add_arguments(add_doctor)
    return parser


def main(argv: list[str] | None = None, prog: str = "instantid") -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); return its exit status."""
    from instantid import doctor

    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    return doctor.run(args.models_dir)


if __name__ == "__main__":
    sys.exit(main())
