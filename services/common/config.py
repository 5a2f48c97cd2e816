"""One settings object for every service, read from the environment (and optionally a file).

Code deep in the request path never reads os.environ: it receives a `Settings`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):[^@/\s]*@")


def redact_url(text: str | None) -> str:
    """`text` with every URL password replaced by ***: redis://:pw@host -> redis://:***@host."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text or "")


def install_url_redaction() -> None:
    """Redact URL passwords in every log record made from now on (message and string args),
    whichever logger or handler writes it. Idempotent; called by `Settings.from_env`."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts_urls", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if isinstance(record.msg, str) and "@" in record.msg:
            record.msg = redact_url(record.msg)
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact_url(a) if isinstance(a, str) and "@" in a else a
                                for a in record.args)
        return record

    factory.redacts_urls = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


@dataclass(frozen=True)
class Settings:
    """Deployment configuration. Field names mirror the documented environment variables."""

    # Secrets stay out of repr() (and so out of logs and tracebacks).
    redis_url: str | None = field(default=None, repr=False)  # REDIS_URL; None -> in-process
    redis_prefix: str = "cascade:"  # CASCADE_REDIS_PREFIX
    bundle: str | None = None  # CASCADE_BUNDLE: a version dir or a BUNDLES root
    data: str | None = None  # CASCADE_DATA: a marketplace dir to fill the in-process store
    api_key: str | None = field(default=None, repr=False)  # CASCADE_API_KEY
    admin_key: str | None = field(default=None, repr=False)  # CASCADE_ADMIN_KEY
    auth: bool = True  # CASCADE_AUTH=off disables keys (demo only)
    token_secret: str | None = field(default=None, repr=False)  # CASCADE_TOKEN_SECRET
    internal_key: str | None = field(default=None, repr=False)  # CASCADE_INTERNAL_KEY
    retrieval_url: str | None = None  # CASCADE_RETRIEVAL_URL; None -> in-process
    prerank_url: str | None = None  # CASCADE_PRERANK_URL
    rank_url: str | None = None  # CASCADE_RANK_URL
    budget_ms: float = 50.0  # CASCADE_BUDGET_MS: default request budget
    torch_threads: int = 1  # CASCADE_TORCH_THREADS
    faiss_threads: int = 1  # CASCADE_FAISS_THREADS
    export_dir: str = "exports"  # CASCADE_EXPORT_DIR: /admin/export writes only under it
    event_shards: int = 0  # CASCADE_EVENT_SHARDS: event streams; 0 -> 1 single, 8 on a cluster
    catalog_poll_s: float = 1.0  # CASCADE_CATALOG_POLL_S: stages' catch-up poll (0: off)
    extra: dict[str, Any] = field(default_factory=dict)  # file-only settings for stages

    @classmethod
    def from_env(cls, file: str | Path | None = None, **overrides: Any) -> Settings:
        """Environment first, then a JSON settings file (CASCADE_CONFIG), then overrides."""
        install_url_redaction()
        base: dict[str, Any] = {}
        path = file or _env("CASCADE_CONFIG")
        if path:
            base = json.loads(Path(path).read_text())
            known = {f.name for f in fields(cls)}
            unknown = set(base) - known
            if unknown:
                raise ValueError(f"settings file {path}: unknown keys {sorted(unknown)}")
        auth = (_env("CASCADE_AUTH", "on") or "on").lower() not in ("off", "0", "false", "no")
        env = {
            "redis_url": _env("REDIS_URL"),
            "redis_prefix": _env("CASCADE_REDIS_PREFIX", "cascade:"),
            "bundle": _env("CASCADE_BUNDLE"),
            "data": _env("CASCADE_DATA"),
            "api_key": _env("CASCADE_API_KEY"),
            "admin_key": _env("CASCADE_ADMIN_KEY"),
            "auth": auth,
            "token_secret": _env("CASCADE_TOKEN_SECRET"),
            "internal_key": _env("CASCADE_INTERNAL_KEY"),
            "retrieval_url": _env("CASCADE_RETRIEVAL_URL"),
            "prerank_url": _env("CASCADE_PRERANK_URL"),
            "rank_url": _env("CASCADE_RANK_URL"),
            "budget_ms": float(_env("CASCADE_BUDGET_MS", "50") or 50),
            "torch_threads": int(_env("CASCADE_TORCH_THREADS", "1") or 1),
            "faiss_threads": int(_env("CASCADE_FAISS_THREADS", "1") or 1),
            "export_dir": _env("CASCADE_EXPORT_DIR"),
            "event_shards": int(_env("CASCADE_EVENT_SHARDS", "0") or 0),
            "catalog_poll_s": float(_env("CASCADE_CATALOG_POLL_S", "1") or 1),
        }
        merged = {**base, **{k: v for k, v in env.items() if v is not None}}
        merged.update(overrides)
        return cls(**merged)

    @property
    def redis_url_safe(self) -> str:
        """REDIS_URL for messages: the password replaced by ***."""
        return redact_url(self.redis_url)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
