"""Errors of the data pipeline.

`BadInput` is raised by the low-level media and format code with a reason only (it does not know which sample it is
reading); `SampleError` is what callers see: the dataset, the sample index and the reason, so a user can find the
line. `TooManySkipped` stops training when the skipped fraction passes the configured ceiling.
"""

from __future__ import annotations


class BadInput(ValueError):
    """A problem with the data itself (missing file, corrupt image, wrong placeholder count...)."""


class SampleError(Exception):
    """A sample that cannot be used, naming where it came from.

    kind is "bad" (unreadable or invalid input) or "overlength" (longer than max_length and not truncatable).
    """

    def __init__(self, dataset: str, index: int, reason: str, kind: str = "bad"):
        self.dataset, self.index, self.reason, self.kind = dataset, index, reason, kind
        super().__init__(f"{dataset} sample {index}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (SampleError, (self.dataset, self.index, self.reason, self.kind))


class TooManySkipped(RuntimeError):
    """Raised when the fraction of skipped samples passes `max_skip_fraction`."""
