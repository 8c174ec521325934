"""``python -m pace.train`` (and ``torchrun -m pace.train``) runs the trainer."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
