"""``pace-train``: fine-tuning with PACE from the command line; ``main(argv)`` returns the exit status."""

from .cli import build_parser, main

__all__ = ["main", "build_parser"]
