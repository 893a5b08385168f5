"""The pure rules of suppression: who may change a membership (F-10, F-11), what the sync
policy propagates (F-12), the can-send decision (F-14 to F-16) and unsubscribe links (F-13).
"""

from __future__ import annotations

import base64
import json

import pytest

from libs.common.mail.can_send import (
    Decision,
    blacklisted,
    can_send,
    normalise_rule,
    suffix_candidates,
)
from libs.common.mail.tokens import BadToken, Signer
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget
from services.suppression.processor import (
    ACTORS,
    STATES,
    Transition,
    decide,
    join_state,
    propagation,
    reader_unsubscribe,
)

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


def test_unsubscribe_token_round_trip():
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp/")
    for target in (UnsubscribeTarget(42, 7, "camp-1"), UnsubscribeTarget(42, 7, None)):
        token = links.token(target)
        assert token.startswith("k2.")
        assert "42" not in token.split(".")[2]
        assert links.read(token) == target
        assert links.url(target) == f"https://mail.example.jp/u/{token}"


def test_unsubscribe_headers_follow_rfc_8058():
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp/")
    target = UnsubscribeTarget(42, 7, "camp-1")
    url = links.url(target)
    assert url.startswith("https://mail.example.jp/u/k2.")
    assert links.headers(target) == {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert links.headers(target, mailto="unsubscribe@mail.example.jp") == {
        "List-Unsubscribe": f"<{url}>, <mailto:unsubscribe@mail.example.jp?subject=unsubscribe>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_tokens_we_did_not_issue_are_all_bad_tokens():
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    good = links.token(UnsubscribeTarget(42, 7, "camp-1"))
    kid, payload, mac = good.split(".")
    tampered = _b64(json.dumps({"c": 43, "g": 7, "m": "camp-1"}).encode())
    flipped_mac = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    bad = [
        f"{kid}.{tampered}.{mac}",  # payload changed, MAC kept
        f"{kid}.{payload}.{flipped_mac}",  # forged MAC
        f"k1.{payload}.{mac}",  # another key id with the same MAC
        Signer("k9:other", "unsubscribe").sign({"c": 42, "g": 7}),  # unknown key
        Signer("k2:wrong-secret", "unsubscribe").sign({"c": 42, "g": 7}),  # known kid, wrong key
        Signer(KEYS, "click").sign({"c": 42, "g": 7}),  # another purpose
        Signer(KEYS, "unsubscribe").sign({"c": "x", "g": 7}),  # well signed, no contact
        Signer(KEYS, "unsubscribe").sign({"g": 7}),
        "",
        "garbage",
        "a.b.c",
        "..",
        f"{kid}.{payload}.{mac}.extra",
        f"{kid}.{payload}.é",  # non-ASCII MAC
        "é.é.é",
    ]
    for token in bad:
        with pytest.raises(BadToken):
            links.read(token)


def test_key_rotation_old_key_still_verifies():
    old = UnsubscribeLinks("k1:old-secret", "https://mail.example.jp")
    rotated = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    target = UnsubscribeTarget(42, 7, "camp-1")
    assert rotated.read(old.token(target)) == target
    assert rotated.token(target).startswith("k2.")
    with pytest.raises(BadToken):
        old.read(rotated.token(target))
