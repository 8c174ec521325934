"""The two ways a run ends early, each mapped to an exit status by :func:`pace.train.main`."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input (flags, data, model, checkpoint): one line on stderr and exit status 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops (exit status 1) and the last checkpoint stays."""
