"""InstantID on plain torch, built on ``cow_model``."""

from instantid.weights import AdapterFormatError, InstantIDWeights, load_instantid

__all__ = ["AdapterFormatError", "InstantIDWeights", "load_instantid"]
