"""The contact record's fields, their kinds, and the closed vocabularies (F-01, F-02)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The free-text columns of the contact table are one list with the merge-tag fields.
from libs.common.mail.mergetags import TEXT_FIELDS
from libs.common.mail.states import DeliveryStatus, MembershipState
from libs.common.vocabulary import ENGAGEMENTS, SALES_STATUSES

#: 配信ステータス (SATORI), kept current by the bounce processor: code → label.
DELIVERY_STATUSES = DeliveryStatus.labels()
#: 配信状態 of a membership (F-10): code → label.
MEMBERSHIP_STATES = MembershipState.labels()

#: Every standard field and its kind, as search, import and export see them.
FIELD_KINDS: dict[str, str] = {
    "id": "number",
    "email": "text",
    "external_id": "text",
    **{name: "text" for name in TEXT_FIELDS},
    "acquired_at": "date",
    "sales_status": "choice",
    "engagement": "choice",
    "star": "boolean",
    "tags": "tags",
    "score": "number",
    "delivery_status": "choice",
    "created_at": "timestamp",
    "updated_at": "timestamp",
}

CHOICES: dict[str, dict[str, str]] = {
    "sales_status": SALES_STATUSES,
    "engagement": ENGAGEMENTS,
    "delivery_status": DELIVERY_STATUSES,
}

#: Fields a client may write (the rest are kept by the system).
WRITABLE = (
    "email",
    "external_id",
    *TEXT_FIELDS,
    "acquired_at",
    "sales_status",
    "engagement",
    "star",
    "tags",
)

#: Japanese column headings accepted by CSV import as aliases of field names.
JAPANESE_ALIASES = {
    "メールアドレス": "email",
    "Eメール": "email",
    "顧客ID": "external_id",
    "Synergy!ID": "external_id",
    "氏名": "name",
    "名前": "name",
    "フリガナ": "name_kana",
    "氏名（カナ）": "name_kana",
    "会社名": "company",
    "部署": "department",
    "部署名": "department",
    "役職": "title",
    "電話番号": "phone",
    "住所": "address",
    "ウェブサイト": "website",
    "URL": "website",
    "メモ": "memo",
    "情報獲得日": "acquired_at",
    "情報獲得経路": "acquisition_channel",
    "営業ステータス": "sales_status",
    "エンゲージメント": "engagement",
    "スター": "star",
    "タグ": "tags",
}

CUSTOM_TYPES = ("text", "number", "date", "boolean", "choice")


@dataclass(frozen=True)
class FieldDefinition:
    """A custom field (カスタム項目): values are validated against ``type``."""

    key: str
    label: str
    type: str
    choices: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "type": self.type,
            "choices": list(self.choices),
        }
