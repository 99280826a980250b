"""Long recordings: the two long-audio modes against one ``transcribe()`` over the whole file.

Through HTTP against ``bentoml serve`` (Whisper only, the tiny profile, this machine's CPU), each
recording is transcribed with ``long_audio=parallel`` (cut at quiet points, the chunks at once)
and with ``long_audio=sequential`` (transcribe's own seeking over the file). Both are compared with
openai-whisper's ``transcribe`` run here once over the whole file, on the same weights, with the
service's options (temperature 0, no previous-text conditioning, word timestamps):

- word error rate of each mode's text against the reference's (jiwer, after lower-casing and
  removing punctuation);
- timestamp drift: for each word both transcripts share (jiwer's alignment), how far apart their
  start times are.

The tiny model has random weights, so this measures how closely each mode agrees with
``transcribe``, not how well anything transcribes. The recordings are espeak-ng's speech of English
prose with its pauses between sentences, 2 to 6 minutes long.

    python -m bench.whisper_long_audio --minutes 2 4 6
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.serving import ServedProduct
from bench.soak import speech_wav

REPO = Path(__file__).resolve().parents[1]

# Plain prose, spoken sentence by sentence; recordings cycle through it from different starts.
SENTENCES = [
    "The harbour committee met on Tuesday to discuss the new ferry timetable.",
    "Several members asked whether the evening service could run until midnight in summer.",
    "The treasurer explained that the fuel budget had already been spent for the year.",
    "A fisherman from the north quay described the damage the spring storms had done to the pier.",
    "Repairs will begin in April and should take about six weeks.",
    "Meanwhile, boats will use the temporary landing beside the old customs house.",
    "The school asked for a discount on group tickets for its autumn field trips.",
    "After some debate, the committee agreed to a trial of half price fares on weekdays.",
    "Visitors have complained about the lack of shelter at the bus stop near the ticket office.",
    "A local carpenter offered to build a wooden roof at cost.",
    "The chair thanked the volunteers who cleaned the beach after the regatta.",
    "Next month the council will publish its plan for the empty warehouses on the west side.",
    "Some residents would like a market hall, others a small museum of the town's history.",
    "The meeting closed with a reminder that the ferry will not run on the first of May.",
    "Minutes will be posted in the library and on the notice board by the harbour gate.",
    "Questions may be sent to the secretary before the next meeting in three weeks.",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def recording(minutes: float, index: int, folder: Path) -> Path:
    """espeak-ng's speech of enough prose for about ``minutes`` (about 14 sentences a minute)."""
    count = max(1, round(minutes * 14))
    text = " ".join(SENTENCES[(index * 5 + i) % len(SENTENCES)] for i in range(count))
    path = folder / f"speech-{index}.wav"
    work = folder / f"work-{index}"
    work.mkdir(exist_ok=True)
    path.write_bytes(speech_wav(text, work))
    return path


def words_of(timed: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """Each word, lower-cased without punctuation, with its start time (empty words dropped)."""
    words: list[str] = []
    starts: list[float] = []
    for word in timed:
        for token in re.sub(r"[^\w\s']", " ", word["word"].lower()).split():
            words.append(token)
            starts.append(float(word["start"]))
    return words, starts


def compare(reference: list[dict[str, Any]], hypothesis: list[dict[str, Any]]) -> dict[str, Any]:
    """Word error rate of ``hypothesis`` against ``reference`` (timed words, as verbose JSON lists
    them), and the start-time drift of the words they share."""
    import jiwer

    ref_words, ref_starts = words_of(reference)
    hyp_words, hyp_starts = words_of(hypothesis)
    if not ref_words:
        return {"wer": None, "reference_words": 0, "hypothesis_words": len(hyp_words)}
    output = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words) or "")
    drift = [
        abs(hyp_starts[chunk.hyp_start_idx + k] - ref_starts[chunk.ref_start_idx + k])
        for chunk in output.alignments[0]
        if chunk.type == "equal"
        for k in range(chunk.ref_end_idx - chunk.ref_start_idx)
    ]
    return {
        "wer": output.wer,
        "reference_words": len(ref_words),
        "hypothesis_words": len(hyp_words),
        "shared_words": len(drift),
        "drift_p50_s": float(np.percentile(drift, 50)) if drift else None,
        "drift_p95_s": float(np.percentile(drift, 95)) if drift else None,
        "drift_max_s": float(max(drift)) if drift else None,
    }


