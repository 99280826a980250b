"""The Redis component's redis.conf, run by a real redis-server and used by the product's own cache client.

The server gets the generated file with only the address changed (loopback, a free port, a
temporary dir) plus a test-only admin user to read the configuration back: the cache works
through the restricted default user, the probe's PING works, scripting and administration
are refused, and eviction is LRU under the memory cap.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis as redis_client

from services.clip.cache import RedisCache
from services.common import metrics
from tests.conftest import free_port, start, wait_until
from tests.deploy.manifests import named, rendered
from tests.helpers import metric_value

pytestmark = pytest.mark.integration


@pytest.fixture
def generated_redis(tmp_path: Path):
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed; `make test` installs it")
    conf = named(rendered("overlays/redis"), "ConfigMap", "redis-config")["data"]["redis.conf"]
    port = free_port()
    local = (
        conf.replace("bind * -::*", "bind 127.0.0.1")
        .replace("port 6379", f"port {port}")
        .replace("dir /data", f"dir {tmp_path}")
    )
    assert local.count(str(port)) == 1 and "127.0.0.1" in local
    (tmp_path / "redis.conf").write_text(local)
    admin = ["--user", "admin", "on", "nopass", "~*", "&*", "+@all"]
    process = start([executable, str(tmp_path / "redis.conf"), *admin], tmp_path / "redis.log")
    client = redis_client.Redis(port=port, socket_timeout=5)
    wait_until(lambda: client.ping(), process, "redis-server", timeout=30)
    yield port
    process.stop()


def test_cache_works_through_the_restricted_user_and_nothing_else_does(generated_redis: int):
    port = generated_redis
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", timeout_seconds=2, retry_after_seconds=0)
    errors_before = metric_value(metrics_text(), "clip_cache_errors_total")
    vectors = {"a": np.arange(4, dtype=np.float32), "b": np.ones(3, dtype=np.float32)}

    async def round_trip():
        await cache.set_many(vectors, ttl_seconds=60)
        return await cache.get_many(["a", "b", "missing"])

    a, b, missing = asyncio.run(round_trip())
    np.testing.assert_array_equal(a, vectors["a"])
    np.testing.assert_array_equal(b, vectors["b"])
    assert missing is None
    assert metric_value(metrics_text(), "clip_cache_errors_total") == errors_before  # no failure hidden as a miss

    probe = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, timeout=10)
    assert probe.stdout.strip() == "PONG"  # the readiness probe's command

    default = redis_client.Redis(port=port, socket_timeout=5)
    for command in (("EVAL", "return 1", "0"), ("CONFIG", "SET", "maxmemory", "0"), ("FLUSHALL",), ("KEYS", "*")):
        with pytest.raises(redis_client.exceptions.NoPermissionError):
            default.execute_command(*command)

    admin = redis_client.Redis(port=port, username="admin", password="unused", socket_timeout=5)
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert int(admin.config_get("maxmemory")["maxmemory"]) == 2048 * 2**20
    assert admin.config_get("save") == {"save": ""} and admin.config_get("appendonly") == {"appendonly": "no"}


def metrics_text() -> str:
    from prometheus_client import REGISTRY, generate_latest

    metrics.CACHE_ERRORS.labels("redis")  # the series exists, at 0, before any error
    return generate_latest(REGISTRY).decode()
