"""The pure rules of suppression: who may change a membership (F-10, F-11), what the sync
policy propagates (F-12), the can-send decision (F-14 to F-16) and unsubscribe links (F-13).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import re

import pytest

from libs.common.mail.can_send import (
    Decision,
    blacklisted,
    can_send,
    normalise_rule,
    suffix_candidates,
)
from libs.common.mail.tokens import BadToken, Sealer, Signer
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget, pack, unpack
from services.suppression.processor import (
    ACTORS,
    STATES,
    Transition,
    decide,
    join_state,
    propagation,
    reader_unsubscribe,
)
from services.suppression.store import clicked_after_join

# F-11: the whole matrix ---------------------------------------------------------------------

BANNED_RULE = "a banned (配信禁止) membership is changed by an operator only"
RESUBSCRIBE_RULE = "a reader can unsubscribe but not re-subscribe here"
BAN_RULE = "only an operator can ban (配信禁止)"
AUTOMATIC_RULE = "automatic changes only ever stop mail, never resume it"

SAME = Transition(True, changes=False)
CHANGE = Transition(True, changes=True)


def refused(rule: str) -> Transition:
    return Transition(False, changes=False, rule=rule)


# (current, wanted): {actor: expected}
MATRIX: dict[tuple[str, str], dict[str, Transition]] = {
    ("deliverable", "deliverable"): {
        "reader": SAME,
        "operator": SAME,
        "upstream": SAME,
        "system": SAME,
    },
    ("deliverable", "unsubscribed"): {
        "reader": CHANGE,
        "operator": CHANGE,
        "upstream": CHANGE,
        "system": CHANGE,
    },
    ("deliverable", "banned"): {
        "reader": refused(BAN_RULE),
        "operator": CHANGE,
        "upstream": CHANGE,
        "system": CHANGE,
    },
    ("unsubscribed", "deliverable"): {
        "reader": refused(RESUBSCRIBE_RULE),
        "operator": CHANGE,
        "upstream": CHANGE,
        "system": refused(AUTOMATIC_RULE),
    },
    ("unsubscribed", "unsubscribed"): {
        "reader": SAME,
        "operator": SAME,
        "upstream": SAME,
        "system": SAME,
    },
    ("unsubscribed", "banned"): {
        "reader": refused(BAN_RULE),
        "operator": CHANGE,
        "upstream": CHANGE,
        "system": CHANGE,
    },
    ("banned", "deliverable"): {
        "reader": refused(BANNED_RULE),
        "operator": CHANGE,
        "upstream": refused(BANNED_RULE),
        "system": refused(BANNED_RULE),
    },
    ("banned", "unsubscribed"): {
        "reader": refused(BANNED_RULE),
        "operator": CHANGE,
        "upstream": refused(BANNED_RULE),
        "system": refused(BANNED_RULE),
    },
    ("banned", "banned"): {
        "reader": SAME,
        "operator": SAME,
        "upstream": SAME,
        "system": SAME,
    },
}


def test_the_matrix_covers_every_state_pair_and_actor():
    assert set(MATRIX) == {(c, w) for c in STATES for w in STATES}
    assert all(set(row) == set(ACTORS) for row in MATRIX.values())
    assert len(STATES) * len(STATES) * len(ACTORS) == 36


@pytest.mark.parametrize(
    ("current", "wanted", "actor", "expected"),
    [(c, w, a, t) for (c, w), row in MATRIX.items() for a, t in row.items()],
)
def test_decide(current, wanted, actor, expected):
    assert decide(current, wanted, actor) == expected


def test_decide_refuses_unknown_states_and_actors():
    assert decide("deliverable", "paused", "operator") == refused(
        "unknown state 'paused'; use one of deliverable, unsubscribed, banned"
    )
    assert decide("deliverable", "unsubscribed", "robot") == refused("unknown actor 'robot'")
    # an unknown actor is refused even when nothing would change
    assert decide("banned", "banned", "robot") == refused("unknown actor 'robot'")


def test_reader_unsubscribe_is_idempotent_and_never_touches_a_ban():
    assert reader_unsubscribe("deliverable") == CHANGE
    assert reader_unsubscribe("unsubscribed") == SAME
    assert reader_unsubscribe("banned") == SAME


# F-12 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new_state", "sync_unsubscribe", "sync_ban", "expected"),
    [
        ("unsubscribed", False, False, None),
        ("unsubscribed", True, False, "unsubscribed"),
        ("unsubscribed", False, True, None),
        ("unsubscribed", True, True, "unsubscribed"),
        ("banned", False, False, None),
        ("banned", True, False, None),
        ("banned", False, True, "banned"),
        ("banned", True, True, "banned"),
        ("deliverable", True, True, None),
    ],
)
def test_propagation(new_state, sync_unsubscribe, sync_ban, expected):
    assert propagation(new_state, sync_unsubscribe=sync_unsubscribe, sync_ban=sync_ban) == expected


@pytest.mark.parametrize(
    ("requested", "auto_stop", "banned_elsewhere", "sync_ban", "expected"),
    [
        ("deliverable", False, False, False, ("deliverable", "system")),
        ("deliverable", True, False, False, ("unsubscribed", "auto_stop")),
        ("unsubscribed", True, False, True, ("unsubscribed", "auto_stop")),
        ("deliverable", False, True, False, ("deliverable", "system")),
        ("deliverable", True, True, False, ("unsubscribed", "auto_stop")),
        ("deliverable", False, True, True, ("banned", "auto_sync")),
        ("deliverable", True, True, True, ("banned", "auto_sync")),
        ("deliverable", False, False, True, ("deliverable", "system")),
        ("banned", False, False, False, ("banned", "system")),
    ],
)
def test_join_state(requested, auto_stop, banned_elsewhere, sync_ban, expected):
    assert (
        join_state(
            requested, auto_stop=auto_stop, banned_elsewhere=banned_elsewhere, sync_ban=sync_ban
        )
        == expected
    )


# F-16: can-send --------------------------------------------------------------------------------

EVERYTHING = dict(
    blacklisted=True,
    black=True,
    suppression="bounced",
    delivery_status="error",
    membership_state="banned",
)


def test_can_send_reasons_in_order_strongest_first():
    facts = dict(EVERYTHING)
    reasons = []
    for fact, cleared in [
        ("blacklisted", False),
        ("black", False),
        ("suppression", None),
        ("delivery_status", "ok"),
        ("membership_state", "unsubscribed"),
        ("membership_state", "deliverable"),
    ]:
        reasons.append(can_send(**facts).reason)
        facts[fact] = cleared
    assert reasons == [
        "blacklisted",
        "black_flag",
        "address_bounced",
        "delivery_status_error",
        "banned",
        "unsubscribed",
    ]
    assert can_send(**facts) == Decision(True, None)
    assert can_send(blacklisted=False) == Decision(True, None)  # no group: no membership decides


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({"suppression": "bounced"}, "address_bounced"),
        ({"suppression": "complained"}, "address_complained"),
        ({"suppression": "invalid"}, "address_invalid"),
        ({"delivery_status": "invalid_address"}, "delivery_status_invalid_address"),
        ({"delivery_status": "error"}, "delivery_status_error"),
        ({"delivery_status": "spam"}, "delivery_status_spam"),
        ({"membership_state": "banned"}, "banned"),
        ({"membership_state": "unsubscribed"}, "unsubscribed"),
        ({"membership_state": "left"}, "not_a_member"),
    ],
)
def test_can_send_each_refusal(facts, reason):
    decision = can_send(blacklisted=False, **facts)
    assert decision == Decision(False, reason)
    assert not decision


@pytest.mark.parametrize("status", [None, "unconfirmed", "ok", "temporary_error"])
def test_delivery_statuses_that_do_not_stop(status):
    assert can_send(blacklisted=False, delivery_status=status, membership_state="deliverable")


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({"blacklisted": True}, "blacklisted"),
        ({"black": True}, "black_flag"),
        ({"suppression": "bounced"}, "address_bounced"),
        ({"suppression": "complained"}, "address_complained"),
        ({"suppression": "invalid"}, "address_invalid"),
        ({"membership_state": "banned"}, "banned"),
        ({"delivery_status": "invalid_address"}, "delivery_status_invalid_address"),
        ({"delivery_status": "error"}, "delivery_status_error"),
        ({"delivery_status": "spam"}, "delivery_status_spam"),
    ],
)
def test_include_unsubscribed_never_overrides_a_stronger_refusal(facts, reason):
    base = {"blacklisted": False, "membership_state": "unsubscribed"}
    if facts.get("membership_state"):
        base["membership_state"] = facts["membership_state"]
    merged = {**base, **facts}
    assert can_send(**merged, include_unsubscribed=True) == Decision(False, reason)


def test_include_unsubscribed_reaches_only_unsubscribed():
    assert can_send(blacklisted=False, membership_state="unsubscribed", include_unsubscribed=True)
    assert can_send(blacklisted=False, membership_state="deliverable", include_unsubscribed=True)


# F-14: blacklist matching -----------------------------------------------------------------------

SUFFIX = {normalise_rule("suffix", "example.com")}


@pytest.mark.parametrize(
    "email",
    ["a@example.com", "a@mx.example.com", "a@A.MX.Example.COM", "A@EXAMPLE.COM", "a@example.com."],
)
def test_suffix_rule_matches_the_domain_and_its_subdomains(email):
    assert blacklisted(email, set(), SUFFIX)


@pytest.mark.parametrize(
    "email",
    [
        "a@notexample.com",
        "a@example.com.evil.jp",
        "a@example.co",
        "a@example.comm",
        "example.com@evil.jp",
        "a@com",
    ],
)
def test_suffix_rule_never_matches_look_alikes(email):
    assert not blacklisted(email, set(), SUFFIX)


def test_exact_rule_is_the_whole_address_case_insensitive():
    exact = {normalise_rule("exact", " Taro@Example.JP ")}
    assert exact == {"taro@example.jp"}
    assert blacklisted("taro@example.jp", exact, set())
    assert blacklisted("TARO@EXAMPLE.JP", exact, set())
    assert blacklisted(" taro@example.jp ", exact, set())
    assert not blacklisted("jiro@example.jp", exact, set())
    assert not blacklisted("xtaro@example.jp", exact, set())
    assert not blacklisted("taro@mx.example.jp", exact, set())
    assert not blacklisted("taro@example.jp.evil.jp", exact, set())


def test_suffix_candidates_are_the_domain_and_each_parent():
    assert suffix_candidates("a@MX.Example.co.JP") == [
        "mx.example.co.jp",
        "example.co.jp",
        "co.jp",
        "jp",
    ]
    assert suffix_candidates("a@example.com.") == ["example.com", "com"]


@pytest.mark.parametrize(
    ("match", "value", "stored"),
    [
        ("suffix", "example.com", "example.com"),
        ("suffix", "@Example.COM", "example.com"),
        ("suffix", ".example.com", "example.com"),
        ("suffix", " example.com. ", "example.com"),
        ("exact", "Taro@Example.JP", "taro@example.jp"),
        ("exact", "  taro@example.jp\t", "taro@example.jp"),
    ],
)
def test_normalise_rule(match, value, stored):
    assert normalise_rule(match, value) == stored


# F-13: unsubscribe links -------------------------------------------------------------------------

KEYS = "k2:new-secret,k1:old-secret"


TARGETS = (
    UnsubscribeTarget(42, 7, "camp-1"),
    UnsubscribeTarget(42, 7, None),
    UnsubscribeTarget(42, 7, "6f3a1c52-8d4e-4b7a-9c2f-1e5d7b9a0c34"),
    UnsubscribeTarget(0, 7, "6f3a1c52-8d4e-4b7a-9c2f-1e5d7b9a0c34", test=True),
    UnsubscribeTarget(2**63 - 1, 2**31, "キャンペーン"),
    UnsubscribeTarget(987_654_321, 1, "6F3A1C52-8D4E-4B7A-9C2F-1E5D7B9A0C34"),  # not canonical
)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_unsubscribe_token_round_trip():
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp/")
    for target in TARGETS:
        token = links.token(target)
        assert token.startswith("k2.") and token.count(".") == 1
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token[3:])  # URL-safe, no padding
        assert len(token) <= 100
        assert links.read(token) == target
        url = links.url(target)
        assert url.startswith("https://mail.example.jp/u/k2.")
        assert links.read(url.rpartition("/")[2]) == target


def test_unsubscribe_tokens_reveal_no_ids():
    """F-13: the token's bytes are encrypted: no id, no claim name, no campaign, and a new
    token every time (the same target twice gives two tokens, both valid)."""
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    target = UnsubscribeTarget(987_654_321, 7, "camp-1")
    tokens = {links.token(target) for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        box = _unb64(token.partition(".")[2])
        for shown in (b"987654321", (987_654_321).to_bytes(4, "big"), b"camp-1", b'"c"'):
            assert shown not in box
        assert "987654321" not in token and "camp" not in token
        with pytest.raises(ValueError):
            json.loads(box)
        assert links.read(token) == target
    # the same length for every contact id of the same width: nothing to compare but length
    assert len(links.token(UnsubscribeTarget(987_654_322, 7))) == len(
        links.token(UnsubscribeTarget(987_654_321, 7))
    )


def test_unsubscribe_headers_follow_rfc_8058():
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp/")
    target = UnsubscribeTarget(42, 7, "camp-1")
    headers = links.headers(target)
    url = headers["List-Unsubscribe"][1:-1]
    assert url.startswith("https://mail.example.jp/u/k2.")
    assert links.read(url.rpartition("/")[2]) == target
    assert headers == {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    with_mailto = links.headers(target, mailto="unsubscribe@mail.example.jp")
    first, second = with_mailto["List-Unsubscribe"].split(", ")
    assert links.read(first[1:-1].rpartition("/")[2]) == target
    assert second == "<mailto:unsubscribe@mail.example.jp?subject=unsubscribe>"
    assert with_mailto["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


def test_tokens_we_did_not_issue_are_all_bad_tokens():
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    sealed = links.token(UnsubscribeTarget(42, 7, "camp-1"))
    kid, box = sealed.split(".")
    raw = _unb64(box)
    # a signed link as mailed before tokens were sealed: still read, so tamper with it too
    signed = Signer(KEYS, "unsubscribe").sign({"c": 42, "g": 7, "m": "camp-1"})
    _, payload, mac = signed.split(".")
    tampered = _b64(json.dumps({"c": 43, "g": 7, "m": "camp-1"}).encode())
    bad = [
        # sealed
        *(f"{kid}.{_flip(box, at)}" for at in (0, 5, 16, 20, len(box) // 2, len(box) - 2)),
        f"{kid}.{_b64(raw[:-1])}",  # tag cut short
        f"{kid}.{_b64(raw[:12])}",  # nonce alone
        f"{kid}.{_b64(raw[:5])}",  # not even a nonce
        f"{kid}.",
        f"k1.{box}",  # another key id
        f"k9.{box}",  # unknown key id
        f"{kid}.{box}=",
        f"{kid}.{box[:10]}é{box[11:]}",
        f"{kid}.{'A' * 600}",
        UnsubscribeLinks("k2:wrong-secret", "https://x").token(UnsubscribeTarget(42, 7)),
        UnsubscribeLinks("k9:other", "https://x").token(UnsubscribeTarget(42, 7)),
        Sealer(KEYS, "click").seal(pack(UnsubscribeTarget(42, 7))),  # another purpose
        Sealer(KEYS, "unsubscribe").seal(b""),  # well sealed, no claims
        Sealer(KEYS, "unsubscribe").seal(b"\x80\x11\x01\x02"),  # unknown flag
        Sealer(KEYS, "unsubscribe").seal(b"\x00\x91\x01\x02"),  # an id of 9 bytes
        Sealer(KEYS, "unsubscribe").seal(b"\x00\x21\x01\x02"),  # shorter than its lengths
        Sealer(KEYS, "unsubscribe").seal(b"\x02\x11\x01\x02abc"),  # a UUID of 3 bytes
        Sealer(KEYS, "unsubscribe").seal(b"\x04\x11\x01\x02\xff"),  # campaign not UTF-8
        Sealer(KEYS, "unsubscribe").seal(b"\x00\x11\x01\x02x"),  # bytes after the claims
        # signed (the old form)
        f"{kid}.{tampered}.{mac}",  # payload changed, MAC kept
        f"{kid}.{payload}.{_flip(mac, len(mac) - 1)}",  # forged MAC
        f"k1.{payload}.{mac}",  # another key id with the same MAC
        Signer("k9:other", "unsubscribe").sign({"c": 42, "g": 7}),  # unknown key
        Signer("k2:wrong-secret", "unsubscribe").sign({"c": 42, "g": 7}),  # known kid, wrong key
        Signer(KEYS, "click").sign({"c": 42, "g": 7}),  # another purpose
        Signer(KEYS, "unsubscribe").sign({"c": "x", "g": 7}),  # well signed, no contact
        Signer(KEYS, "unsubscribe").sign({"g": 7}),
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "..",
        ".",
        f"{kid}.{payload}.{mac}.extra",
        f"{kid}.{payload}.é",  # non-ASCII MAC
        "é.é.é",
        "é.é",
    ]
    for token in bad:
        with pytest.raises(BadToken) as caught:
            links.read(token)
        assert str(caught.value) == "", token  # one uninformative answer for every failure


def test_links_mailed_before_tokens_were_sealed_still_read():
    """Signed JSON links (``kid.payload.mac``) are in mailboxes for years: still honoured."""
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    old = Signer("k1:old-secret", "unsubscribe")
    assert links.read(old.sign({"c": 42, "g": 7, "m": "camp-1"})) == TARGETS[0]
    assert links.read(old.sign({"c": 42, "g": 7})) == TARGETS[1]
    test_mail = old.sign({"c": 0, "g": 7, "m": TARGETS[3].campaign_id, "t": 1})
    assert links.read(test_mail) == TARGETS[3]


def test_key_rotation_old_key_still_verifies():
    old = UnsubscribeLinks("k1:old-secret", "https://mail.example.jp")
    rotated = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    target = UnsubscribeTarget(42, 7, "camp-1")
    assert rotated.read(old.token(target)) == target
    assert rotated.token(target).startswith("k2.")
    with pytest.raises(BadToken):
        old.read(rotated.token(target))
    # the same secret under another kid is another key: a kid cannot be swapped
    renamed = UnsubscribeLinks("k3:old-secret", "https://mail.example.jp")
    with pytest.raises(BadToken):
        rotated.read("k1." + renamed.token(target).partition(".")[2])


def test_pack_refuses_ids_out_of_range():
    for target in (UnsubscribeTarget(-1, 7), UnsubscribeTarget(1, -7), UnsubscribeTarget(2**64, 1)):
        with pytest.raises(ValueError):
            pack(target)
    assert unpack(pack(UnsubscribeTarget(2**64 - 1, 0))) == UnsubscribeTarget(2**64 - 1, 0)


def test_a_click_counts_as_after_a_join_only_from_the_next_millisecond():
    """A join's time travels in milliseconds, a click's is kept to the microsecond."""
    joined = dt.datetime(2026, 12, 5, 9, 0, 0, 123000, tzinfo=dt.UTC)  # 09:00:00.123
    at = functools.partial(dt.datetime, 2026, 12, 5, 9, 0, tzinfo=dt.UTC)
    assert not clicked_after_join(at(0, 122999), joined)
    # the join was issued later in this same millisecond than the click: not after it
    assert not clicked_after_join(at(0, 123400), joined)
    assert not clicked_after_join(at(0, 123999), joined)
    assert clicked_after_join(at(0, 124000), joined)
    assert clicked_after_join(at(1, 0), joined)
