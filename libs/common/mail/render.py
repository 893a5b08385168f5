"""A campaign's message as one object: its :class:`~libs.common.mail.template.CampaignTemplate`
with :meth:`CampaignMessage.render`, the pipeline's stages 3–7
(:func:`libs.common.mail.compose.personalise`) for given values and headers.

Kept for callers that hold a template and values of their own (tests, the benchmark's sample
message); services compose through :mod:`libs.common.mail.compose`.
"""

from __future__ import annotations

from collections.abc import Mapping

from libs.common.mail.compose import personalise
from libs.common.mail.mime import fold_unstructured
from libs.common.mail.template import CampaignTemplate, Format
from libs.common.mail.textpart import html_to_text, text_template_from_html


class CampaignMessage(CampaignTemplate):
    """A :class:`CampaignTemplate` that renders itself."""

    def render(
        self,
        values: Mapping[str, str],
        *,
        to: str,
        message_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        contact_id: str | int | None = None,
        step_id: str | None = None,
    ) -> bytes:
        """The complete RFC 5322 message for one recipient, CRLF line endings
        (:func:`~libs.common.mail.compose.personalise`)."""
        return personalise(
            self,
            values,
            to=to,
            message_id=message_id,
            headers=headers,
            contact_id=contact_id,
            step_id=step_id,
        )


__all__ = [
    "CampaignMessage",
    "Format",
    "fold_unstructured",
    "html_to_text",
    "text_template_from_html",
]
