"""mmgrad's version: the one place it is written (setup.py reads this file, checkpoints carry it)."""

__version__ = "0.4.0"
