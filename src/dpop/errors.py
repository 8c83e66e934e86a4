"""Errors a user can cause. The CLI prints these as one clear message, without a traceback."""


class DpopError(Exception):
    """Base class: the message names the thing that is wrong and what to do about it."""


class ConfigError(DpopError):
    """A bad config key or value."""


class DataError(DpopError):
    """Bad rows in a data file; `problems` lists them (file, line/row, field, reason)."""

    max_listed = 20

    def __init__(self, problems: list[str], total: int | None = None, header: str = "invalid data"):
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        listed = self.problems[: self.max_listed]
        lines = [f"{header}: {self.total} problem(s)"] + [f"  {p}" for p in listed]
        if self.total > len(listed):
            lines.append(f"  ... and {self.total - len(listed)} more")
        super().__init__("\n".join(lines))


class ModelError(DpopError):
    """A model that cannot be found or loaded."""


class TrainingError(DpopError):
    """A run that cannot go on: its loss or gradient kept being non-finite (see dpop.training.stopping)."""
