"""Work handed from the event loop to a thread, its result handed back: the part of
``loop.run_in_executor`` the records repository and the ledger keep, without its second
future and wrapper per call (``docs/decisions/read-path-cpu.md``).

``run_and_settle`` runs on the thread; the caller created ``future`` on ``loop`` and awaits
it. Work whose caller was cancelled before it began is skipped, as the executor skips a
cancelled work item; a result that arrives for a cancelled future is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["run_and_settle", "settle", "settle_all"]

_T = TypeVar("_T")


def run_and_settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[_T],
    work: Callable[[], _T],
    context: contextvars.Context | None = None,
) -> None:
    """On a worker thread: run ``work`` (in ``context``, the caller's, if given) and settle
    ``future`` on ``loop`` with its result or its exception."""
    if future.cancelled():  # the caller stopped waiting before it began
        return
    try:
        result = context.run(work) if context is not None else work()
    except BaseException as exc:  # handed to the caller, as the executor's future would
        outcome: tuple[_T | None, BaseException | None] = (None, exc)
    else:
        outcome = (result, None)
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
        loop.call_soon_threadsafe(settle, future, *outcome)


def settle(future: asyncio.Future[_T], result: _T | None, exc: BaseException | None) -> None:
    """On the loop: give ``future`` its outcome, unless its caller left (or it has one)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # None only with an exception


def settle_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """On the loop: :func:`settle` each of a batch's outcomes."""
    for future, result, exc in outcomes:
        settle(future, result, exc)
