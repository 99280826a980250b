"""Decode throughput of the Whisper service's batched path on a GPU (large-v3 shapes, random weights).

    python -m bench.whisper_gpu_decode [--tokens 100] [--out results.json]   # from the repository root

Measures windows per second for: openai-whisper as packaged, one window at a time (fp32
parameters cast to fp16 on every forward); fp16 weights stored once, as ``services.whisper.service``
does on a GPU, at batch 1; and mixed-language batches of 4, 16 and 32 windows, as the
service's batcher forms them. Each window decodes exactly ``--tokens`` tokens (end of text is
suppressed) so that every configuration does the same work. It also checks that batching does
not change tokens: 16 windows decoded alone and in one mixed-language batch.

It needs only torch and openai-whisper: the service's mixed-language decoding task comes from
``services.whisper.decoding``, which imports no BentoML.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import whisper
from whisper.decoding import DecodingOptions
from whisper.model import ModelDimensions, Whisper

from services.whisper.decoding import MixedLanguageTask

LARGE_V3 = ModelDimensions(
    n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
    n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32,
)  # fmt: skip
LANGUAGES = ["en", "de", "fr", "es", "it", "ja", "zh", "ru"]


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    fn()  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100, help="tokens decoded per window")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Whisper(LARGE_V3)
        with torch.no_grad():
            model.decoder.positional_embedding.normal_(std=0.02)  # torch.empty otherwise
    model.eval()
    tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=model.num_languages)

    def options(language: str) -> DecodingOptions:
        return DecodingOptions(
            language=language, fp16=True, sample_len=args.tokens, suppress_tokens=[-1, tokenizer.eot]
        )

    mels = torch.randn(32, LARGE_V3.n_mels, 3000, device="cuda").half()
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "tokens_per_window": args.tokens}

    seconds, _ = timed(lambda: whisper.decode(model, mels[0], options("en")), repeats=2)
    results["packaged_fp32_weights_batch1_windows_per_s"] = 1 / seconds
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
            module.half()
    seconds, _ = timed(lambda: whisper.decode(model, mels[0], options("en")), repeats=3)
    results["fp16_weights_batch1_windows_per_s"] = 1 / seconds
    for batch in (4, 16, 32):
        languages = [LANGUAGES[i % len(LANGUAGES)] for i in range(batch)]
        seconds, _ = timed(
            lambda languages=languages, batch=batch: MixedLanguageTask(model, options("en"), languages).run(
                mels[:batch]
            )
        )
        results[f"fp16_weights_batch{batch}_mixed_languages_windows_per_s"] = batch / seconds

    languages = [LANGUAGES[i % len(LANGUAGES)] for i in range(16)]
    batched = MixedLanguageTask(model, options("en"), languages).run(mels[:16])
    alone = [whisper.decode(model, mels[i], options(languages[i])) for i in range(16)]
    identical = sum(a.tokens == b.tokens for a, b in zip(alone, batched, strict=True))
    results["batch16_windows_with_identical_tokens"] = identical

    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
