"""Progress bars that say where in a run they are: ``stage 5 of 10, RTN w4a8: perplexity``.

A run's evaluation and training bars are drawn deep inside library calls that know nothing of
the run around them; the command sets the label once per stage (:class:`StagePlan`) and every bar
drawn inside takes it as a prefix (:func:`bar_desc`). A context variable rather than an argument
threaded through every call: the label is display only and never changes a result.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Iterator

_LABEL: ContextVar[str] = ContextVar("tfqat_stage_label", default="")


def bar_desc(what: str) -> str:
    """A progress bar's description, prefixed with the current stage label when there is one (the
    label alone when it already ends with ``what``: ``stage 5 of 9, QAT w4a4-8``)."""
    label = _LABEL.get()
    if not label:
        return what
    return label if label.endswith(f", {what}") else f"{label}: {what}"


@contextlib.contextmanager
def stage_label(label: str) -> Iterator[None]:
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


class StagePlan:
    """Numbers the stages of one command: ``with plan("RTN w4a8"):`` labels bars ``stage 4 of 9, RTN w4a8``
    and (with ``announce``) prints that line when the stage starts."""

    def __init__(self, names: list[str], announce: bool = True):
        self.names = list(names)
        self.done = 0
        self.announce = announce

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if name not in self.names:
            raise ValueError(f"stage {name!r} is not in the plan {self.names}")
        label = f"stage {self.names.index(name) + 1} of {len(self.names)}, {name}"
        if self.announce:
            print(label, file=sys.stderr, flush=True)
        with stage_label(label):
            yield
        self.done += 1
