"""Who may use the models next: an annotator's click before the next pre-annotation task.

The model adapters hold a lock per model, which makes each call thread-safe but says nothing
about order: the threads of several batch requests and one interactive request all queue on
the same segmenter lock, and the click waits behind every queued batch task (CPython's locks
promise no order at all). An annotator is waiting on that click; nobody is waiting on a
particular pre-annotation task.

``ModelGate`` orders the work one level up, per task instead of per model call:

* Batch tasks take the one *batch slot* for the model part of a task (image downloads run
  outside it, in parallel), one task at a time across all batch requests of the process.
* A batch task does not take the slot while an interactive request waits or runs; it
  yields between tasks, so a click waits for at most the one batch task already running.
* Interactive requests run together (the embedding cache's single flight and the adapters'
  locks already make that safe) and never wait for each other here.
* So that a steady stream of clicks cannot stall pre-annotation for ever, a batch task that
  has yielded for ``max_yield_s`` (``INTERACTIVE_PRIORITY_S``), counted from its arrival or
  from the end of the previous batch task, whichever is later, takes the slot at the next
  moment no interactive request is inside the models; clicks arriving after that wait for that
  one task. Under constant clicking, batches still make one task per ``max_yield_s`` plus a
  task's time (Label Studio gives a *Retrieve predictions* call 100 s), and clicks get at least
  ``max_yield_s`` between any two batch tasks, however many batch requests queue. ``0`` turns
  the priority off.

The gate orders threads of one process; separate worker processes (gunicorn workers, RQ
workers, the batch CLI) each have their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class ModelGate:
    """Priority of interactive requests over batch tasks; see the module docstring."""

    def __init__(self, max_yield_s: float) -> None:
        self.max_yield_s = max_yield_s
        self._cond = threading.Condition()
        self._interactive = 0  # waiting or running
        self._interactive_running = 0
        self._batch_running = False
        self._batch_forcing = False  # a batch task that yielded too long goes next
        self._last_batch_exit = float("-inf")

    @contextmanager
    def interactive(self) -> Iterator[None]:
        """Hold while an interactive request uses the models."""
        with self._cond:
            self._interactive += 1
            try:
                self._cond.wait_for(lambda: not self._batch_running and not self._batch_forcing)
            except BaseException:
                self._interactive -= 1
                self._cond.notify_all()
                raise
            self._interactive_running += 1
        try:
            yield
        finally:
            with self._cond:
                self._interactive -= 1
                self._interactive_running -= 1
                self._cond.notify_all()

    @contextmanager
    def batch_task(self) -> Iterator[None]:
        """Hold while one batch task uses the models."""
        arrived = time.monotonic()
        with self._cond:
            while True:
                free = not self._batch_running and not self._batch_forcing
                if free and self._interactive == 0:
                    break
                remaining = max(arrived, self._last_batch_exit) + self.max_yield_s - time.monotonic()
                if free and remaining <= 0:
                    self._batch_forcing = True  # blocks new clicks; wait for running ones
                    try:
                        self._cond.wait_for(lambda: self._interactive_running == 0)
                    finally:
                        self._batch_forcing = False
                    break
                self._cond.wait(timeout=remaining if remaining > 0 else None)
            self._batch_running = True
        try:
            yield
        finally:
            with self._cond:
                self._batch_running = False
                self._last_batch_exit = time.monotonic()
                self._cond.notify_all()

    def snapshot(self) -> dict[str, int]:
        """Current counts (interactive waiting or running, batch running): idle is all zeros."""
        with self._cond:
            return {"interactive": self._interactive, "batch_running": int(self._batch_running)}
