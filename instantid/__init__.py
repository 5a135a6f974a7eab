"""InstantID on plain torch, built on ``cow_model``."""

from instantid.weights import AdapterFormatError, InstantIDWeights, load_instantid

__version__ = "0.1.0"
"""The one version source: the distribution's (pyproject reads it) and the Comfy Registry's."""

__all__ = ["AdapterFormatError", "InstantIDWeights", "__version__", "load_instantid"]
