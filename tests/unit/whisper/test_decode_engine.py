"""The continuous decode engine gives every window openai-whisper's own ``decode`` result, whether
it decodes alone or joins rows already decoding (at another position, with other options)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import DecodingOptions

from services.whisper.decode_engine import DecodeEngine
from services.whisper.static_decoder import StaticDecoder
from tests.unit.whisper.conftest import chirp_mels


def engine_for(model: whisper.Whisper, capacity: int) -> DecodeEngine:
    decoder = StaticDecoder(model, capacity=capacity, dtype=torch.float32, use_graphs=False)
    return DecodeEngine(model, decoder, threading.Lock(), steps_between_checks=2)


def assert_same(result, expected) -> None:
    assert result.tokens == expected.tokens
    assert result.text == expected.text
    assert result.language == expected.language
    np.testing.assert_allclose(result.avg_logprob, expected.avg_logprob, atol=1e-4)
    np.testing.assert_allclose(result.no_speech_prob, expected.no_speech_prob, atol=1e-5)


def test_windows_joining_a_running_decode_get_whisper_decode_s_tokens(model):
    windows = chirp_mels(model, 5)
    options = [
        DecodingOptions(language="en", fp16=False),
        DecodingOptions(language="de", fp16=False, without_timestamps=True),
        DecodingOptions(language="fr", fp16=False, prompt="Ein Satz davor", max_initial_timestamp=0.5),
        DecodingOptions(language="en", fp16=False, task="translate", sample_len=40),
        DecodingOptions(language="ja", fp16=False, suppress_blank=False),
    ]
    expected = [whisper.decode(model, w, o) for w, o in zip(windows, options, strict=True)]
    assert any(len(e.tokens) > 20 for e in expected)  # real decoding, long enough to be joined

    engine = engine_for(model, capacity=4)  # five windows, four rows: the last waits for a free one
    first = engine.submit(windows[0], options[0], "en")
    time.sleep(0.05)
    assert not first.done()  # the others join it mid-decode
    rest = [engine.submit(w, o, o.language) for w, o in zip(windows[1:], options[1:], strict=True)]
    for future, want in zip([first, *rest], expected, strict=True):
        assert_same(future.result(timeout=120), want)
    assert engine.in_flight == 0


def test_rows_freed_by_one_decode_serve_the_next_with_the_same_results(model):
    windows, options = chirp_mels(model, 3), DecodingOptions(language="en", fp16=False, sample_len=30)
    expected = [whisper.decode(model, w, options) for w in windows]
    engine = engine_for(model, capacity=2)
    for _ in range(2):  # the second pass runs over rows (and cache) the first one left
        futures = [engine.submit(w, options, "en") for w in windows]
        for future, want in zip(futures, expected, strict=True):
            assert_same(future.result(timeout=120), want)


def test_sampling_rows_beside_greedy_rows_leave_the_greedy_ones_exact(model):
    windows = chirp_mels(model, 2)
    greedy, sampling = (
        DecodingOptions(language="en", fp16=False),
        DecodingOptions(language="en", fp16=False, temperature=0.8),
    )
    expected = whisper.decode(model, windows[0], greedy)
    engine = engine_for(model, capacity=2)
    sampled = engine.submit(windows[1], sampling, "en")
    assert_same(engine.submit(windows[0], greedy, "en").result(timeout=120), expected)
    result = sampled.result(timeout=120)
    assert result.temperature == 0.8 and np.isfinite(result.avg_logprob)


def test_what_the_engine_leaves_to_the_batch_path():
    assert DecodeEngine.takes(DecodingOptions(language="en"), "en")
    assert not DecodeEngine.takes(DecodingOptions(beam_size=5), "en")
    assert not DecodeEngine.takes(DecodingOptions(best_of=5, temperature=0.5), "en")
    assert not DecodeEngine.takes(DecodingOptions(), None)  # language detection is the package's


def test_windows_admitted_together_prefill_in_parts_with_the_same_results(model, monkeypatch):
    # At large-v3, 128 windows prefilled at once needed a second cache's worth of GPU memory; now a
    # prefill takes PREFILL_ROWS windows at a time, here 2, so 5 windows admitted together take 3.
    monkeypatch.setattr("services.whisper.decode_engine.PREFILL_ROWS", 2)
    windows, options = chirp_mels(model, 5), DecodingOptions(language="en", fp16=False, sample_len=30)
    expected = [whisper.decode(model, w, options) for w in windows]
    admitted: list[int] = []
    passes: list[int] = []
    prefill = DecodeEngine._prefill

    def counted(self: DecodeEngine, rows: list, length: int) -> torch.Tensor:
        passes.append(len(rows))
        return prefill(self, rows, length)

    monkeypatch.setattr(DecodeEngine, "_prefill", counted)
    decoder = StaticDecoder(model, capacity=8, dtype=torch.float32, use_graphs=False)
    engine = DecodeEngine(model, decoder, threading.Lock(), on_admitted=admitted.append)
    with engine._arrived:  # all five wait until submitted, so one admission takes them together
        futures = [engine.submit(w, options, "en") for w in windows]
    for future, want in zip(futures, expected, strict=True):
        assert_same(future.result(timeout=120), want)
    assert admitted == [5] and passes == [2, 2, 1]


def test_stop_answers_the_windows_in_flight_then_ends_the_thread(model):
    engine = engine_for(model, capacity=2)
    options = DecodingOptions(language="en", fp16=False, sample_len=6)
    expected = whisper.decode(model, chirp_mels(model, 1)[0], options)
    future = engine.submit(chirp_mels(model, 1)[0], options, "en")
    engine.stop()
    assert not engine._thread.is_alive()
    assert_same(future.result(timeout=0), expected)


def test_detection_beside_a_running_decode_gives_detect_language_s_probabilities(model):
    from whisper.decoding import detect_language

    windows = chirp_mels(model, 4)
    options = DecodingOptions(language="en", fp16=False)
    _, expected = detect_language(model, windows[1:])
    expected_decode = whisper.decode(model, windows[0], options)
    assert len(expected_decode.tokens) > 20  # long enough to be running when the detections come
    engine = engine_for(model, capacity=2)
    decoding = engine.submit(windows[0], options, "en")
    time.sleep(0.05)
    assert not decoding.done()  # the detections run between its steps
    detections = engine.detect(list(windows[1:]))
    for detection, probabilities in zip(detections, expected, strict=True):
        detected = detection.result(timeout=60)
        assert detected.keys() == probabilities.keys()
        np.testing.assert_allclose(list(detected.values()), list(probabilities.values()), atol=1e-6)
    assert_same(decoding.result(timeout=60), expected_decode)
    engine.stop()


def test_a_window_of_the_wrong_shape_is_refused_before_it_joins_a_pass(model):
    engine = engine_for(model, capacity=2)
    good = chirp_mels(model, 1)[0]
    with pytest.raises(ValueError, match="shape"):
        engine.detect([good, torch.zeros(3, 7)])
    with pytest.raises(ValueError, match="shape"):
        engine.submit(good[:, :100], DecodingOptions(language="en", fp16=False), "en")
    assert engine.in_flight == 0 and not engine._detections  # nothing of either call was queued
    assert engine.detect([good])[0].result(timeout=60)
    engine.stop()


def test_a_failing_metrics_callback_fails_no_window(model):
    def broken(*_: object) -> None:
        raise RuntimeError("a metrics backend is down")

    decoder = StaticDecoder(model, capacity=2, dtype=torch.float32, use_graphs=False)
    engine = DecodeEngine(model, decoder, threading.Lock(), on_admitted=broken, on_steps=broken, on_detected=broken)
    window, options = chirp_mels(model, 1)[0], DecodingOptions(language="en", fp16=False, sample_len=6)
    assert engine.detect([window])[0].result(timeout=60)
    assert_same(engine.submit(window, options, "en").result(timeout=60), whisper.decode(model, window, options))
    engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death, on purpose
def test_nothing_waits_forever_on_an_engine_that_stopped_or_died(model, monkeypatch):
    engine = engine_for(model, capacity=2)
    engine.stop()
    window, options = chirp_mels(model, 1)[0], DecodingOptions(language="en", fp16=False, sample_len=6)
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(window, options, "en")
    with pytest.raises(RuntimeError, match="stopped"):
        engine.detect([window])

    dying = engine_for(model, capacity=2)

    def fail(*_: object) -> None:
        raise RuntimeError("a sticky CUDA error")

    # A failure the loop cannot survive: its own error handling fails too, and the thread ends.
    monkeypatch.setattr(dying, "_admit", fail)
    monkeypatch.setattr(dying, "_fail_all", fail)
    decoding = dying.submit(window, options, "en")
    with pytest.raises(RuntimeError):
        decoding.result(timeout=60)
    dying._thread.join(timeout=60)
    assert not dying._thread.is_alive()
    with pytest.raises(RuntimeError, match="stopped"):
        dying.detect([window])
