"""The shared vocabulary of delivery states: one ``str`` Enum each, with its Japanese label.

Several services speak these values (in PostgreSQL, on Kafka and in the API), so they are
declared once here. The members are ``str``: they compare equal to the plain strings read
from a database row or a decoded record, and the values are exactly the strings on the wire.
SQL cannot import them: ``tests/unit/test_states.py`` reads every CHECK constraint and
literal list in the migrations and queries that spell these values and checks they match.
"""

from __future__ import annotations

from enum import StrEnum


class _Labelled(StrEnum):
    """A ``str`` Enum whose members carry the label the seed products show."""

    label: str

    def __new__(cls, value: str, label: str) -> _Labelled:
        member = str.__new__(cls, value)
        member._value_ = value
        member.label = label
        return member

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every value as a plain ``str``, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def labels(cls) -> dict[str, str]:
        """value → label, in declaration order (the closed vocabularies of the API)."""
        return {member.value: member.label for member in cls}


class MembershipState(_Labelled):
    """配信状態 of a membership (of a contact in a group or step plan, F-10)."""

    DELIVERABLE = "deliverable", "配信可能"
    UNSUBSCRIBED = "unsubscribed", "配信停止"
    BANNED = "banned", "配信禁止"


class ChangeMethod(_Labelled):
    """配信停止方法: how a membership's state was last changed (suppression's ``method``)."""

    FORM = "form", "フォーム"
    SYSTEM = "system", "システム"
    AUTO_SYNC = "auto_sync", "自動同期"
    AUTO_STOP = "auto_stop", "自動停止"
    UPSTREAM = "upstream", "外部連携"


#: Not a state a membership is in: a ``suppression.changes`` membership record with this
#: state says the membership was removed (the contact left the group). Copies of the
#: changes (contacts, the sender) keep it so an older change cannot come back.
LEFT = "left"
#: The states a membership record of ``suppression.changes`` carries.
MEMBERSHIP_CHANGE_STATES = (*MembershipState.values(), LEFT)


class DeliveryStatus(_Labelled):
    """配信ステータス of a contact (SATORI), kept current by the bounce processor (F-32)."""

    UNCONFIRMED = "unconfirmed", "未確認"
    OK = "ok", "正常"
    INVALID_ADDRESS = "invalid_address", "アドレス不正"
    ERROR = "error", "エラー"
    TEMPORARY_ERROR = "temporary_error", "一時エラー"
    SPAM = "spam", "スパム"
    #: stopped after ``BOUNCE_SOFT_THRESHOLD`` soft bounces in a row (the address is
    #: suppressed as bounced, like a hard bounce, until an operator clears it).
    BOUNCED = "bounced", "バウンス"
