"""InstantID on plain torch, built on ``cow_model``."""
