"""What an SMTP reply means for one message (pure; the sender uses it).

A reply is read per stage of one SMTP transaction (``mail``, ``rcpt``, ``data`` for the 354
before the content, ``end`` for the reply to the end of data):

- 2xx (and 354 at ``data``): go on / accepted.
- 421 anywhere, or the connection lost: the **relay** has a problem (it is closing the
  channel), not the message: reconnect or fail over and send the message again.
- other 4xx: a temporary refusal of this message: retry it later, a bounded number of times,
  then report ``temporary_error``.
- 5xx that :mod:`libs.common.mail.bounce_class` classifies as ``policy`` (an enhanced code in
  class 5.7, security or policy, RFC 3463; or policy wording without a code):
  ``policy_error``.
- other 5xx: ``permanent_error``.

The enhanced status code (RFC 3463 ``class.subject.detail``) is read from the start of the
reply text when present (``550 5.1.1 <a@b>: user unknown``). What a failure means for the
recipient (hard, soft, policy) is :mod:`libs.common.mail.bounce_class`'s decision, shared with
the bounce processor's reading of DSNs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from libs.common import checks
from libs.common.mail import bounce_class
from libs.common.mail.bounce_class import leading_enhanced_code

Verdict = Literal[
    "ok", "relay_problem", "retry", "temporary_error", "permanent_error", "policy_error"
]

DIAGNOSTIC_LIMIT = 500


@dataclass(frozen=True)
class Reply:
    """One SMTP reply, classified."""

    code: int
    text: str
    verdict: Verdict
    enhanced_code: str | None

    @property
    def diagnostic(self) -> str:
        """``"550 5.1.1 user unknown"`` on one line, bounded (it travels in results), with
        no control character: a relay's NUL would make PostgreSQL refuse the whole group
        commit of outcomes it is recorded with."""
        one_line = " ".join(checks.CONTROL.sub(" ", self.text).split())
        return f"{self.code} {one_line}"[:DIAGNOSTIC_LIMIT]


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 code at the start of a reply text (``"5.1.1"``), if any."""
    return leading_enhanced_code(text)


def classify(code: int, text: str, *, final: bool = False) -> Reply:
    """Classify one reply. ``final`` = after a bounded number of retries: a 4xx is then
    reported as ``temporary_error`` instead of ``retry``."""
    enhanced = enhanced_code(text)
    if 200 <= code < 400:
        verdict: Verdict = "ok"
    elif code == 421:
        verdict = "relay_problem"
    elif 400 <= code < 500:
        verdict = "temporary_error" if final else "retry"
    elif 500 <= code < 600:
        meaning = bounce_class.classify(enhanced=enhanced, reply_code=code, text=text)
        verdict = "policy_error" if meaning == "policy" else "permanent_error"
    else:  # not an SMTP reply code: the relay is confused, not the message
        verdict = "relay_problem"
    return Reply(code, text, verdict, enhanced)


def outcome_of(reply: Reply) -> str:
    """The ``delivery.results`` outcome of a final reply."""
    if reply.verdict == "ok":
        return "sent"
    if reply.verdict in ("retry", "temporary_error", "relay_problem"):
        return "temporary_error"
    return reply.verdict
