"""DataError: a dataset that cannot be loaded as configured."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be loaded as configured; the message names the dataset and the path."""
