"""Errors of the data pipeline.

`BadInput` is raised by the low-level media and format code with a reason only (it does not know which sample it is
reading); `SampleError` is what callers see: the dataset, the sample index, where the record sits in its file (file and
line) and the reason, so a user can find it. `TooManySkipped` stops training when the skipped fraction passes the
configured ceiling. All three are mistakes in the user's data: `vlft` reports them without a traceback (exit 2).
"""

from __future__ import annotations

from vlft.errors import UserError


class BadInput(UserError, ValueError):
    """A problem with the data itself (missing file, corrupt image, wrong placeholder count...)."""


class SampleError(UserError):
    """A sample that cannot be used, naming where it came from.

    kind is "bad" (unreadable or invalid input) or "overlength" (longer than max_length and not truncatable);
    where is e.g. "train.jsonl line 7" (empty when unknown).
    """

    def __init__(self, dataset: str, index: int, reason: str, kind: str = "bad", where: str = ""):
        self.dataset, self.index, self.reason, self.kind, self.where = dataset, index, reason, kind, where
        super().__init__(f"{sample_label(dataset, index, where)}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (SampleError, (self.dataset, self.index, self.reason, self.kind, self.where))


def sample_label(dataset: str, index: int, where: str = "") -> str:
    """How a sample is named in every message: "mine sample 3 (data/mine.jsonl line 4)"."""
    return f"{dataset} sample {index}" + (f" ({where})" if where else "")


class TooManySkipped(UserError, RuntimeError):
    """Raised when the fraction of skipped samples passes `max_skip_fraction`."""
