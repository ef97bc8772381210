"""Whether the model hub can be reached, found out in seconds instead of minutes of retries.

Without ``HF_HUB_OFFLINE=1`` a ``from_pretrained`` on a machine without internet retries every file for minutes
before it fails. ``local_only()`` is True when the hub is off (``HF_HUB_OFFLINE``) or unreachable: one TCP connect to
the hub's host with a 3-second timeout, once per process. Then loaders read the local cache only, and a model that is
not there is a one-line error at once. Behind a proxy (``HTTPS_PROXY`` / ``ALL_PROXY``) the probe is skipped: the
proxy decides.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


def offline_by_choice() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always comes with diffusers/transformers
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.lru_cache(maxsize=None)
def unreachable_reason() -> str | None:
    """Why the hub cannot be reached (e.g. 'no network: name resolution failed'), or None if it answered."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except socket.gaierror:
        return f"{host} cannot be resolved (no network?)"
    except OSError as exc:  # refused, unreachable, timed out
        return f"{host}:{port} cannot be reached ({exc.__class__.__name__})"
    return None


def local_only() -> bool:
    """True when loaders must use the local cache only: the hub is off by choice, or unreachable (said once)."""
    if offline_by_choice():
        return True
    reason = unreachable_reason()
    if reason is not None and not getattr(local_only, "_said", False):
        local_only._said = True  # type: ignore[attr-defined]
        log.warning("the model hub is unreachable (%s): using the local cache only", reason)
    return reason is not None
