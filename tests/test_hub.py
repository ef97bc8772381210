"""Without internet and without HF_HUB_OFFLINE, a hub id fails in seconds with one line (no retry storm)."""

from __future__ import annotations

import socket

import pytest

from magicstudio import hub
from magicstudio.errors import UserError


@pytest.fixture
def online_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    hub.unreachable_reason.cache_clear()
    monkeypatch.setattr(hub.local_only, "_said", False, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    hub.unreachable_reason.cache_clear()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_probe_tells_a_dead_endpoint_from_a_live_one(online_env):
    online_env.setattr(hub, "_endpoint", lambda: f"http://127.0.0.1:{_closed_port()}")
    assert hub.unreachable_reason() is not None and hub.local_only()
    hub.unreachable_reason.cache_clear()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        online_env.setattr(hub, "_endpoint", lambda: f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.unreachable_reason() is None and not hub.local_only()


def test_offline_by_choice_needs_no_probe(online_env):
    online_env.setenv("HF_HUB_OFFLINE", "1")
    online_env.setattr(hub, "unreachable_reason", lambda: pytest.fail("probed although offline"))
    assert hub.local_only()


def test_unreachable_hub_loads_from_the_cache_only(online_env):
    """The loaders are told local_files_only=True, so a model missing from the cache is one line at once."""
    from transformers import CLIPTokenizer

    from magicstudio.models.base import load_base

    online_env.setattr(hub, "_endpoint", lambda: f"http://127.0.0.1:{_closed_port()}")
    seen = {}

    def spy(ref, **kw):
        seen.update(kw)
        raise OSError("not in the cache")

    online_env.setattr(CLIPTokenizer, "from_pretrained", spy)
    with pytest.raises(UserError, match="org/model"):
        load_base("org/model")
    assert seen.get("local_files_only") is True