def reference_transcribe(path: Path, profile: str) -> tuple[list[dict[str, Any]], float]:
    """openai-whisper's ``transcribe`` over the whole file, on the served weights, as the service calls it."""
    import bentoml
    import whisper

    from configuration.profiles import model_spec
    from configuration.settings import Settings
    from services.whisper.service import CHECKPOINT

    tag = model_spec("whisper", Settings(profile=profile)).tag  # type: ignore[arg-type]
    model = whisper.load_model(str(Path(bentoml.models.get(tag).path) / CHECKPOINT), device="cpu")
    started = time.perf_counter()
    result = model.transcribe(
        whisper.load_audio(str(path)), temperature=0, condition_on_previous_text=False, fp16=False, word_timestamps=True
    )
    words = [word for segment in result["segments"] for word in segment.get("words", [])]
    return words, time.perf_counter() - started


def served(server: ServedProduct, path: Path, mode: str) -> tuple[list[dict[str, Any]], float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": (path.name, path.read_bytes())},
        data={
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities[]": ["segment", "word"],
            "long_audio": mode,
        },
        timeout=1800,
    )
    response.raise_for_status()
    body = response.json()
    return body.get("words", []), time.perf_counter() - started


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["recordings"]
    labels = [f"{r['seconds'] / 60:.1f} min" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    for offset, mode in ((-width / 2, "parallel"), (width / 2, "sequential")):
        x = np.arange(len(rows)) + offset
        left.bar(x, [r[mode]["wer"] or 0 for r in rows], width, label=mode)
        drifts = [r[mode]["drift_p95_s"] for r in rows]
        right.bar(x, [d or 0 for d in drifts], width, label=mode)
        for position, drift in zip(x, drifts, strict=True):
            if drift is None:  # no word in common: no drift to measure
                right.annotate("none shared", (position, 0), ha="center", va="bottom", fontsize=7, rotation=90)
    for axis, title in ((left, "word error rate against transcribe()"), (right, "start-time drift, p95 (s)")):
        axis.set_xticks(range(len(rows)), labels)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Whisper long audio, {results['model']}: agreement with one transcribe() over the file")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 4, 6], help="lengths of the recordings")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="whisper_long_audio_tiny_cpu")
    parser.add_argument(
        "--profile",
        choices=["tiny", "production"],
        default="tiny",
        help="production: large-v3's published weights, where bentos.import_models could fetch them",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    folder = Path(tempfile.mkdtemp(prefix="bench-whisper-long-"))
    server = ServedProduct(
        3000,
        folder / "serve.log",
        MULTIMODAL_FAMILIES="whisper",
        MULTIMODAL_PROFILE=args.profile,
        MULTIMODAL_REQUEST_TIMEOUT_SECONDS="1800",
        MULTIMODAL_WHISPER_MAX_QUEUED_WINDOWS="512",
    )
    model = "tiny-whisper (random weights)" if args.profile == "tiny" else "whisper-large-v3"
    results: dict[str, Any] = {"model": model, "recordings": []}
    try:
        server.wait_ready()
        for index, minutes in enumerate(args.minutes):
            path = recording(minutes, index, folder)
            import soundfile

            seconds = soundfile.info(str(path)).duration
            log(f"recording {index}: {seconds:.0f} s of speech")
            reference, reference_s = reference_transcribe(path, args.profile)
            row: dict[str, Any] = {"seconds": seconds, "reference_s": reference_s}
            for mode in ("parallel", "sequential"):
                hypothesis, elapsed = served(server, path, mode)
                row[mode] = {**compare(reference, hypothesis), "wall_s": elapsed}
                log(f"  {mode}: {row[mode]}")
            log(f"  reference transcribe(): {reference_s:.1f} s")
            results["recordings"].append(row)
    finally:
        server.stop()
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{args.name}.png")
    log(f"wrote {args.out / args.name}.json and .png")


if __name__ == "__main__":
    main()
