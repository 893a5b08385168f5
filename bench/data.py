"""Realistic, reproducible contact data for the benchmarks, generated as a stream.

:func:`profiles` yields the same contacts for the same seed, so the service's input (Avro
events) and the ceiling's input (COPY rows) are the very same values. Nothing is kept in
memory beyond the chunk being written.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

# (kanji, kana, romaji)
SURNAMES = [
    ("佐藤", "サトウ", "sato"),
    ("鈴木", "スズキ", "suzuki"),
    ("高橋", "タカハシ", "takahashi"),
    ("田中", "タナカ", "tanaka"),
    ("伊藤", "イトウ", "ito"),
    ("渡辺", "ワタナベ", "watanabe"),
    ("山本", "ヤマモト", "yamamoto"),
    ("中村", "ナカムラ", "nakamura"),
    ("小林", "コバヤシ", "kobayashi"),
    ("加藤", "カトウ", "kato"),
    ("吉田", "ヨシダ", "yoshida"),
    ("山田", "ヤマダ", "yamada"),
    ("佐々木", "ササキ", "sasaki"),
    ("山口", "ヤマグチ", "yamaguchi"),
    ("松本", "マツモト", "matsumoto"),
    ("井上", "イノウエ", "inoue"),
    ("木村", "キムラ", "kimura"),
    ("林", "ハヤシ", "hayashi"),
    ("斎藤", "サイトウ", "saito"),
    ("清水", "シミズ", "shimizu"),
    ("山崎", "ヤマザキ", "yamazaki"),
    ("森", "モリ", "mori"),
    ("池田", "イケダ", "ikeda"),
    ("橋本", "ハシモト", "hashimoto"),
    ("阿部", "アベ", "abe"),
    ("石川", "イシカワ", "ishikawa"),
    ("山下", "ヤマシタ", "yamashita"),
    ("中島", "ナカジマ", "nakajima"),
    ("石井", "イシイ", "ishii"),
    ("小川", "オガワ", "ogawa"),
    ("前田", "マエダ", "maeda"),
    ("岡田", "オカダ", "okada"),
]
GIVEN_NAMES = [
    ("太郎", "タロウ", "taro"),
    ("花子", "ハナコ", "hanako"),
    ("一郎", "イチロウ", "ichiro"),
    ("美咲", "ミサキ", "misaki"),
    ("健", "ケン", "ken"),
    ("翔太", "ショウタ", "shota"),
    ("陽菜", "ヒナ", "hina"),
    ("大輔", "ダイスケ", "daisuke"),
    ("結衣", "ユイ", "yui"),
    ("拓也", "タクヤ", "takuya"),
    ("さくら", "サクラ", "sakura"),
    ("直樹", "ナオキ", "naoki"),
    ("愛", "アイ", "ai"),
    ("誠", "マコト", "makoto"),
    ("優子", "ユウコ", "yuko"),
    ("蓮", "レン", "ren"),
    ("葵", "アオイ", "aoi"),
    ("浩二", "コウジ", "koji"),
    ("真由美", "マユミ", "mayumi"),
    ("悠人", "ユウト", "yuto"),
]
COMPANY_STEMS = [
    "さくら",
    "あおば",
    "ひかり",
    "みらい",
    "やまと",
    "東洋",
    "日本",
    "中央",
    "北辰",
    "富士",
    "大和",
    "新星",
    "朝日",
    "昭和",
    "平成",
    "令和",
    "東京",
    "関西",
    "九州",
    "北海",
]
COMPANY_KINDS = [
    "商事",
    "物産",
    "工業",
    "製作所",
    "システムズ",
    "ソリューションズ",
    "食品",
    "不動産",
    "建設",
    "電機",
]
DEPARTMENTS = [
    "営業部",
    "マーケティング部",
    "総務部",
    "情報システム部",
    "経営企画室",
    "開発部",
    "人事部",
    None,
]
TITLES = ["部長", "課長", "係長", "主任", "担当", "代表取締役", None, None]
PREFECTURES = [
    "東京都千代田区",
    "東京都港区",
    "大阪府大阪市北区",
    "神奈川県横浜市西区",
    "愛知県名古屋市中区",
    "福岡県福岡市博多区",
    "北海道札幌市中央区",
    "京都府京都市下京区",
]
CHANNELS = ["展示会", "ウェブ問い合わせ", "資料請求", "セミナー", "紹介", "広告"]
SALES_STATUSES = ["open", "open", "open", "replied", "called", "visited", "contracted", "lost"]
ENGAGEMENTS = ["hot", "active", "inactive", None]
DOMAINS = ["example.co.jp", "example.jp", "mail.example.ne.jp", "example.com", "corp.example.jp"]
TAG_TOPICS = [
    "展示会2026",
    "資料請求",
    "セミナー参加",
    "メルマガ",
    "見込み客",
    "既存顧客",
    "vip",
    "休眠",
    "ウェビナー",
    "キャンペーン",
    "新製品",
    "アンケート回答",
    "代理店",
    "パートナー",
    "トライアル",
    "解約検討",
    "アップセル",
    "問い合わせ",
    "東日本",
    "西日本",
    "製造業",
    "小売業",
    "IT",
    "金融",
    "医療",
]
#: ~50 tags; tag k is drawn with weight 1/(k+1)^0.5 (a few popular tags, a long tail).
TAGS = [f"{topic}{suffix}" for suffix in ("", "-B") for topic in TAG_TOPICS]
_TAG_CUM = list(itertools.accumulate(1 / (k + 1) ** 0.5 for k in range(len(TAGS))))
PLANS = ["free", "standard", "premium"]
_PLAN_CUM = [0.5, 0.8, 1.0]
#: the two custom fields every benchmark defines first: (key, label, type, choices).
CUSTOM_FIELDS = [("plan", "プラン", "choice", PLANS), ("birthday", "誕生日", "date", [])]
TODAY = dt.date(2026, 11, 23)


def profiles(n: int, seed: int = 7, start: int = 0) -> Iterator[dict[str, Any]]:
    """Contacts ``start`` .. ``start + n - 1``: the same values for the same seed."""
    rng = random.Random(seed)
    for i in range(start, start + n):
        surname = SURNAMES[rng.randrange(len(SURNAMES))]
        given = GIVEN_NAMES[rng.randrange(len(GIVEN_NAMES))]
        first = rng.choices(TAGS, cum_weights=_TAG_CUM)[0]
        second = first
        while second == first:
            second = rng.choices(TAGS, cum_weights=_TAG_CUM)[0]
        plan = rng.choices(PLANS, cum_weights=_PLAN_CUM)[0]
        birthday = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(20000))
        yield {
            "i": i,
            "email": f"{given[2]}.{surname[2]}.{i}@{DOMAINS[i % len(DOMAINS)]}",
            "external_id": f"SYN-{i:08d}",
            "name": f"{surname[0]} {given[0]}",
            "name_kana": f"{surname[1]} {given[1]}",
            "company": f"株式会社{rng.choice(COMPANY_STEMS)}{rng.choice(COMPANY_KINDS)}",
            "department": DEPARTMENTS[rng.randrange(len(DEPARTMENTS))],
            "title": TITLES[rng.randrange(len(TITLES))],
            "phone": f"0{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}-"
            f"{rng.randrange(1000, 9999)}",
            "address": f"{PREFECTURES[rng.randrange(len(PREFECTURES))]}{rng.randrange(1, 9)}-"
            f"{rng.randrange(1, 30)}-{rng.randrange(1, 20)}",
            "acquired_at": TODAY - dt.timedelta(days=rng.randrange(1, 1100)),
            "acquisition_channel": CHANNELS[rng.randrange(len(CHANNELS))],
            "sales_status": SALES_STATUSES[rng.randrange(len(SALES_STATUSES))],
            "engagement": ENGAGEMENTS[rng.randrange(len(ENGAGEMENTS))],
            "tags": [first, second],
            "custom": {"plan": plan, "birthday": birthday.isoformat()},
        }


# -- the service's input: contacts.events records ---------------------------------------------

#: profile keys carried by a ContactUpserted's ContactData (as the upstream sends them).
EVENT_FIELDS = (
    "name",
    "name_kana",
    "company",
    "department",
    "title",
    "phone",
    "address",
    "acquisition_channel",
    "sales_status",
    "engagement",
)


def upserted_event(p: dict[str, Any], occurred_at: dt.datetime) -> dict[str, Any]:
    contact: dict[str, Any] = {k: p[k] for k in EVENT_FIELDS}
    contact.update(
        website=None,
        memo=None,
        star=None,
        acquired_at=p["acquired_at"].isoformat(),
        tags=p["tags"],
        custom_fields=p["custom"],
    )
    return {
        "event_id": str(uuid.UUID(int=p["i"] + 1, version=4)),
        "type": "ContactUpserted",
        "occurred_at": occurred_at,
        "source": "synergy",
        "external_id": p["external_id"],
        "email": p["email"],
        "contact": contact,
        "membership": None,
    }


# -- the ceiling's input and the bulk loader: contact table rows ---------------------------------

#: the columns the service writes for such an event (in the order COPY receives them).
COPY_COLUMNS = ("email", "external_id", *EVENT_FIELDS, "acquired_at", "tags", "custom")


def copy_row(p: dict[str, Any]) -> tuple[Any, ...]:
    """The row the service would write for ``p`` (custom as JSON text: no codec needed)."""
    return (
        p["email"],
        p["external_id"],
        *(p[k] for k in EVENT_FIELDS),
        p["acquired_at"],
        p["tags"],
        json.dumps(p["custom"], ensure_ascii=False),
    )


# -- memberships and delivery history for search and snapshot ----------------------------------

#: group 1 holds every contact (the snapshot's target); groups 2..5 about 30% each.
GROUPS = [
    ("メルマガ会員", 1.0),
    ("セミナー案内", 0.3),
    ("新製品情報", 0.3),
    ("ステップA", 0.3),
    ("パートナー通信", 0.3),
]
#: campaign k was sent k * 5 + 1 days ago: cmp-00 .. cmp-05 fall within the last 30 days.
CAMPAIGNS = [f"cmp-{k:02d}" for k in range(20)]
RECENT_CAMPAIGNS = [c for k, c in enumerate(CAMPAIGNS) if k * 5 + 1 < 30]


def membership_rows(contact_id: int, rng: random.Random) -> Iterator[tuple[int, int, str, str]]:
    """(contact_id, group_id, state, method): ~5% unsubscribed and ~2% banned per membership."""
    for group_id, (_, share) in enumerate(GROUPS, start=1):
        if share < 1.0 and rng.random() >= share:
            continue
        roll = rng.random()
        state = "unsubscribed" if roll < 0.05 else "banned" if roll < 0.07 else "deliverable"
        yield contact_id, group_id, state, "import"


def history_rows(
    contact_id: int, rng: random.Random, now: dt.datetime
) -> Iterator[tuple[int, str, str, dt.datetime, dt.datetime]]:
    """delivery_history for ~30% of contacts: 1–4 campaigns received, ~30% opened, ~10% clicked."""
    if rng.random() >= 0.3:
        return
    for campaign in rng.sample(range(len(CAMPAIGNS)), rng.randrange(1, 5)):
        sent = now - dt.timedelta(days=campaign * 5 + 1, seconds=rng.randrange(3600))
        cid = CAMPAIGNS[campaign]
        if rng.random() < 0.02:
            yield contact_id, cid, "errored", sent, sent
            continue
        yield contact_id, cid, "received", sent, sent
        if rng.random() < 0.3:
            opened = sent + dt.timedelta(minutes=rng.randrange(5, 2000))
            yield contact_id, cid, "opened", opened, opened
            if rng.random() < 0.33:
                clicked = opened + dt.timedelta(seconds=rng.randrange(5, 600))
                yield contact_id, cid, "clicked", clicked, clicked
