"""The Whisper service's decoding path (static KV cache, batch-wide logit filters, greedy choice
without host waits) gives the tokens of openai-whisper's own ``decode`` on the same weights.

On the CPU the decoder runs eagerly over the same fixed buffers the GPU replays as CUDA graphs;
the graphs themselves need a GPU (``bench/whisper_gpu.py`` checks their tokens there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import ApplyTimestampRules, DecodingOptions, SuppressTokens
from whisper.tokenizer import get_tokenizer

from services.whisper.decoding import BatchDecodingTask
from services.whisper.logit_filters import BatchedTimestampRules, SuppressTokensOnDevice
from services.whisper.static_decoder import StaticDecoder, captured_sizes
from tests.unit.whisper.conftest import chirp_mels

OPTIONS = {
    "timestamps": DecodingOptions(language="en", fp16=False),
    "no timestamps": DecodingOptions(language="en", fp16=False, without_timestamps=True),
    "prompt": DecodingOptions(language="de", fp16=False, prompt="Ein Satz davor", max_initial_timestamp=0.5),
    "translate": DecodingOptions(language="fr", task="translate", fp16=False, sample_len=40),
}


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("capacity", [8, 2])  # 2: the batch of 5 is larger than the cache, decoded over one of its own
def test_static_decoding_gives_whisper_decode_s_tokens(model, name, capacity):
    options, batch = OPTIONS[name], chirp_mels(model, 5)
    expected = whisper.decode(model, batch, options)
    decoder = StaticDecoder(model, capacity=capacity, dtype=torch.float32, use_graphs=False)
    for _ in range(2):  # the second decode runs over the first one's stale cache
        decoded = BatchDecodingTask(model, options, static_decoder=decoder).run(batch)
        assert [d.tokens for d in decoded] == [e.tokens for e in expected]
        assert [d.text for d in decoded] == [e.text for e in expected]
        np.testing.assert_allclose([d.avg_logprob for d in decoded], [e.avg_logprob for e in expected], atol=1e-4)
        np.testing.assert_allclose([d.no_speech_prob for d in decoded], [e.no_speech_prob for e in expected], atol=1e-5)
    assert any(len(e.tokens) > 5 for e in expected)  # the comparison covers real decoding, not empty texts


def test_mixed_languages_on_the_static_decoder_equal_each_window_alone(model):
    languages = ["en", "de", "ja", "en"]
    batch, options = chirp_mels(model, 4), DecodingOptions(fp16=False, sample_len=60)
    decoder = StaticDecoder(model, capacity=4, dtype=torch.float32, use_graphs=False)
    decoded = BatchDecodingTask(model, options, languages=languages, static_decoder=decoder).run(batch)
    for window, language, result in zip(batch, languages, decoded, strict=True):
        alone = whisper.decode(model, window, DecodingOptions(language=language, fp16=False, sample_len=60))
        assert (result.language, result.tokens) == (language, alone.tokens)


def random_histories(rows: int, length: int, tokenizer, rng: np.random.Generator) -> torch.Tensor:
    """Token histories mixing text, end of text and timestamps in every order the rules distinguish."""
    begin = tokenizer.timestamp_begin
    choices = rng.integers(0, 4, size=(rows, length))
    text = rng.integers(0, tokenizer.eot, size=(rows, length))
    stamps = begin + rng.integers(0, 1501, size=(rows, length))
    sampled = np.where(choices == 0, tokenizer.eot, np.where(choices == 1, text, stamps))
    initial = np.array(tokenizer.sot_sequence)[None].repeat(rows, 0)
    return torch.from_numpy(np.concatenate([initial, sampled], axis=1))


@pytest.mark.parametrize("length", [0, 1, 2, 3, 12])
@pytest.mark.parametrize("max_initial", [None, 50])
def test_batched_timestamp_rules_mask_exactly_what_the_package_masks(length, max_initial):
    tokenizer = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    rng = np.random.default_rng(length)
    sample_begin = len(tokenizer.sot_sequence)
    for trial in range(20):
        tokens = random_histories(32, length, tokenizer, rng)
        logits = torch.from_numpy(rng.standard_normal((32, 51865)).astype(np.float32))
        if trial % 2:  # timestamps likely overall: the "sum over timestamps beats any text token" rule fires
            logits[:, tokenizer.timestamp_begin :] += 3
        expected, batched = logits.clone(), logits.clone()
        ApplyTimestampRules(tokenizer, sample_begin, max_initial).apply(expected, tokens)
        BatchedTimestampRules(tokenizer, sample_begin, max_initial).apply(batched, tokens)
        assert torch.equal(expected, batched)
        assert torch.isinf(expected).any()  # the rules did mask something


def test_suppress_tokens_on_device_masks_what_the_package_masks():
    suppress = [220, 50257, 1, 50358, 1]
    logits = torch.randn(4, 51865)
    expected, on_device = logits.clone(), logits.clone()
    SuppressTokens(suppress).apply(expected, torch.zeros(4, 3, dtype=torch.long))
    SuppressTokensOnDevice(suppress, torch.device("cpu")).apply(on_device, torch.zeros(4, 3, dtype=torch.long))
    assert torch.equal(expected, on_device)
    assert torch.isinf(on_device[:, 220]).all()


def test_steps_are_captured_at_every_16_rows_past_16():
    assert captured_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert captured_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert captured_sizes(4) == [1, 2, 4]
    assert captured_sizes(1) == [1]


def test_a_cache_the_gpu_cannot_hold_is_refused_with_the_reason(monkeypatch):
    from whisper.model import ModelDimensions

    from services.whisper.static_decoder import _check_room

    large_v3 = ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * 2**30, 80 * 2**30))  # 30 GiB free
    _check_room(large_v3, 128, torch.float16, torch.device("cpu"))  # no GPU: nothing to check
    _check_room(large_v3, 64, torch.float16, torch.device("cuda"))  # 19 GiB, and 4.8 for a prefill
    with pytest.raises(RuntimeError, match=r"128 windows .* need 42.8 GiB and 30.0 GiB"):
        _check_room(large_v3, 128, torch.float16, torch.device("cuda"))
