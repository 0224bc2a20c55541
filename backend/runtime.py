"""Models load once per process, in a background thread, so /health and /setup answer at once.

Label Studio gives /health one second and /setup three; model loading takes tens of
seconds (longer on first download). ``ModelRuntime`` holds the state machine
loading -> ready | error and lets /predict wait for it with a bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelsNotReady(RuntimeError):
    """Raised when models are still loading after the wait bound, or failed to load."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


class ModelRuntime(Generic[T]):
    """Runs ``loader`` once in a daemon thread and publishes its result or its error."""

    def __init__(self, loader: Callable[[], T], name: str = "models") -> None:
        self._loader = loader
        self._name = name
        self._ready = threading.Event()
        self._value: T | None = None
        self._error: str | None = None
        self._started_at: float | None = None
        self.load_seconds: float | None = None
        self._lock = threading.Lock()

    def start(self) -> ModelRuntime[T]:
        with self._lock:
            if self._started_at is None:
                self._started_at = time.monotonic()
                threading.Thread(target=self._run, name=f"load-{self._name}", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            value = self._loader()
        except Exception as exc:  # any loader failure must reach /health, not kill the thread silently
            log.exception("loading %s failed", self._name)
            self._error = f"{type(exc).__name__}: {exc}"
        else:
            self._value = value
            log.info("%s ready in %.1f s", self._name, time.monotonic() - (self._started_at or 0))
        finally:
            self.load_seconds = time.monotonic() - (self._started_at or time.monotonic())
            self._ready.set()

    @property
    def state(self) -> str:
        if not self._ready.is_set():
            return "loading"
        return "error" if self._error is not None else "ready"

    @property
    def error(self) -> str | None:
        return self._error

    def get(self, wait_s: float) -> T:
        """The loaded value, waiting up to ``wait_s``; ``ModelsNotReady`` otherwise."""
        self.start()
        if not self._ready.wait(timeout=max(wait_s, 0.0)):
            raise ModelsNotReady(
                "loading",
                f"models are still loading (waited {wait_s:.0f} s); retry in a moment",
            )
        if self._error is not None:
            raise ModelsNotReady("error", f"models failed to load: {self._error}")
        assert self._value is not None
        return self._value
