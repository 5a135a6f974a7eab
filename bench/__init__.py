"""Benchmarks: ``python -m bench <scenario> [options]``; each scenario is a module here with ``main(argv)``."""
