"""Who a request was for: the client's end user, its tags and its metadata, stored on the
usage record so that spend can be broken down by them (``GET /v1/usage?group_by=``).

Sources: ``user`` (OpenAI Chat and Responses; ``safety_identifier`` first),
``metadata.user_id`` (Anthropic), ``metadata`` (OpenAI, at most 16 pairs, checked by the
protocols) and the ``x-mesh-tags`` header (comma-separated). Sizes are bounded: an end
user is cut to :data:`MAX_USER` characters; tags are refused (400) past their limits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import InvalidRequest

MAX_USER = 256
MAX_TAGS = 10
MAX_TAG = 64
TAGS_HEADER = "x-mesh-tags"
_TAG = re.compile(r"[A-Za-z0-9_.:/=+@-]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Attribution:
    end_user: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] | None = None


def parse_tags(header: str | None) -> tuple[str, ...]:
    """The tags of an ``x-mesh-tags`` header, in order, without duplicates."""
    if header is None or not header.strip():
        return ()
    tags = tuple(dict.fromkeys(t.strip() for t in header.split(",") if t.strip()))
    if len(tags) > MAX_TAGS:
        raise InvalidRequest(f"{TAGS_HEADER} holds at most {MAX_TAGS} tags", param=TAGS_HEADER)
    for tag in tags:
        if len(tag) > MAX_TAG or not _TAG.fullmatch(tag):
            raise InvalidRequest(
                f"each tag in {TAGS_HEADER} is 1 to {MAX_TAG} characters of letters, digits and _.:/=+@-",
                param=TAGS_HEADER,
            )
    return tags


def storable(text: str) -> str:
    """``text`` without what a database cannot store: NUL (PostgreSQL's text refuses it) and
    lone surrogates (not UTF-8). Unfiltered, one such ``user`` failed admission on a capped key
    and, on any key, the usage writer's batch, which it then retried forever."""
    if "\x00" not in text and (text.isascii() or not _SURROGATE.search(text)):  # isascii: O(1)
        return text
    return _SURROGATE.sub("", text.replace("\x00", ""))


def end_user_of(user: str | None) -> str | None:
    """The end user a request names (``user``), as the usage record and a key's
    user_budget count it: storable, stripped, at most :data:`MAX_USER` characters."""
    if not user:
        return None
    return storable(user).strip()[:MAX_USER] or None


# Frozen: one shared for the requests that name nobody and carry nothing (most of them).
_NOBODY = Attribution()


def attribution(end_user: str | None, metadata: Mapping[str, str] | None, tags: tuple[str, ...]) -> Attribution:
    if not end_user and not metadata and not tags:
        return _NOBODY
    meta = {storable(k): storable(v) for k, v in metadata.items()} if metadata else None
    return Attribution(end_user_of(end_user), tags, meta)
