"""Does preparing photographs overlap the CLIP model on the GPU? An in-process probe.

    python -m bench.clip_overlap --out bench/results     # on the GPU machine (bench/gpu/run-clip-overlap.sh)

Run 10 (bench/RESULTS.md) found the service's encoder at 70% of the raw model in-process although
the GPU needs only about 10% more time per batch for decoding and resizing than for the model:
preparation and the model did not overlap. This probe runs each stage in a loop on a thread of
its own, first alone and then beside the model's loop, and reports each one's rate and host CPU
per call, so that the stage that holds the model up shows as the model's rate falling:

- ``model``: the image tower's CUDA graph on a prepared batch of 64, embeddings back on the host;
- ``nvjpeg``: torchvision's batched ``decode_jpeg`` on the GPU (as the service decodes);
- ``cpu decode xN``: libjpeg-turbo through torchvision on N CPU threads, pixels copied once;
- ``transform``: transformers' image processor on the GPU, on already decoded images;
- ``prepare``: the service's whole preparation (``ClipEncoder.prepare_images``).

Then the service's encoder behind its continuous batcher (``bench.clip_gpu.continuously_batched``)
with each decoding strategy, with the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.clip_gpu import continuously_batched, log, model_path, photo_jpegs, write_model

BATCH = 64


class Loop:
    """``step()`` over and over on a thread until stopped: calls per second and CPU ms per call."""

    def __init__(self, name: str, step: Callable[[], None]) -> None:
        self.name, self.step = name, step
        self.calls, self.cpu_seconds, self.wall_seconds = 0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name)

    def _run(self) -> None:
        self.step()  # warm: allocations, lazy initialisation
        started, cpu = time.perf_counter(), time.thread_time()
        while not self._stop.is_set():
            self.step()
            self.calls += 1
        self.wall_seconds, self.cpu_seconds = time.perf_counter() - started, time.thread_time() - cpu

    def __enter__(self) -> Loop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        per_s = self.calls / self.wall_seconds if self.wall_seconds else 0.0
        return {
            "calls_per_s": per_s,
            "images_per_s": per_s * BATCH,
            "ms_per_call": 1000 / per_s if per_s else None,
            "cpu_ms_per_call": 1000 * self.cpu_seconds / self.calls if self.calls else None,
        }


def run_loops(loops: list[Loop], seconds: float) -> dict:
    for loop in loops:
        loop.__enter__()
    time.sleep(seconds)
    for loop in loops:
        loop.__exit__()
    return {loop.name: loop.result() for loop in loops}


def stages(encoder, jpegs: list[bytes], cpu_threads: list[int]) -> dict[str, Callable[[], None]]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = encoder.device
    batch = jpegs[:BATCH]
    raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch]
    prepared = encoder.prepare_images(batch)
    torch.cuda.synchronize()
    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    torch.cuda.synchronize()
    side_stream = torch.cuda.Stream(device)

    def model() -> None:
        encoder.embed_images(prepared)

    def nvjpeg() -> None:
        with torch.cuda.stream(side_stream):
            decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
            side_stream.synchronize()

    def transform() -> None:
        with torch.cuda.stream(side_stream):
            encoder.pixels.image_processor(
                images=decoded, return_tensors="pt", device=device, input_data_format="channels_first"
            )
            side_stream.synchronize()

    def prepare() -> None:
        ready = encoder.prepare_images(batch).ready
        ready.synchronize()

    out = {"model": model, "nvjpeg": nvjpeg, "transform": transform, "prepare": prepare}
    for threads in cpu_threads:
        pool = ThreadPoolExecutor(threads)

        def cpu_decode(pool=pool) -> None:
            images = list(pool.map(lambda data: decode_jpeg(data, mode=ImageReadMode.RGB), raw))
            with torch.cuda.stream(side_stream):
                for image in images:
                    image.pin_memory().to(device, non_blocking=True)
                side_stream.synchronize()

        out[f"cpu decode x{threads}"] = cpu_decode
    return out


def overlap(encoder, jpegs: list[bytes], seconds: float, cpu_threads: list[int]) -> dict:
    steps = stages(encoder, jpegs, cpu_threads)
    out: dict = {}
    for name, step in steps.items():
        out[f"{name} alone"] = run_loops([Loop(name, step)], seconds)
        log(f"{name} alone: {out[f'{name} alone']}")
    for name, step in steps.items():
        if name == "model":
            continue
        out[f"model + {name}"] = run_loops([Loop("model", steps["model"]), Loop(name, step)], seconds)
        log(f"model + {name}: {out[f'model + {name}']}")
    return out


def cpu_decoding(pixels):
    """The service's preprocessor with JPEGs decoded by libjpeg-turbo on its CPU threads, copied once."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from services.clip.pixels import JPEG_MAGIC

    def decode(data: bytes):
        if not data.startswith(JPEG_MAGIC):
            return None
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def decode_on_device(encoded: list[bytes]):
        images = list(pixels._pool.map(decode, encoded))
        flat = torch.cat([image.flatten() for image in images]).pin_memory().to(pixels.device, non_blocking=True)
        out, start = [], 0
        for image in images:
            out.append(flat[start : start + image.numel()].view(image.shape))
            start += image.numel()
        return out

    return decode_on_device


