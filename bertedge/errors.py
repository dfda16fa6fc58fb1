"""The one exception type bertedge raises for bad input; the CLI turns it into a one-line error."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class BertedgeError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}" if fix else problem)


def find_in_chain(error: BaseException, kind: type[E],
                  inner: Callable[[BaseException], BaseException | None] = lambda e: None) -> E | None:
    """The first exception of type `kind` in `error`'s chain (`inner`, then `__cause__`, then
    `__context__`): what a library wrapped our exception into (Ray's task errors, an extension
    module's "ImportError: initialization failed").

    >>> try:
    ...     try:
    ...         raise BertedgeError("bad")
    ...     except BertedgeError:
    ...         raise RuntimeError("wrapped")
    ... except RuntimeError as e:
    ...     find_in_chain(e, BertedgeError).problem, find_in_chain(e, KeyError)
    ('bad', None)
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = inner(current) or current.__cause__ or current.__context__
    return None
