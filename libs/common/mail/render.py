"""A campaign's message as one object: its :class:`~libs.common.mail.template.CampaignTemplate`
with :meth:`CampaignMessage.render`, the pipeline's stages 3–7
(:func:`libs.common.mail.compose.personalise`) for given values and headers.

Kept for callers that hold a template and values of their own (tests, the benchmark's sample
message); services compose through :mod:`libs.common.mail.compose`.
"""

from __future__ import annotations

from libs.common.mail.compose import personalise
from libs.common.mail.mime import fold_unstructured
from libs.common.mail.template import CampaignTemplate, Format
from libs.common.mail.textpart import html_to_text, text_template_from_html


class CampaignMessage(CampaignTemplate):
    """A :class:`CampaignTemplate` that renders itself: ``render(values, *, to, message_id,
    headers, contact_id, step_id)`` is :func:`~libs.common.mail.compose.personalise` — the
    complete RFC 5322 message for one recipient, CRLF line endings."""

    render = personalise


__all__ = [
    "CampaignMessage",
    "Format",
    "fold_unstructured",
    "html_to_text",
    "text_template_from_html",
]
