"""Secrets a config may hold, kept out of everything a run writes (its config copy, logs, saved arguments).

A secret is the value of a key whose name says so (api_key, hub_token, any *_token, *_password, *_secret) and
the password of a URL's user part (https://user:password@host). Redacted values read REDACTED.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
# Key names that end in one of these words (transformers masks keys ending in _token the same way).
_SECRET_KEY = re.compile(r"(^|_)(api_?key|token|password|passwd|secret)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_url(text: str) -> str:
    """The URL with the password of its user part replaced (text that is no such URL comes back unchanged)."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or parts.password is None:
        return text
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a JSON-like value with every secret replaced; the input is not changed."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if value and is_secret_key(key):
            return REDACTED
        return redact_url(value)
    return value


def redacted_json(data: dict[str, Any]) -> str:
    return json.dumps(redact(data), indent=2) + "\n"
