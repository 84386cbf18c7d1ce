"""How a backfill process ends when it is told to stop, and how its audit row stays honest.

Kubernetes stops a Job's container with SIGTERM (suspend, delete, ``activeDeadlineSeconds``),
then SIGKILL after the grace period. SIGTERM here interrupts the current window the way Ctrl-C
does (dbt cancels its open queries, the compiled engine's transaction is rolled back), so the
runner can still close the audit row as ``cancelled`` and exit with 143 (128 + SIGTERM).

What no handler can catch (SIGKILL, a lost database, a vanished node) leaves the row
``running``; the :class:`Heartbeat` keeps ``heartbeat_at`` fresh while the process lives, so
history shows such a row as ``abandoned`` once the beats stop.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Self

from dbtbackfill.core import audit

if TYPE_CHECKING:
    import sqlalchemy as sa

EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C would be (dbt handles both alike)."""


@dataclass
class Stop:
    """The signal that stopped the run, if any (dbt reports an interrupt as a failed run)."""

    signum: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.signum == signal.SIGTERM else EXIT_SIGINT

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "interrupt"


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """Turn the first SIGTERM or SIGINT into an exception; later ones are ignored while we clean up.

    Only the main thread can install handlers; elsewhere (an embedding caller) nothing changes.
    """
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.signum is not None:
            return
        stop.signum = signum
        raise Terminated(signal.Signals(signum).name) if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Heartbeat:
    """Beats ``heartbeat_at`` every :data:`audit.HEARTBEAT_SECONDS` from a thread, and on :meth:`beat`.

    A failed beat (the database is gone) is remembered, not raised: the run reports it once,
    at the end, instead of a thread's traceback.
    """

    def __init__(self, engine: sa.Engine, execution_id: uuid.UUID, interval: float = audit.HEARTBEAT_SECONDS) -> None:
        self._engine = engine
        self._id = execution_id
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-heartbeat", daemon=True)
        self.error: str | None = None

    def beat(self) -> None:
        try:
            audit.beat(self._engine, self._id)
            self.error = None
        except Exception as exc:  # any driver error: the database is unreachable for now
            self.error = first_line(exc)

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self.beat()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._done.set()
        self._thread.join()


def first_line(exc: BaseException) -> str:
    """A database error in one line: the driver's message, not SQLAlchemy's wrapping of it."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
