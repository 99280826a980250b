"""What a blocking call costs a thread beside a busy Python thread, at several GIL switch intervals.

Why: a model service's model thread lets go of the GIL at every blocking CUDA call (a graph
replay, an event's synchronize, a copy to the host) and must take it back from the event loop,
which runs Python most of the time under load. Python hands the GIL back only when the holder has
kept it for the switch interval (``sys.setswitchinterval``, 5 ms by default), so each such call can
cost the waiting thread a whole interval. This probe shows that convoy; served, a shorter interval
in the CLIP worker did not pay (bench/RESULTS.md, run 18), so the services keep Python's default.

Here the blocking call is ``time.sleep(0)`` (a system call that releases the GIL, as a CUDA
synchronise does) and the busy thread a pure-Python loop standing in for the event loop. Runs on
any machine: ``python -m bench.gil_handover``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable


def _busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(200))


def _ms_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1000


def measure(interval_ms: float, calls: int, blocking_call: Callable[[], object]) -> tuple[float, float]:
    """Milliseconds per blocking call alone, then beside a busy Python thread."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_ms / 1000)
    try:
        alone = _ms_per_call(blocking_call, calls)
        stop = threading.Event()
        busy = threading.Thread(target=_busy, args=(stop,))
        busy.start()
        time.sleep(0.05)
        beside = _ms_per_call(blocking_call, calls)
        stop.set()
        busy.join()
    finally:
        sys.setswitchinterval(previous)
    return alone, beside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals-ms", type=float, nargs="+", default=[5, 1, 0.2, 0.05])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    print("switch interval | blocking call alone | beside a busy Python thread")
    for interval in args.intervals_ms:
        alone, beside = measure(interval, args.calls, lambda: time.sleep(0))
        print(f"{interval:>12.2f} ms | {alone:>16.3f} ms | {beside:>24.3f} ms")


if __name__ == "__main__":
    main()
