"""Mail content on ``campaign.content`` (send.requests v4), shared by campaigns and steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from libs.common.mail.content import content_id as content_hash
from libs.common.topics import Topic
from services.scheduler import processor
from services.scheduler.context import Context


async def publish_content(ctx: Context, campaign: Mapping[str, Any], *, again: bool = False) -> str:
    """The campaign's content on ``campaign.content``, acknowledged, before any request naming
    it goes out (once per process and content: compaction keeps one copy; ``again``: once
    more, for a broker that may have lost it — services/scheduler/checkpoints.py); its id."""
    content = processor.content_of(campaign)
    content_id = content_hash(str(campaign["id"]), content)
    if again or content_id not in ctx.published_contents:
        value = {
            "content_id": content_id,
            "campaign_id": str(campaign["id"]),
            "content": content,
            "published_at": ctx.clock.now(),
        }
        await ctx.publisher.send_and_wait(Topic.CAMPAIGN_CONTENT, content_id, value)
        ctx.published_contents.add(content_id)
    return content_id
