"""CLIP end to end through ``bentoml serve`` against the raw model, in one run.

    python -m bench.clip_gpu --shape vit-l-14 --out bench/results          # on the GPU machine
    python -m bench.clip_gpu --shape vit-b-32 --levels 1 8 32 --gateway-workers 1 --client-processes 1

Steps, all in this one process and the servers it starts:
1. Writes a CLIP of the published shape with random weights into a fresh model store, under
   the production tag (no hub is reachable; speed does not depend on the weights' values).
2. The raw model, batched, on pixels already on the device (the ceiling); the fast path's
   embeddings against the reference path's on the same photographs (cosine). Then the
   service's own encoder (``ClipEncoder``) in-process: eager, with CUDA graphs, and with CUDA
   graphs behind the service's continuous batcher (preparation overlapping the model).
3. ``bentoml serve`` with only CLIP, then closed-loop load on ``/v1/embeddings``: one JPEG
   photograph (about 50-150 KB) per request at rising concurrency; single texts; requests of
   64 texts. Then again with adaptive batching off (max batch size 1).
Inputs are photographs shipped with scikit-image, randomly cropped and re-encoded so that
every request carries a distinct JPEG. Results: ``clip_<shape>.json`` and a plot in --out.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.load import LevelResult, run_level
from bench.serving import ServedProduct, py_spy

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "immunohistochemistry.png", "motorcycle_right.png", "color.png")  # fmt: skip
SIZES = ((640, 480), (480, 640), (800, 600), (1024, 768), (1280, 720), (320, 240), (1920, 1080))
TAGS = {"vit-l-14": "openai/clip-vit-large-patch14", "vit-b-32": "openai/clip-vit-base-patch32"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# Inputs


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs: random crops of real photographs, resized to common camera/screen sizes."""
    from importlib.resources import files

    rng = random.Random(seed)
    photos = []
    for name in PHOTOS:
        path = files("skimage") / "data" / name
        if path.is_file():
            with Image.open(path) as image:
                photos.append(image.convert("RGB"))
    jpegs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        scale = rng.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        size = SIZES[rng.randrange(len(SIZES))] if i % 3 else (640, 480)
        image = photo.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.choice((85, 90, 95)))
        jpegs.append(buffer.getvalue())
    return jpegs


def texts(count: int) -> list[str]:
    nouns = ("cat", "dog", "bicycle", "mountain lake", "city street at night", "bowl of soup", "red car", "astronaut")
    return [f"a photo of a {nouns[i % len(nouns)]}, number {i}" for i in range(count)]


def embeddings_body(inputs: list[str]) -> bytes:
    return json.dumps({"model": "clip", "input": inputs, "encoding_format": "base64"}).encode()


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


# The model store


def write_model(home: Path, shape: str, seed: int = 0) -> None:
    """A random-weight CLIP of ``shape`` under the production tag, in the store at ``home``."""
    os.environ["BENTOML_HOME"] = str(home)
    import bentoml

    from bentos.tiny.clip import generate_shaped
    from configuration.profiles import model_spec
    from configuration.settings import Settings

    spec = model_spec("clip", Settings(profile="production", clip_model=TAGS[shape]))
    labels = {"profile": "production", "family": "clip", "architecture": spec.architecture}
    with bentoml.models.create(
        spec.tag, labels=labels, metadata={"source": f"random weights, {shape} shape", "seed": seed}
    ) as model:
        generate_shaped(Path(model.path), seed, shape)
    log(f"wrote a random {shape} as {model.tag}")


def model_path(home: Path) -> Path:
    return next((home / "models").glob("*/*/model.yaml")).parent


# The raw model, in this process


