"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class ICMDError(Exception):
    """A problem the user can fix: bad input, a refused plan, a missing file.

    The message is complete on its own: it names the file or option and says what is wrong
    and, where there is one, how to fix it.
    """


class DatasetIntegrityError(ICMDError):
    """One or more cases of a dataset failed the integrity check; ``problems`` lists them all.

    One problem is one line (it names its file); several are listed under a line naming the dataset.
    """

    def __init__(self, dataset: str, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{dataset}: {len(self.problems)} problem(s) found:\n{lines}")


class PlanningError(ICMDError):
    """The planner refuses: there is nothing to do, or the data cannot support the request."""
