"""``python -m instantid doctor [MODELS_DIR]``: the ``instantid`` command without installing the package."""

import sys

from instantid.cli import main

sys.exit(main(prog="python -m instantid"))