def timed(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return (time.perf_counter() - started) / repeats


def raw_model(path: Path, jpegs: list[bytes], batch_sizes: list[int]) -> dict:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from services.clip.pixels import PixelPreprocessor

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    model = CLIPModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    processor = CLIPProcessor.from_pretrained(path)
    fast = PixelPreprocessor(processor.image_processor, device, dtype, "fast", decode_threads=8)
    reference = PixelPreprocessor(processor.image_processor, device, dtype, "reference", decode_threads=8)
    out: dict = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "images": {},
        "texts": {},
    }
    with torch.inference_mode():
        for batch in batch_sizes:
            pixels = fast(jpegs[:batch]).pixel_values
            seconds = timed(
                lambda pixels=pixels: model.get_image_features(pixel_values=pixels), repeats=max(3, 512 // batch)
            )
            out["images"][batch] = {"model_per_s": batch / seconds, "model_ms": 1000 * seconds}
            log(f"raw image model, batch {batch}: {batch / seconds:,.0f}/s ({1000 * seconds:.1f} ms)")
        batch = max(batch_sizes)
        seconds = timed(lambda: model.get_image_features(pixel_values=reference(jpegs[:batch]).pixel_values), repeats=3)
        out["images"]["reference_preprocessing_plus_model_per_s"] = batch / seconds
        log(f"reference preprocessing + model in-process, batch {batch}: {batch / seconds:,.0f}/s")
        # The fast path against the reference path on the same photographs, the same model
        sample = jpegs[: max(batch_sizes)]
        a = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=fast(sample).pixel_values).pooler_output.float(), dim=-1
        )
        b = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=reference(sample).pixel_values).pooler_output.float(), dim=-1
        )
        cosine = (a * b).sum(-1)
        pixel_diff = (fast(sample[:64]).pixel_values.float() - reference(sample[:64]).pixel_values.float()).abs()
        out["parity"] = {
            "images": len(sample),
            "cosine_min": cosine.min().item(),
            "cosine_mean": cosine.mean().item(),
            "pixel_abs_diff_max": pixel_diff.max().item(),
            "pixel_abs_diff_mean": pixel_diff.mean().item(),
        }
        log(f"fast vs reference preprocessing: cosine min {cosine.min().item():.5f}, mean {cosine.mean().item():.5f}")
        for batch in batch_sizes:
            tokens = processor(text=texts(batch), return_tensors="pt", padding=True, truncation=True).to(device)
            seconds = timed(lambda tokens=tokens: model.get_text_features(**tokens), repeats=max(3, 512 // batch))
            out["texts"][batch] = {"model_per_s": batch / seconds, "model_ms": 1000 * seconds}
            log(f"raw text model, batch {batch}: {batch / seconds:,.0f}/s")
    return out


def failed_images(path: Path, jpegs: list[bytes]) -> dict:
    """Every photograph through the service's encoder, in batches of 64: which did not decode, and
    which decoded but came out of the half-precision model as NaN or infinity (the service tells
    both apart from a good row only by NaN)."""
    import torch

    from services.clip.encoder import ClipEncoder, EncoderOptions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = ClipEncoder(path, device, EncoderOptions(largest_batch=64))
    undecoded, non_finite = [], []
    for start in range(0, len(jpegs), 64):
        chunk = jpegs[start : start + 64]
        decoded = set(encoder.pixels(chunk).decoded)
        rows = encoder.encode_images(chunk)
        undecoded += [start + i for i in range(len(chunk)) if i not in decoded]
        non_finite += [start + i for i in decoded if not np.isfinite(rows[i]).all()]
    out = {"images": len(jpegs), "undecoded": undecoded, "non_finite": non_finite}
    log(f"of {len(jpegs)} photographs: {len(undecoded)} not decoded, {len(non_finite)} non-finite: {out}")
    return out


def sync_points(path: Path, jpegs: list[bytes]) -> list[str]:
    """Where preparing a chunk of images makes the CPU wait for the GPU (torch's sync debug mode)."""
    import traceback
    import warnings

    import torch
    from transformers import CLIPProcessor

    from services.clip.pixels import PixelPreprocessor

    if not torch.cuda.is_available():
        return []
    processor = CLIPProcessor.from_pretrained(path)
    pixels = PixelPreprocessor(processor.image_processor, torch.device("cuda"), torch.float16, "fast", decode_threads=4)
    pixels(jpegs[:32])
    found: set[str] = set()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        stack = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]][-4:]
        found.add(f"{message} at {' < '.join(reversed(stack))}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pixels(jpegs[:32])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for point in sorted(found):
        log(f"sync while preparing images: {point}")
    return sorted(found)


def service_encoder(path: Path, jpegs: list[bytes], batch_sizes: list[int], callers: int) -> dict:
    """The CLIP service's own encoding code (``ClipEncoder``), in-process: what it can do with no HTTP around it.

    Each batch size is timed with its two stages in sequence (``encode_images``), eager and with
    CUDA graphs; then with CUDA graphs behind the service's continuous batcher, ``callers`` callers
    sending 8 photographs a call, so that preparing one batch overlaps the model on the last."""
    import torch

    from services.clip.encoder import ClipEncoder, EncoderOptions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {}
    embeddings = {}
    variants = [("eager", EncoderOptions(cuda_graphs=False, largest_batch=64))]
    if device.type == "cuda":
        variants.append(("graphs", EncoderOptions(largest_batch=64)))
        variants.append(("graphs, default stream", EncoderOptions(largest_batch=64, model_stream=False)))
    for name, options in variants:
        started = time.perf_counter()
        encoder = ClipEncoder(path, device, options)
        row: dict = {"startup_s": time.perf_counter() - started}
        for batch in batch_sizes:
            seconds = timed(
                lambda encoder=encoder, batch=batch: encoder.encode_images(jpegs[:batch]), repeats=max(3, 64 // batch)
            )
            row[f"images_b{batch}_per_s"], row[f"images_b{batch}_ms"] = batch / seconds, 1000 * seconds
        for batch in (1, 64):
            seconds = timed(lambda encoder=encoder, batch=batch: encoder.encode_texts(texts(batch)), repeats=10)
            row[f"texts_b{batch}_per_s"], row[f"texts_b{batch}_ms"] = batch / seconds, 1000 * seconds
        if name != "eager" or device.type != "cuda":
            row.update(continuously_batched(encoder, jpegs, callers))
        embeddings[name] = encoder.encode_images(jpegs[:64])
        out[name] = row
        log(f"service encoder in-process, {name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in row.items()))
        del encoder
        torch.cuda.empty_cache() if device.type == "cuda" else None
    reference = embeddings["eager"]
    out["cosine_min_to_eager"] = {name: float((e * reference).sum(-1).min()) for name, e in embeddings.items()}
    log(f"cosine to eager: {out['cosine_min_to_eager']}")
    return out


def continuously_batched(encoder, jpegs: list[bytes], callers: int, per_call: int = 8, seconds: float = 4.0) -> dict:
    """Images/s of ``encoder`` behind the service's own continuous batcher, ``callers`` callers in a loop."""
    import asyncio

    from services.common.continuous_batching import ContinuousBatcher

    sizes: list[int] = []
    stages: dict[str, list[float]] = {"prepare": [], "decode": [], "model": []}

    def timed_stage(name: str, fn):
        def run(*args):
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                stages[name].append(time.perf_counter() - started)

        return run

    def embed(prepared):
        sizes.append(prepared.count)
        return encoder.embed_images(prepared)

    decode = encoder.pixels._decode_on_device
    encoder.pixels._decode_on_device = timed_stage("decode", decode)  # JPEG decoding, part of preparing
    batches = ContinuousBatcher(
        timed_stage("prepare", encoder.prepare_images),
        timed_stage("model", embed),
        max_batch=64,
        max_wait_seconds=60,
        name="bench",
    )

    async def caller(index: int, until: float) -> int:
        done, start = 0, index * per_call
        while time.perf_counter() < until:
            calls = [jpegs[(start + i) % len(jpegs)] for i in range(per_call)]
            rows = await batches(calls)
            assert np.isfinite(rows).all(), "a photograph came back without a finite embedding"
            done, start = done + per_call, start + callers * per_call
        return done

    async def measure(duration: float) -> float:
        until = time.perf_counter() + duration
        return sum(await asyncio.gather(*(caller(i, until) for i in range(callers)))) / duration

    asyncio.run(measure(1.0))  # warm-up
    sizes.clear()
    for times in stages.values():
        times.clear()
    per_s = asyncio.run(measure(seconds))
    encoder.pixels._decode_on_device = decode
    # Wall ms per batch of each stage (they run on two threads): the longer one sets the pace.
    out = {"continuous_images_per_s": per_s, "continuous_mean_batch": float(np.mean(sizes))}
    out.update({f"continuous_{name}_ms": 1000 * float(np.mean(times)) for name, times in stages.items()})
    log(f"continuous batching in-process, {callers} callers x {per_call} photographs: {per_s:,.0f}/s, {out}")
    return out


def preparation_variants(path: Path, jpegs: list[bytes], threads: int) -> dict:
    """Cheaper ways to prepare photographs, tried on the service's encoder (graphs).

    Run 5 showed preparation costs GPU time that the model then lacks. Two candidates, here only
    (the service keeps ``fast`` until one of them is measured to pay):
    - ``half``: nvJPEG as in ``fast``, then transformers' resize on float16 instead of float32;
    - ``draft``: Pillow decodes each JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that still
      covers the model's input, on ``threads`` CPU threads; only those small pixels reach the GPU.
    Each is timed end to end (b64, b256), its preparation alone (b64), its embeddings' cosine to
    ``fast`` and to the reference path, and the GPU kernels of ``fast`` and the best are profiled.
    """
    import torch

    from services.clip.encoder import ClipEncoder, EncoderOptions
    from services.clip.pixels import PixelPreprocessor

    class HalfResize(PixelPreprocessor):
        def _decode_on_device(self, encoded):
            return [None if t is None else t.half() for t in super()._decode_on_device(encoded)]

    class DraftDecode(PixelPreprocessor):
        def _decode_on_device(self, encoded):
            side = self.image_processor.size["shortest_edge"]

            def decode(data: bytes):
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.draft("RGB", (side, side))
                        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
                except Exception:
                    return None

            return [None if t is None else t.to(self.device) for t in self._pool.map(decode, encoded)]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = ClipEncoder(path, device, EncoderOptions(largest_batch=64, decode_threads=threads))
    fast = encoder.pixels
    reference = PixelPreprocessor(fast.image_processor, device, fast.dtype, "reference", threads)
    variants = {
        "fast": fast,
        "half": HalfResize(fast.image_processor, device, fast.dtype, "fast", threads),
        "draft": DraftDecode(fast.image_processor, device, fast.dtype, "fast", threads),
    }
    out: dict = {}
    embeddings = {}
    for name, pixels in {"reference": reference, **variants}.items():
        encoder.pixels = pixels
        try:
            embeddings[name] = encoder.encode_images(jpegs[:256])
            if name == "reference":
                continue
            row = {
                f"images_b{b}_per_s": b / timed(lambda b=b: encoder.encode_images(jpegs[:b]), repeats=6)
                for b in (64, 256)
            }
            row["prepare_b64_ms"] = 1000 * timed(lambda pixels=pixels: pixels(jpegs[:64]), repeats=6)
            row["cosine_min_to_fast"] = float((embeddings[name] * embeddings["fast"]).sum(-1).min())
            row["cosine_min_to_reference"] = float((embeddings[name] * embeddings["reference"]).sum(-1).min())
            out[name] = row
            log(f"preparation {name}: " + ", ".join(f"{k} {v:,.6g}" for k, v in row.items()))
        except Exception as exc:  # one failing candidate must not cost the run
            out[name] = {"error": repr(exc)}
            log(f"preparation {name} failed: {exc!r}")
    if device.type == "cuda":
        best = max((n for n in variants if "error" not in out[n]), key=lambda n: out[n]["images_b64_per_s"])
        out["kernels"] = {n: gpu_kernels(encoder, variants[n], jpegs[:64]) for n in dict.fromkeys(("fast", best))}
    encoder.pixels = fast
    return out


def gpu_kernels(encoder, pixels, jpegs: list[bytes], top: int = 15) -> list[tuple[str, float]]:
    """GPU time per kernel (ms per batch) of encoding one batch: what preparation costs the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    encoder.pixels = pixels
    encoder.encode_images(jpegs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            encoder.encode_images(jpegs)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 3000
    rows = sorted(((e.key[:90], e.self_device_time_total / 3000) for e in events), key=lambda r: -r[1])[:top]
    log(
        f"GPU kernels per batch of {len(jpegs)}, total {total:.2f} ms:\n"
        + "\n".join(f"  {ms:8.3f} ms  {k}" for k, ms in rows)
    )
    return [("total", total), *rows]


# The service


class Server(ServedProduct):
    """The product serving only CLIP at a published shape (random weights), every request reaching the model."""

    def __init__(self, home: Path, shape: str, port: int, gateway_workers: int, **env: str) -> None:
        settings = {
            "BENTOML_HOME": str(home),
            "MULTIMODAL_PROFILE": "production",
            "MULTIMODAL_CLIP_MODEL": TAGS[shape],
            "MULTIMODAL_FAMILIES": "clip",
            "MULTIMODAL_CACHE_BACKEND": "none",  # every request reaches the model
            "MULTIMODAL_GATEWAY_WORKERS": str(gateway_workers),
            "MULTIMODAL_CLIP_WORKERS": os.environ.get("MULTIMODAL_CLIP_WORKERS", "1"),
            "MULTIMODAL_MAX_CONCURRENT_REQUESTS": "1024",
        }
        super().__init__(port, home / f"serve-{port}.log", **{**settings, **env})

    def totals(self, kind: str) -> dict[str, float]:
        """Counters of the CLIP service and of each service's HTTP requests, summed over workers."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        endpoint = {"image": "/encode_images", "text": "/encode_texts"}[kind]
        wanted = {
            ("clip_batch_size_sum", "kind", kind): "items",
            ("clip_batch_size_count", "kind", kind): "batches",
            ("clip_embedding_duration_seconds_sum", "kind", kind): "encoding_s",
            ("bentoml_service_request_duration_seconds_sum", "endpoint", endpoint): "clip_request_s",
            ("bentoml_service_request_duration_seconds_count", "endpoint", endpoint): "clip_requests",
            ("bentoml_service_request_duration_seconds_sum", "endpoint", "/v1/embeddings"): "gateway_request_s",
            ("bentoml_service_request_duration_seconds_count", "endpoint", "/v1/embeddings"): "gateway_requests",
        }
        values = dict.fromkeys(wanted.values(), 0.0)
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                for (name, label, value), key in wanted.items():
                    if sample.name == name and sample.labels.get(label) == value:
                        values[key] += sample.value
        return values

    def processes(self) -> dict[str, list]:
        """The server's processes by role: the CLIP service's workers, the rest (entry service, supervisor)."""
        import psutil

        roles: dict[str, list] = {"clip": [], "entry": []}
        for child in psutil.Process(self.process.pid).children(recursive=True) + [psutil.Process(self.process.pid)]:
            with contextlib.suppress(psutil.Error):
                roles["clip" if "--service-name CLIP" in " ".join(child.cmdline()) else "entry"].append(child)
        return roles


class GpuSampler:
    """Mean GPU utilisation (nvidia-smi, every 0.2 s) while a level runs; None without a GPU."""

    def __enter__(self) -> GpuSampler:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return
        while not self._stop.wait(0.2):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


class CpuByRole:
    """Cores used by each role while a level runs: the CLIP service, the entry service, and the
    rest of the machine (the load generator, mostly). A role near its process count is the wall."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @staticmethod
    def _seconds(processes: list) -> float:
        import psutil

        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> CpuByRole:
        import psutil

        self.roles = self.server.processes()
        self.started = time.perf_counter()
        self.before = {role: self._seconds(processes) for role, processes in self.roles.items()}
        self._before_each = {p.pid: self._seconds([p]) for processes in self.roles.values() for p in processes}
        self._clip_threads_before = self._threads(self.roles["clip"][:1])
        self.machine_before = psutil.cpu_times()
        return self

    @staticmethod
    def _threads(processes: list) -> dict[tuple[int, str], float]:
        """CPU seconds of each thread of these processes, by (id, name): which threads burn a
        worker's cores (Python's, or native ones such as an OpenMP pool or a CUDA wait spinning)."""
        import psutil

        seconds: dict[tuple[int, str], float] = {}
        for process in processes:
            with contextlib.suppress(psutil.Error, OSError):
                for thread in process.threads():
                    comm = Path(f"/proc/{process.pid}/task/{thread.id}/comm")
                    name = comm.read_text().strip() if comm.exists() else "?"
                    seconds[(thread.id, name)] = thread.user_time + thread.system_time
        return seconds

    def __exit__(self, *exc) -> None:
        import psutil

        wall = time.perf_counter() - self.started
        machine = psutil.cpu_times()
        busy = (
            sum(machine)
            - machine.idle
            - machine.iowait
            - (sum(self.machine_before) - self.machine_before.idle - self.machine_before.iowait)
        )
        self.cores = {
            role: (self._seconds(processes) - self.before[role]) / wall for role, processes in self.roles.items()
        }
        self.cores["rest"] = busy / wall - sum(self.cores.values())
        self.cores["processes"] = {role: len(processes) for role, processes in self.roles.items()}
        # Each worker's own cores: an uneven spread means some workers' connections wait on a
        # saturated event loop while others idle (workers share one listening socket).
        # The first CLIP worker's busiest threads (native ids; Python's thread names are not the OS's).
        after = self._threads(self.roles["clip"][:1])
        busy = sorted(
            ((after[key] - self._clip_threads_before.get(key, 0.0)) / wall, f"{key[1]}:{key[0]}") for key in after
        )
        self.cores["clip_threads"] = {name: round(cores, 2) for cores, name in reversed(busy[-8:]) if cores >= 0.02}
        self.cores["clip_thread_count"] = len(after)
        self.cores["per_worker"] = {
            role: sorted(round((self._seconds([p]) - self._before_each[p.pid]) / wall, 2) for p in processes)
            for role, processes in self.roles.items()
        }


def profile(server: Server, args: argparse.Namespace, label: str) -> None:
    """py-spy on the first entry-service worker and the first CLIP worker for 5 s of the level."""
    roles = server.processes()
    workers = {
        "clip": roles["clip"],
        "entry": [p for p in roles["entry"] if "--service-name Gateway" in " ".join(p.cmdline())],
    }
    for role, processes in workers.items():
        if processes:
            py_spy(processes[0].pid, args.out / f"pyspy-{label}-{role}.txt", seconds=5)


def measure(
    server: Server, name: str, kind: str, bodies: list[bytes], concurrency: int, args: argparse.Namespace
) -> dict:
    before = server.totals(kind)
    if concurrency == args.profile_at and name in args.profile_scenarios:
        label = f"{name.replace(' ', '-')}-{concurrency}"
        threading.Timer(args.warmup + 2.0, profile, (server, args, label)).start()
    with GpuSampler() as gpu, CpuByRole(server) as cpu:
        result: LevelResult = run_level(
            f"{server.url}/v1/embeddings",
            bodies,
            concurrency,
            duration=args.duration,
            warmup=args.warmup,
            processes=args.client_processes,
        )
    after = server.totals(kind)
    delta = {key: after[key] - before[key] for key in after}

    def mean_ms(seconds: str, count: str) -> float:
        return 1000 * delta[seconds] / delta[count] if delta[count] else 0.0

    row = {
        "scenario": name,
        **result.as_dict(),
        "mean_batch": delta["items"] / delta["batches"] if delta["batches"] else 0.0,
        # Items per call from the entry service (its coalescer) to the CLIP service.
        "items_per_call": delta["items"] / delta["clip_requests"] if delta["clip_requests"] else 0.0,
        "gpu_util_percent": gpu.mean,
        # How busy the CLIP service's encoder was: near 1 per worker, it is the wall; far below, something before it is.
        "encoder_busy": delta["encoding_s"]
        / (args.duration + args.warmup + 1.0),  # run_level starts its clients 1 s in
        "encoder_ms_per_batch": mean_ms("encoding_s", "batches"),
        # Where a request's time goes: the entry service's whole request, the CLIP call inside it
        # (its batcher's queue + the encoder), the encoder alone.
        "gateway_request_ms": mean_ms("gateway_request_s", "gateway_requests"),
        "clip_request_ms": mean_ms("clip_request_s", "clip_requests"),
        "cores": cpu.cores,
    }
    gpu_text = f", GPU {gpu.mean:.0f}%" if gpu.mean is not None else ""
    log(
        f"{name} @{concurrency}: {result.per_second:,.1f}/s, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"batch {row['mean_batch']:.1f} ({row['encoder_ms_per_batch']:.1f} ms each, "
        f"encoder busy {row['encoder_busy']:.0%}), entry {row['gateway_request_ms']:.1f} ms "
        f"> CLIP call {row['clip_request_ms']:.1f} ms{gpu_text}, statuses {result.statuses}"
    )
    if result.errors:
        log(f"  answers other than 200: {result.errors}")
    roles = ", ".join(f"{role} {value:.1f}" for role, value in cpu.cores.items() if isinstance(value, float))
    log(
        f"  cores: {roles} (processes {cpu.cores['processes']}); items per call {row['items_per_call']:.1f}; "
        f"per worker {cpu.cores['per_worker']}"
    )
    log(f"  first CLIP worker's busiest of {cpu.cores['clip_thread_count']} threads: {cpu.cores['clip_threads']}")
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["service"] if r["scenario"] == "images"]
    levels = [r["concurrency"] for r in rows]
    raw = results["raw"]["images"][str(max(int(k) for k in results["raw"]["images"] if str(k).isdigit()))][
        "model_per_s"
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(levels, [r["per_second"] for r in rows], marker="o", label="service, /v1/embeddings (1 JPEG a request)")
    left.axhline(raw, color="gray", linestyle="--", label=f"raw model, batched ({raw:,.0f}/s)")
    left.axhline(0.8 * raw, color="gray", linestyle=":", label="80% of raw")
    for scenario in sorted(
        {r["scenario"] for r in results["service"] if r["scenario"].startswith("images, max batch")}
    ):
        large = [r for r in results["service"] if r["scenario"] == scenario]
        left.plot([r["concurrency"] for r in large], [r["per_second"] for r in large], marker="s", label=scenario)
    off = [r for r in results["service"] if r["scenario"] == "images, batching off"]
    if off:
        left.scatter(
            [r["concurrency"] for r in off], [r["per_second"] for r in off], color="red", label="max batch size 1"
        )
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("images / s")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(levels, [r["p50_ms"] for r in rows], marker="o", label="p50")
    right.plot(levels, [r["p99_ms"] for r in rows], marker="^", label="p99")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency (ms)")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(f"CLIP {results['shape']} on {results['raw']['device']}: end to end vs the raw model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(TAGS), default="vit-l-14")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 128, 256, 512])
    parser.add_argument(
        "--batching-off-at", type=int, default=128, help="concurrency of the max-batch-size-1 run (0: skip)"
    )
    parser.add_argument("--text-levels", type=int, nargs="+", default=[256])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per level")
    # BentoML's batcher relearns its wait from the last 50 batches, at most every 5 s: a level is
    # measured once it has adapted to that level's load.
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each level")
    parser.add_argument("--gateway-workers", type=int, default=8)
    parser.add_argument("--clip-workers", type=int, default=1, help="CLIP service processes sharing the GPU")
    parser.add_argument("--large-batch", type=int, default=256, help="also measure at this max batch size (0: skip)")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--images", type=int, default=2048, help="distinct JPEGs to send")
    parser.add_argument("--raw-batches", type=int, nargs="+", default=[1, 64, 256], help="batch sizes of the raw model")
    parser.add_argument(
        "--in-process-callers",
        type=int,
        default=32,
        help="measure the service's encoder in-process, continuously batched for these callers (0: skip)",
    )
    parser.add_argument("--profile-at", type=int, default=0, help="py-spy the workers at this concurrency (0: never)")
    parser.add_argument("--profile-scenarios", nargs="+", default=["images", "single texts"], help="which to py-spy")
    parser.add_argument(
        "--preparation-threads",
        type=int,
        default=8,
        help="try cheaper image preparation in-process, with these decode threads (0: skip)",
    )
    parser.add_argument(
        "--calls-in-flight",
        type=int,
        help="MULTIMODAL_CLIP_CALLS_IN_FLIGHT of the served service (default: the product's)",
    )
    parser.add_argument(
        "--also",
        nargs="+",
        action="append",
        default=[],
        metavar="ENV=VALUE",
        help="also serve with these settings, at the highest levels (repeatable)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="serve with MULTIMODAL_CLIP_CUDA_GRAPHS=false")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["MULTIMODAL_CLIP_WORKERS"] = str(args.clip_workers)
    if args.calls_in_flight is not None:
        os.environ["MULTIMODAL_CLIP_CALLS_IN_FLIGHT"] = str(args.calls_in_flight)
    os.environ["MULTIMODAL_CLIP_CUDA_GRAPHS"] = "false" if args.no_cuda_graphs else "true"

    home = Path(tempfile.mkdtemp(prefix="bench-clip-"))
    path = args.out / f"clip_{args.shape}.json"

    def save() -> None:  # after each level: a run cut off by the device's time limit keeps what it measured
        path.write_text(json.dumps(results, indent=2))

    def record(level: dict) -> None:
        results["service"].append(level)
        save()

    write_model(home, args.shape)
    jpegs = photo_jpegs(args.images)
    log(f"{len(jpegs)} JPEGs, {np.mean([len(j) for j in jpegs]) / 1000:.0f} KB on average")
    results: dict = {"shape": args.shape, "args": {k: str(v) for k, v in vars(args).items()}, "service": []}
    results["raw"] = raw_model(model_path(home), jpegs, args.raw_batches)  # its model is freed on return
    results["raw"]["device_cpu_count"] = os.cpu_count()
    results["sync_points"] = sync_points(model_path(home), jpegs)
    results["failed_images"] = failed_images(model_path(home), jpegs)
    if args.in_process_callers:
        results["encoder"] = service_encoder(model_path(home), jpegs, args.raw_batches, args.in_process_callers)
    if args.preparation_threads:
        results["preparation"] = preparation_variants(model_path(home), jpegs, args.preparation_threads)
    results["jpeg_kb_mean"] = float(np.mean([len(j) for j in jpegs]) / 1000)
    save()

    image_bodies = [embeddings_body([data_url(j)]) for j in jpegs]
    text_list = texts(20_000)
    single_texts = [embeddings_body([t]) for t in text_list]
    text_batches = [embeddings_body(text_list[i : i + 64]) for i in range(0, len(text_list) - 64, 64)]

    server = Server(home, args.shape, 3000, args.gateway_workers)
    try:
        server.wait_ready()
        # Warm up at one client: BentoML's batcher holds a lone request for the mean queueing wait of
        # its last batches, so the 1-client level is measured before any load, and again after it.
        log("server ready; warming up")
        measure(server, "warm-up", "image", image_bodies, 1, args)
        for level in args.levels:
            record(measure(server, "images", "image", image_bodies, level, args))
        record(measure(server, "images, 1 client after load", "image", image_bodies, 1, args))
        for level in args.text_levels:
            record(measure(server, "single texts", "text", single_texts, level, args))
        record(measure(server, "64 texts a request", "text", text_batches, 32, args))
    finally:
        server.stop()
    if args.large_batch:
        # The same service with room for larger batches, where per-batch costs weigh less.
        server = Server(
            home, args.shape, 3002, args.gateway_workers, MULTIMODAL_CLIP_MAX_BATCH_SIZE=str(args.large_batch)
        )
        try:
            server.wait_ready()
            measure(server, "warm-up", "image", image_bodies, 256, args)
            for level in (256, 512):
                record(measure(server, f"images, max batch {args.large_batch}", "image", image_bodies, level, args))
        finally:
            server.stop()
    for port, also in enumerate(args.also, start=3003):
        # Another configuration of the same service, at the highest level, in the same run.
        overrides = dict(item.split("=", 1) for item in also)
        server = Server(home, args.shape, port, args.gateway_workers, **overrides)
        label = ", ".join(f"{k.removeprefix('MULTIMODAL_').lower()} {v}" for k, v in overrides.items())
        try:
            server.wait_ready()
            measure(server, "warm-up", "image", image_bodies, 256, args)
            record(measure(server, f"images, {label}", "image", image_bodies, max(args.levels), args))
            record(measure(server, f"single texts, {label}", "text", single_texts, max(args.text_levels), args))
            record(measure(server, f"64 texts a request, {label}", "text", text_batches, 32, args))
        finally:
            server.stop()
    if args.batching_off_at:
        server = Server(home, args.shape, 3001, args.gateway_workers, MULTIMODAL_CLIP_MAX_BATCH_SIZE="1")
        try:
            server.wait_ready()
            measure(server, "warm-up", "image", image_bodies, 16, args)
            record(measure(server, "images, batching off", "image", image_bodies, args.batching_off_at, args))
        finally:
            server.stop()

    save()
    results = json.loads(path.read_text())  # keys as strings, as a reader of the file sees them
    plot(results, args.out / f"clip_{args.shape}.png")
    log(f"wrote {path} and its plot")
    summarize(results)


def summarize(results: dict) -> None:
    raw = results["raw"]
    raw_images = max(v["model_per_s"] for k, v in raw["images"].items() if str(k).isdigit())
    raw_texts = max(v["model_per_s"] for v in raw["texts"].values())
    rows = results["service"]
    images = [r for r in rows if r["scenario"] == "images"]
    best = max(images, key=lambda r: r["per_second"])
    large = [r for r in rows if r["scenario"].startswith("images, max batch")]
    on = next((r for r in images if r["concurrency"] == int(results["args"]["batching_off_at"])), best)
    off = next((r for r in rows if r["scenario"] == "images, batching off"), None)
    print(f"\n## CLIP {results['shape']} on {raw['device']}")
    smallest = min((k for k in raw["images"] if str(k).isdigit()), key=int)
    print(f"raw image model {raw_images:,.0f}/s; batch {smallest} {raw['images'][smallest]['model_ms']:.1f} ms")
    print(
        f"images end to end / raw: {best['per_second'] / raw_images:.0%} "
        f"({best['per_second']:,.0f}/s at {best['concurrency']} clients)"
    )
    if large:
        top = max(large, key=lambda r: r["per_second"])
        print(
            f"  {top['scenario']}: {top['per_second'] / raw_images:.0%} "
            f"({top['per_second']:,.0f}/s at {top['concurrency']} clients)"
        )
    for r in rows:
        print(f"  {r['scenario']:<22} c={r['concurrency']:<4} {r['per_second']:>9,.1f}/s  p50 {r['p50_ms']:>8.1f} ms  "
              f"p99 {r['p99_ms']:>8.1f} ms  batch {r['mean_batch']:>5.1f}  {r['statuses']}")  # fmt: skip
    if off:
        print(
            f"batching on / off at {on['concurrency']} clients: {on['per_second'] / max(off['per_second'], 1e-9):.1f}x"
        )
    batches = next(r for r in rows if r["scenario"] == "64 texts a request")
    print(
        f"64-text requests: {64 * batches['per_second']:,.0f} texts/s = "
        f"{64 * batches['per_second'] / raw_texts:.0%} of raw ({raw_texts:,.0f}/s)"
    )
    print(f"parity fast vs reference: {raw['parity']}")
    for name, row in results.get("encoder", {}).items():
        print(f"service encoder in-process, {name}: {row}")


if __name__ == "__main__":
    main()
