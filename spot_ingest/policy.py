"""How spot-ingest processes behave when something fails: the one list of
exit codes, the one backoff, the one way to make a process pool.

Setting input aside with a reason is ``spot_ingest.store.set_aside`` (on the
collector host and in the store alike); the reason travels in a
``<name>.reason.txt`` beside the item.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from enum import IntEnum


class ExitCode(IntEnum):
    """Used by the master, the workers, the streaming job, the command lines
    and the launcher (which restarts a child for some codes, not others)."""
    OK = 0
    ERROR = 1            # a fault of the environment: restarting may help
    CONFIG = 2           # a mistake in the configuration, a missing tool: restarting will not help
    INPUT_SET_ASIDE = 3  # the run finished, but some input was set aside, refused or rejected


class RetryLater(Exception):
    """Raised where a step cannot be done now but may be later; ``retry_after``
    (seconds) is the raiser's advice, which the caller's ``Backoff`` takes as
    the shortest delay (``StoreUnavailable`` is one)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Backoff:
    """Delays that double from ``first`` up to ``most`` seconds; ``reset()``
    after a success. Nothing retries forever without saying so: every
    caller logs each retry with its delay."""

    def __init__(self, first: float = 1.0, most: float = 60.0):
        self.first, self.most = first, most
        self.attempts = 0

    def delay(self, retry_after: float | None = None) -> float:
        """The delay before the next attempt (and count this one)."""
        self.attempts += 1
        delay = min(self.most, self.first * 2 ** (self.attempts - 1))
        return max(delay, min(retry_after, self.most)) if retry_after else delay

    def reset(self) -> None:
        self.attempts = 0

    @staticmethod
    def sleep(seconds: float, stopping) -> None:
        """Sleep ``seconds``, waking early when ``stopping()`` turns true."""
        deadline = time.monotonic() + seconds
        while not stopping() and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def until_done(action, what: str, stopping, logger: logging.Logger,
               first: float = 1.0, most: float = 30.0):
    """``action()``, waited for while it raises ``RetryLater`` (an unreachable
    store or KDC), each retry logged with its reason and delay; None when
    ``stopping()`` turns true first."""
    backoff = Backoff(first, most)
    while not stopping():
        try:
            return action()
        except RetryLater as exc:
            delay = backoff.delay(exc.retry_after)
            logger.warning("could not %s: %s; retrying in %.0f s", what, exc, delay)
            Backoff.sleep(delay, stopping)
    return None


def _init_pool_process(level: int) -> None:
    # The parent handles Ctrl-C and SIGTERM and lets running work finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from .logs import setup_logging
    setup_logging(level)


def _warm(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)


def process_pool(processes: int, warm: tuple[str, ...] = ()) -> ProcessPoolExecutor:
    """The pool of the master's staging and the workers' conversions:
    forkserver processes (no inherited threads or Kafka clients) that ignore
    Ctrl-C and log like their parent. Every process is started now and
    imports the modules ``warm`` names (those of the work it will run):
    otherwise the first file would wait about half a second for the
    forkserver and the imports."""
    # The pool's queues are named semaphores in /dev/shm, each registered with
    # multiprocessing's resource tracker, which removes them if this process
    # is killed. The first registration starts the tracker (a new Python
    # process, tens of milliseconds); a SIGKILL in that window left a name
    # that nothing removes. Started first, the window is one pipe write.
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    pool = ProcessPoolExecutor(max_workers=processes,
                               mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_init_pool_process,
                               initargs=(logging.getLogger().level,))
    for _ in range(processes):     # each submit with no idle process starts one
        pool.submit(_warm, warm)
    return pool
