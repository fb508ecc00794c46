"""Command line: ``python -m jaxcomp --config configs/x.py[:variant] --workdir DIR``."""
