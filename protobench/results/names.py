"""The one place names are made safe for MLflow keys and file names."""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from pathlib import Path

# MLflow accepts letters, digits, '_', '-', '.', ' ', ':' and '/' in metric, param and tag keys.
_DISALLOWED = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_key(name: str) -> str:
    """`name` with disallowed characters replaced; a short digest keeps distinct names distinct.

    'a+b' and 'a*b' would both become 'a_b'; appending a digest of the original makes them
    'a_b-1c2d3e' and 'a_b-9f8e7d' instead, while names that were already safe stay unchanged.
    """
    safe = _DISALLOWED.sub("_", name)
    if safe == name:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:6]
    return f"{safe}-{digest}"


def file_stem(name: str) -> str:
    """A name usable as a file stem on every platform."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite file `path`, with '%', '?' and '#' percent-encoded so
    that they stay part of the path instead of starting an escape, a query or a fragment.

    Only those three: MLflow also reads the URL's text as a path (to create its folder), so
    encoding spaces or letters such as 'ü' would make it create a sibling folder of that name.
    """
    text = str(Path(path).resolve())
    for char in "%?#":
        text = text.replace(char, urllib.parse.quote(char))
    return "sqlite:///" + text


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///` URL (percent-escapes decoded), None for other URLs."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)
