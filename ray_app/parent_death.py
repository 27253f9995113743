"""Child processes that end with their parent, even one killed with SIGKILL: Linux's
``PR_SET_PDEATHSIG``. Used for every process the app starts (the edge's HAProxy, the TF Serving
sidecar, the replicas' decoding processes), so none is orphaned holding ports or memory.
"""

from __future__ import annotations

import ctypes
import functools
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def parent_death_hook(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that asks for ``sig`` when the parent dies. libc is loaded here, in the
    parent: between fork and exec the child only makes the call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, _PR_SET_PDEATHSIG, sig)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """The same, called in a child that already runs Python (after exec)."""
    parent_death_hook(sig)()
