"""The ``instantid`` console script: ``instantid doctor [MODELS_DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instantid", description="InstantID tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor",
        help="check a ComfyUI models folder for the antelopev2 models, the InstantID adapter and IdentityNet",
        description="Check MODELS_DIR for insightface/models/antelopev2, instantid/ and controlnet/; print what "
        "is present, missing or wrong and where each file belongs. Exit status 1 when something is missing or "
        "wrong.",
    )
    doctor.add_argument(
        "models_dir",
        nargs="?",
        type=Path,
        metavar="MODELS_DIR",
        help="the ComfyUI models folder (default: $COMFYUI_MODELS, else ./models)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from instantid import doctor

    models_dir = args.models_dir or doctor.default_models_dir()
    if not models_dir.is_dir():
        print(
            f"instantid doctor: {models_dir} is not a folder; pass the ComfyUI models folder", file=sys.stderr
        )
        return 2
    findings = doctor.diagnose(models_dir)
    print(doctor.format_report(models_dir, findings))
    return 1 if doctor.has_problems(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
