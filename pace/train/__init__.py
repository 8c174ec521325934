"""``pace-train``: fine-tuning with PACE from the command line.

``main(argv)`` runs the trainer and returns its exit status; ``pace-train --help`` lists the flags.
Without ``--data`` it runs a built-in experiment on scikit-learn's digits that needs no download.
"""

from .cli import build_parser, main

__all__ = ["main", "build_parser"]
