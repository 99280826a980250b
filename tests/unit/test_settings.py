"""Settings: prefixed environment variables, the original design's names, the README table."""

from __future__ import annotations

from pathlib import Path

from configuration.profiles import model_spec
from configuration.settings import Settings, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_follow_the_original_design():
    settings = Settings()
    assert settings.clip_max_batch_size == 64
    assert settings.max_concurrent_requests == 100
    assert settings.cache_ttl_seconds == 3600
    assert settings.query_cache_ttl_seconds == 86_400


def test_original_names_work_and_prefixed_names_win(monkeypatch):
    monkeypatch.setenv("BATCH_SIZE", "16")
    monkeypatch.setenv("CACHE_TTL_SECONDS", "120")
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "7")
    monkeypatch.setenv("MODEL_NAME", "openai/clip-vit-base-patch32")
    settings = Settings(profile="production")
    assert (settings.clip_max_batch_size, settings.cache_ttl_seconds, settings.max_concurrent_requests) == (16, 120, 7)
    assert model_spec("clip", settings).source == "openai/clip-vit-base-patch32"
    assert model_spec("clip", settings).tag == "clip-vit-base-patch32"
    monkeypatch.setenv("MULTIMODAL_CLIP_MAX_BATCH_SIZE", "32")
    assert Settings().clip_max_batch_size == 32


def test_tiny_profile_ignores_the_production_model_name(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "openai/clip-vit-base-patch32")
    assert model_spec("clip", Settings(profile="tiny")).tag == "tiny-clip"


def test_redis_url_selects_the_redis_cache(monkeypatch):
    monkeypatch.setenv("MULTIMODAL_REDIS_URL", "redis://cache:6379/0")
    assert Settings().effective_cache_backend == "redis"


def test_readme_lists_every_setting():
    assert settings_table() in README.read_text(), "regenerate the table: python -m configuration.settings"
