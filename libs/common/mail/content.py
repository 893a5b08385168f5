"""A campaign's mail content sent once, not in every send request (send.requests v4).

The scheduler publishes each distinct content of a campaign once on the compacted
``campaign.content`` topic, keyed by its :func:`content_id`, and each send request names that
id instead of carrying the ~5 KB of templates. The id is a hash of the campaign id and the
content itself, so an id can only ever stand for one content: the sender recomputes it for
every content record it stores and refuses a record whose id does not match, and a request
can therefore never be rendered with another content than the one it was released with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

#: MailContent fields, in schema order (what the id covers).
FIELDS = (
    "from_address",
    "from_name",
    "reply_to",
    "subject",
    "format",
    "body",
    "coupon_url",
    "track_opens",
    "track_clicks",
)
#: defaults of the optional MailContent fields (as the Avro schema fills them in).
DEFAULTS: dict[str, Any] = {
    "from_name": None,
    "reply_to": None,
    "coupon_url": None,
    "track_opens": True,
    "track_clicks": True,
}
#: the ``content`` of a request that names its content by id: required fields empty.
BY_REFERENCE: dict[str, Any] = {"from_address": "", "subject": "", "format": "", "body": ""}


def content_id(campaign_id: str, content: Mapping[str, Any]) -> str:
    """``c1-`` + 32 hex digits of SHA-256 over the campaign id and the content's fields."""
    canonical = [str(campaign_id)] + [content.get(name, DEFAULTS.get(name)) for name in FIELDS]
    digest = hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode("utf-8"))
    return "c1-" + digest.hexdigest()[:32]