def continuous_variants(encoder, jpegs: list[bytes], callers: int, cpu_threads: list[int]) -> dict:
    """The continuous batcher in-process: as the service runs it, with a high-priority preparation
    stream, and with JPEGs decoded on CPU threads."""
    import torch

    from services.clip.pixels import PixelPreprocessor

    out = {"service": continuously_batched(encoder, jpegs, callers)}
    stream = encoder._prepare_stream
    encoder._prepare_stream = torch.cuda.Stream(encoder.device, priority=-1)
    out["high-priority preparation stream"] = continuously_batched(encoder, jpegs, callers)
    encoder._prepare_stream = stream
    fast = encoder.pixels
    for threads in cpu_threads:
        pixels = PixelPreprocessor(fast.image_processor, fast.device, fast.dtype, "fast", threads)
        pixels._decode_on_device = cpu_decoding(pixels)
        encoder.pixels = pixels
        out[f"cpu decode x{threads}"] = continuously_batched(encoder, jpegs, callers)
    encoder.pixels = fast
    for name, row in out.items():
        log(f"continuous, {name}: {row}")
    return out


class PacedTower:
    """The image tower in chunks of its largest captured batch, at most ``ahead`` + 1 chunks queued on
    the GPU: whatever waits for the device (a synchronising call elsewhere) waits for less model work."""

    def __init__(self, tower, ahead: int) -> None:
        self.tower, self.ahead = tower, ahead

    def __call__(self, pixel_values):
        from collections import deque

        import torch

        parts, pending = [], deque()
        for part in pixel_values.split(self.tower.sizes[-1]):
            parts.append(self.tower(part))
            done = torch.cuda.Event()
            done.record()
            pending.append(done)
            if len(pending) > self.ahead:
                pending.popleft().synchronize()
        return torch.cat(parts)


def device_wide_waits(encoder, jpegs: list[bytes]) -> dict:
    """Does nvJPEG wait for work on other streams? A one-block sleep kernel (it fills no SM) on
    another stream, then a decode: if the decode takes as long as the sleep, it synchronised the device."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs[:BATCH]]
    other, side = torch.cuda.Stream(), torch.cuda.Stream()
    cycles_per_ms = 1_980_000  # the H200's SM clock
    out = {}

    def timed_ms(fn) -> float:
        torch.cuda.synchronize()
        with torch.cuda.stream(other):
            torch.cuda._sleep(50 * cycles_per_ms) if fn is not None else None
        started = time.perf_counter()
        with torch.cuda.stream(side):
            (fn or (lambda: None))()
            side.synchronize()
        return 1000 * (time.perf_counter() - started)

    def decode() -> None:
        decode_jpeg(raw, mode=ImageReadMode.RGB, device=encoder.device)

    decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=encoder.device)

    def transform() -> None:
        encoder.pixels.image_processor(
            images=decoded, return_tensors="pt", device=encoder.device, input_data_format="channels_first"
        )

    decode()
    torch.cuda.synchronize()
    started = time.perf_counter()
    decode()
    torch.cuda.synchronize()
    out["decode alone ms"] = 1000 * (time.perf_counter() - started)
    out["decode after a 50 ms sleep kernel elsewhere, ms"] = timed_ms(decode)
    out["transform after a 50 ms sleep kernel elsewhere, ms"] = timed_ms(transform)
    torch.cuda.synchronize()
    log(f"device-wide waits: {out}")
    return out


def paced_variants(path, jpegs: list[bytes], seconds: float, callers: int) -> dict:
    """The model in chunks of 16 or 32 with one or two chunks queued, beside nvJPEG and the whole
    preparation, and behind the continuous batcher."""
    import torch

    from services.clip.encoder import ClipEncoder, EncoderOptions

    out: dict = {}
    for chunk in (16, 32):
        encoder = ClipEncoder(path, torch.device("cuda"), EncoderOptions(largest_batch=chunk))
        graphed = encoder.image_tower
        for ahead in (0, 1):
            name = f"chunks of {chunk}, {ahead + 1} queued"
            encoder.image_tower = PacedTower(graphed, ahead)
            steps = stages(encoder, jpegs, [])
            row = {"model alone": run_loops([Loop("model", steps["model"])], seconds)}
            for other in ("nvjpeg", "prepare"):
                row[f"model + {other}"] = run_loops([Loop("model", steps["model"]), Loop(other, steps[other])], seconds)
            row["continuous"] = continuously_batched(encoder, jpegs, callers)
            out[name] = row
            log(f"{name}: {row}")
        del encoder, graphed
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="vit-l-14")
    parser.add_argument("--seconds", type=float, default=3.0, help="per loop measurement")
    parser.add_argument("--cpu-threads", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--callers", type=int, default=16, help="in-process callers of the continuous batcher")
    parser.add_argument("--only-paced", action="store_true", help="skip the first survey (run 1 of the probe)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from services.clip.encoder import ClipEncoder, EncoderOptions

    home = Path(tempfile.mkdtemp(prefix="bench-clip-overlap-"))
    write_model(home, args.shape)
    jpegs = photo_jpegs(2048)
    encoder = ClipEncoder(model_path(home), torch.device("cuda"), EncoderOptions(largest_batch=BATCH))
    results: dict = {"device": torch.cuda.get_device_name(), "shape": args.shape}
    results["device_wide_waits"] = device_wide_waits(encoder, jpegs)
    if not args.only_paced:
        results["overlap"] = overlap(encoder, jpegs, args.seconds, args.cpu_threads)
        results["continuous"] = continuous_variants(encoder, jpegs, args.callers, args.cpu_threads)
    else:
        results["continuous"] = {"service": continuously_batched(encoder, jpegs, args.callers)}
    del encoder
    torch.cuda.empty_cache()
    results["paced"] = paced_variants(model_path(home), jpegs, args.seconds, args.callers)
    (args.out / "clip_overlap.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
