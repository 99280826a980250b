"""How soon a model service's GPU thread gets Python's GIL back after waiting for the GPU.

A model service runs two threads that want the GIL: the event loop, which receives requests
(a Whisper window is 480 KB of log-mel to deserialise), and the thread that launches the
model's kernels. That thread lets the GIL go whenever it waits for the GPU; when the wait
ends it must wait again, until the loop gives the GIL up, which a busy loop does only every
switch interval: 5 ms by default, as long as a Whisper decode step of 16 windows on an H100.
A shorter interval returns the GIL to the GPU thread sooner, at the cost of more switches.
"""

from __future__ import annotations

import sys


def set_switch_interval(milliseconds: float | None) -> None:
    """Set the interpreter's switch interval; ``None`` keeps Python's (5 ms). ``milliseconds``:
    the setting ``MULTIMODAL_GIL_SWITCH_INTERVAL_MS``. Call once, in a service's ``__init__``."""
    if milliseconds is not None:
        sys.setswitchinterval(milliseconds / 1000)
