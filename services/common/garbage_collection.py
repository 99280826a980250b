"""Keep what a worker loaded at start-up out of Python's cyclic garbage collector.

A worker that imported torch, openai-whisper or transformers and loaded a model holds some
300,000 objects that live as long as it does. Python's collector still walks all of them in
every full collection, which the allocations of serving trigger every few seconds: about
110 ms here, with the process's GIL held throughout, so the event loop answers nobody and
the GPU thread launches nothing. py-spy on an H100 caught such pauses of 150 ms in an entry
worker and 275 ms in the Whisper service, in the seconds before 32 recordings' windows
reached the GPU (bench/RESULTS.md). ``gc.freeze`` moves every object alive now to a
generation the collector never scans: later garbage is collected as before, and only
start-up objects that become cyclic garbage later stay (a bounded, one-time cost).
"""

from __future__ import annotations

import gc


def freeze_start_up_objects(enabled: bool = True) -> None:
    """Collect once, then exempt every surviving object from later collections. ``enabled``:
    the setting ``MULTIMODAL_FREEZE_START_UP_OBJECTS`` (off, to measure what this is worth).

    Call at the end of a service's ``__init__``, once its model and clients exist."""
    if not enabled:
        return
    gc.collect()
    gc.freeze()
