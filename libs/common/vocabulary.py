"""The closed vocabularies of a contact's fields (F-01) with the seed products' labels.

The contacts service validates and stores the codes; the console shows the labels. Both
import them from here, so a new status is added once (and the console cannot offer a code
the API refuses).
"""

from __future__ import annotations

#: 営業ステータス: code → label.
SALES_STATUSES: dict[str, str] = {
    "open": "未対応",
    "replied": "返信済",
    "called": "電話済",
    "visited": "訪問済",
    "contracted": "契約済",
    "lost": "失注",
}
#: エンゲージメント: code → label.
ENGAGEMENTS: dict[str, str] = {"hot": "ホット", "active": "アクティブ", "inactive": "非アクティブ"}
