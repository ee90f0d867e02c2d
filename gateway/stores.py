"""The configured store: shared Redis when a URL is set, else the local directory.

One place builds it, with the retention settings, for the server, the CLI and the demo.
"""

from __future__ import annotations

from intents.redis_store import RedisStore
from intents.store import LocalStore, Store

from .settings import Settings


def open_store(settings: Settings, store_dir: str | None = None) -> Store:
    """Redis when ``settings.redis_url`` is set, unless ``store_dir`` forces a local store;
    either keeps the newest ``cache_versions_kept`` versions after each publish."""
    kept = {"keep_versions": settings.cache_versions_kept,
            "audio_grace_s": settings.cache_audio_grace_s}
    if settings.redis_url and store_dir is None:
        return RedisStore(settings.redis_url, prefix=settings.redis_prefix, **kept)
    return LocalStore(store_dir or settings.store_dir, **kept)
