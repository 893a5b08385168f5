"""What the console shows of a contact's fields: label and kind of each standard field (the
contacts API's F-05 vocabulary, as its reference at /docs describes it) and the closed
vocabularies with their Japanese labels."""

from __future__ import annotations

from libs.common.mail.states import ChangeMethod, DeliveryStatus, MembershipState

#: standard field → (label, kind); custom fields come from GET /v1/fields.
STANDARD: dict[str, tuple[str, str]] = {
    "email": ("メールアドレス", "text"),
    "external_id": ("顧客ID", "text"),
    "name": ("氏名", "text"),
    "name_kana": ("フリガナ", "text"),
    "company": ("会社名", "text"),
    "department": ("部署", "text"),
    "title": ("役職", "text"),
    "phone": ("電話番号", "text"),
    "address": ("住所", "text"),
    "website": ("ウェブサイト", "text"),
    "memo": ("メモ", "text"),
    "acquisition_channel": ("情報獲得経路", "text"),
    "acquired_at": ("情報獲得日", "date"),
    "sales_status": ("営業ステータス", "choice"),
    "engagement": ("エンゲージメント", "choice"),
    "star": ("スター", "boolean"),
    "tags": ("タグ", "tags"),
    "score": ("スコア", "number"),
    "delivery_status": ("配信ステータス", "choice"),
    "created_at": ("登録日", "timestamp"),
    "updated_at": ("更新日", "timestamp"),
    "id": ("ID", "number"),
}
OPS: dict[str, tuple[tuple[str, str], ...]] = {
    "text": (
        ("contains", "を含む"),
        ("eq", "と一致"),
        ("ne", "と一致しない"),
        ("starts_with", "で始まる"),
        ("empty", "が空"),
        ("not_empty", "が空でない"),
    ),
    "number": (
        ("eq", "="),
        ("ne", "≠"),
        ("gte", "≥"),
        ("lte", "≤"),
        ("gt", ">"),
        ("lt", "<"),
        ("empty", "が空"),
        ("not_empty", "が空でない"),
    ),
    "choice": (
        ("eq", "と一致"),
        ("ne", "と一致しない"),
        ("empty", "が空"),
        ("not_empty", "が空でない"),
    ),
    "boolean": (("eq", "と一致"), ("ne", "と一致しない")),
    "tags": (
        ("include_any", "いずれかを含む"),
        ("include_all", "すべてを含む"),
        ("exclude_any", "いずれも含まない"),
        ("exclude_all", "すべては含まない"),
        ("empty", "が空"),
        ("not_empty", "が空でない"),
    ),
}
OPS["date"] = OPS["timestamp"] = OPS["number"]
SORTS = ("id", "email", "name", "company", "score", "created_at", "updated_at")
SALES_STATUSES = {
    "open": "未対応",
    "replied": "返信済",
    "called": "電話済",
    "visited": "訪問済",
    "contracted": "契約済",
    "lost": "失注",
}
DELIVERY_STATUSES = DeliveryStatus.labels()
MEMBERSHIP_STATES = MembershipState.labels()
METHODS = ChangeMethod.labels()
HISTORY_EVENTS = {"received": "受信", "opened": "開封", "clicked": "クリック", "errored": "エラー"}
