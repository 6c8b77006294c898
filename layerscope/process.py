"""What an estimate does to process-wide state, made safe for threads and Ctrl-C.

layerscope runs inside training scripts, notebooks and CI jobs, next to other threads. Nothing
here changes what another thread sees:

* :func:`deferred_interrupts`: a Ctrl-C that arrives during a trace is held until the trace
  hands control back to Python, then delivered as the previous handler would have (a
  ``KeyboardInterrupt`` by default). Delivered inside the trace it could land in a
  ``weakref.finalize`` callback (where Python drops it: the estimate goes on as if nothing
  happened) or in Python code called back from C++ that cannot unwind (the interpreter aborts:
  "terminate called after throwing an instance of 'python_error'").
* :func:`import_once`: the first import of transformers or peft by layerscope happens under one
  lock, so threads that start estimating at the same moment do not race through
  transformers' lazy module initialisation.
* :func:`quiet_warnings`: warnings raised by *this* thread inside the block are dropped;
  ``warnings.catch_warnings`` would swap the process-wide filter list, silencing other threads
  and, when two threads interleave, leaving a filter behind for good.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from types import FrameType, ModuleType
from typing import Any

__all__ = ["deferred_interrupts", "import_once", "quiet_warnings"]

_LOCAL = threading.local()


# -- Ctrl-C ----------------------------------------------------------------------------------
def _deliver(previous: Any) -> None:
    """Act on a held SIGINT as ``previous`` (the handler before the block) would have."""
    if callable(previous):
        previous(signal.SIGINT, None)  # default_int_handler raises KeyboardInterrupt
    elif previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)  # the default action: the process ends
    # SIG_IGN: the interrupt was to be ignored anyway


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) during the block; deliver it once the block is left.

    Only the main thread receives signals in Python, so elsewhere (and when nested, or where
    Python has no handler to replace) this does nothing. The previous handler is restored on
    the way out, whatever happens in the block.
    """
    if getattr(_LOCAL, "deferring", False) or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    try:
        signal.signal(signal.SIGINT, hold)
    except ValueError:  # not the main interpreter's main thread
        yield
        return
    _LOCAL.deferring = True
    try:
        yield
    finally:
        _LOCAL.deferring = False
        signal.signal(signal.SIGINT, previous)
        if held:
            _deliver(previous)


# -- imports ---------------------------------------------------------------------------------
_IMPORT_LOCK = threading.RLock()
_LOADED: set[str] = set()

_NEEDED = {
    "transformers": (
        ["transformers.configuration_utils", "transformers.modeling_utils",
         "transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto",
         "transformers.masking_utils", "transformers.dynamic_module_utils"],
        ["PretrainedConfig", "PreTrainedModel", "CONFIG_MAPPING", "AutoConfig", "__version__"],
    ),
    "peft": (
        ["peft.tuners.tuners_utils", "peft.utils.constants"],
        ["LoraConfig", "inject_adapter_in_model"],
    ),
}
"""What layerscope uses of each lazily built package: submodules imported and top-level names
resolved once, under the lock (a submodule missing from an older version is skipped)."""


def import_once(name: str) -> ModuleType:
    """``transformers`` or ``peft``, imported with every part layerscope uses, the first time
    under one process-wide lock.

    Both packages build their namespace lazily, on first attribute access; two threads making
    that first access at once see a half-built module (``ImportError: cannot import name
    'PretrainedConfig' from 'transformers'``). Once loaded here, later imports only read
    ``sys.modules``.
    """
    if name in _LOADED:
        return sys.modules[name]
    with _IMPORT_LOCK:
        module = importlib.import_module(name)
        submodules, attributes = _NEEDED.get(name, ([], []))
        for sub in submodules:
            with contextlib.suppress(ImportError):
                importlib.import_module(sub)
        for attribute in attributes:
            getattr(module, attribute, None)
        _LOADED.add(name)
    return module


# -- warnings --------------------------------------------------------------------------------
_QUIET_THREADS: dict[int, int] = {}
_QUIET_LOCK = threading.Lock()
_ORIGINAL_SHOWWARNING: list[Any] = []


def _install_filter() -> None:
    """Wrap ``warnings.showwarning`` once: a warning of a thread inside :func:`quiet_warnings`
    is not shown; every other warning goes where it went before."""
    with _QUIET_LOCK:
        if _ORIGINAL_SHOWWARNING:
            return
        original = warnings.showwarning
        _ORIGINAL_SHOWWARNING.append(original)

        def showwarning(*args: Any, **kwargs: Any) -> None:
            if _QUIET_THREADS.get(threading.get_ident()):
                return
            original(*args, **kwargs)

        warnings.showwarning = showwarning


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Drop the warnings this thread raises inside the block (other threads are unaffected).

    A warning raised while a caller records warnings (``catch_warnings(record=True)``, as
    pytest and the command line do) is recorded as usual: only what would be shown is dropped.
    """
    _install_filter()
    ident = threading.get_ident()
    with _QUIET_LOCK:
        _QUIET_THREADS[ident] = _QUIET_THREADS.get(ident, 0) + 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_THREADS[ident] -= 1
            if not _QUIET_THREADS[ident]:
                del _QUIET_THREADS[ident]
