"""The public unsubscribe link (F-13): GET confirms and changes nothing, POST (form or RFC 8058
one-click, urlencoded or multipart) unsubscribes durably, every token we cannot honour gets
one identical answer, keys rotate; then the link end to end with contacts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from libs.common.mail.tokens import Sealer, Signer
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget, pack
from libs.common.metrics import sample_value
from libs.common.topics import Topic
from tests.conftest import ADMIN_TOKEN, OPERATOR_TOKEN, eventually, running, service_environ
from tests.integration.test_contacts_api import published
from tests.integration.test_contacts_projections import search_ids
from tests.integration.test_suppression import (
    join,
    membership,
    of_contact,
    send_all,
    unsubscribe_by_link,
    wait_member,
)

BASE = "https://mail.example.jp"
ROTATED_KEYS = "k2:new-secret,k1:old-secret"
ONE_CLICK = "List-Unsubscribe=One-Click"


async def fetch(
    api: Any, method: str, token: str, *, data: Any = None, headers: Any = None
) -> tuple[int, str, bytes, Any]:
    """(status, content type, body bytes, headers) of a public request, redirects not followed."""
    async with api.session.request(
        method,
        f"{api.base}/u/{token}",
        data=data,
        headers=headers,
        allow_redirects=False,
    ) as response:
        return response.status, response.content_type, await response.read(), response.headers


def one_click_urlencoded() -> dict[str, Any]:
    return {
        "data": ONE_CLICK,
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
    }


def one_click_multipart() -> dict[str, Any]:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("List-Unsubscribe", "One-Click")
    return {"data": form}


def broken_multipart() -> dict[str, Any]:
    """A body that is not what its Content-Type claims (no boundary)."""
    return {"data": ONE_CLICK, "headers": {"Content-Type": "multipart/form-data"}}


def bad_part_header() -> dict[str, Any]:
    """Multipart whose part header does not parse (a control character in the name)."""
    return {
        "data": b'--xx\r\nContent-Disposition: form-data; name="a\x1a"\r\n\r\nv\r\n--xx--\r\n',
        "headers": {"Content-Type": "multipart/form-data; boundary=xx"},
    }


def requests_counted(outcome: str, kind: str) -> float:
    value = sample_value("tayori_unsubscribe_requests_total", {"outcome": outcome, "kind": kind})
    return value or 0.0


def change_ids(changes: list[dict[str, Any]]) -> set[str]:
    return {c["change_id"] for c in changes}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_confirm_page_one_click_and_refused_tokens(stack, database, prefix, kafka):
    async with running(
        "suppression", stack, database, prefix, signing_keys=ROTATED_KEYS
    ) as suppression:
        api = suppression.api
        joins = [(c, join(c, 1)) for c in (1, 2, 3, 4, 5, 6)] + [(1, join(1, 2))]
        await send_all(kafka, Topic.SUPPRESSION_COMMANDS, joins)
        for key, cmd in joins:
            await wait_member(api, key, cmd["group_id"])
        await api.ok("PUT", "/v1/memberships/3/1", {"state": "banned"}, token=OPERATOR_TOKEN)
        before = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
        assert len(before) == 8

        links = UnsubscribeLinks(ROTATED_KEYS, BASE)
        old_links = UnsubscribeLinks("k1:old-secret", BASE)

        def token(contact_id: int, campaign: str | None = None, group_id: int = 1) -> str:
            return links.token(UnsubscribeTarget(contact_id, group_id, campaign))

        # GET: a confirmation page, in Japanese and English, no external assets, no change
        first = await membership(api, 1, 1)
        status, content_type, body, headers = await fetch(api, "GET", token(1, "camp-1"))
        page = body.decode("utf-8")
        assert (status, content_type, headers["Content-Type"]) == (
            200,
            "text/html",
            "text/html; charset=utf-8",
        )
        assert '<html lang="ja">' in page
        assert "配信停止の確認" in page and "To stop receiving these emails" in page
        assert '<form method="post">' in page and "action=" not in page
        assert not re.search(r"(src|href)\s*=", page, re.IGNORECASE)
        assert "http://" not in page and "https://" not in page and "url(" not in page
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        status, _, _, _ = await fetch(api, "GET", old_links.token(UnsubscribeTarget(4, 1, None)))
        assert status == 200
        assert await membership(api, 1, 1) == first
        assert change_ids(await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)) == (
            change_ids(before)
        )

        # POST one-click, both encodings: 200, no redirect, durable, method form + campaign
        counted = requests_counted("unsubscribed", "one_click")
        done: list[bytes] = []
        for contact_id, request in ((1, one_click_urlencoded()), (2, one_click_multipart())):
            status, content_type, body, headers = await fetch(
                api, "POST", token(contact_id, f"camp-{contact_id}"), **request
            )
            assert (status, content_type, "Location" in headers) == (200, "text/html", False)
            assert "配信を停止しました" in body.decode() and "You have been unsubscribed" in (
                body.decode()
            )
            done.append(body)
            got = await membership(api, contact_id, 1)
            assert (got["state"], got["method"], got["campaign_id"]) == (
                "unsubscribed",
                "form",
                f"camp-{contact_id}",
            )
        assert requests_counted("unsubscribed", "one_click") == counted + 2
        assert (await membership(api, 1, 2))["state"] == "deliverable"

        # a key that signed before the rotation still works (a plain form submit)
        counted_form = requests_counted("unsubscribed", "form")
        status, _, body, headers = await fetch(
            api,
            "POST",
            old_links.token(UnsubscribeTarget(4, 1, "camp-old")),
            data={"confirm": "1"},
        )
        assert (status, "Location" in headers, body) == (200, False, done[0])
        assert requests_counted("unsubscribed", "form") == counted_form + 1
        got = await membership(api, 4, 1)
        assert (got["state"], got["method"], got["campaign_id"]) == (
            "unsubscribed",
            "form",
            "camp-old",
        )
        after = await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)
        assert sorted(
            (c["contact_id"], c["group_id"], c["state"], c["method"])
            for c in after
            if c["change_id"] not in change_ids(before)
        ) == [
            (1, 1, "unsubscribed", "form"),
            (2, 1, "unsubscribed", "form"),
            (4, 1, "unsubscribed", "form"),
        ]

        # already unsubscribed, or banned: 200 and nothing changes
        unsubscribed, banned = await membership(api, 1, 1), await membership(api, 3, 1)
        for contact_id in (1, 3):
            for request in (one_click_urlencoded(), one_click_multipart()):
                status, _, body, headers = await fetch(
                    api, "POST", token(contact_id, "camp-again"), **request
                )
                assert (status, "Location" in headers, body) == (200, False, done[0])
        assert await membership(api, 1, 1) == unsubscribed
        assert await membership(api, 3, 1) == banned
        assert banned["state"] == "banned"
        assert change_ids(await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)) == (
            change_ids(after)
        )

        # every token we cannot honour: one answer, byte for byte, for GET and POST
        kid, box = token(5).split(".")
        _, other_box = token(6).split(".")
        # the signed form of mails sent before sealed tokens: still read, so forged too
        signed = Signer(ROTATED_KEYS, "unsubscribe").sign({"c": 5, "g": 1})
        _, payload, mac = signed.split(".")
        _, other_payload, _ = Signer(ROTATED_KEYS, "unsubscribe").sign({"c": 6, "g": 1}).split(".")
        # a membership that exists, under the MAC of another token
        tampered = _b64(json.dumps({"c": 1, "g": 2}, separators=(",", ":")).encode())
        flipped = box[:20] + ("A" if box[20] != "A" else "B") + box[21:]
        refused = {
            "sealed, tampered": f"{kid}.{flipped}",
            "sealed, boxes spliced": f"{kid}.{box[:20]}{other_box[20:]}",
            "sealed, old kid": f"k1.{box}",
            "sealed, other purpose": Sealer(ROTATED_KEYS, "click").seal(
                pack(UnsubscribeTarget(5, 1))
            ),
            "sealed, long": "k2." + "A" * 600,
            "forged mac": f"{kid}.{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",
            "tampered payload": f"{kid}.{tampered}.{mac}",
            "payload swapped": f"{kid}.{other_payload}.{mac}",
            "other key id": UnsubscribeLinks("k3:other", BASE).token(UnsubscribeTarget(5, 1)),
            "known kid, other secret": UnsubscribeLinks("k2:guess", BASE).token(
                UnsubscribeTarget(5, 1)
            ),
            "old kid, other secret": UnsubscribeLinks("k1:guess", BASE).token(
                UnsubscribeTarget(5, 1)
            ),
            "other purpose": Signer(ROTATED_KEYS, "click").sign({"c": 5, "g": 1}),
            "garbage": "garbage",
            "three dots": "k2..",
            "long": "k2." + "A" * 600 + ".B",
            "non-ascii": urllib.parse.quote("k2.e30.é"),
        }
        reference = await fetch(api, "GET", refused["garbage"])
        assert (reference[0], reference[1]) == (404, "text/html")
        assert "このリンクは無効です" in reference[2].decode()
        answers = {}
        for name, bad in refused.items():
            for method, encoding, request in (
                ("GET", None, {}),
                ("POST", "urlencoded", one_click_urlencoded()),
                ("POST", "multipart", one_click_multipart()),
                ("POST", "broken", broken_multipart()),
                ("POST", "bad part header", bad_part_header()),
            ):
                status, content_type, body, headers = await fetch(api, method, bad, **request)
                answers[(name, method, encoding)] = (
                    status,
                    content_type,
                    body,
                    headers.get("Location"),
                )
        assert set(answers.values()) == {(404, "text/html", reference[2], None)}, {
            key: value[:2] for key, value in answers.items()
        }
        assert (await membership(api, 5, 1))["state"] == "deliverable"
        assert (await membership(api, 1, 2))["state"] == "deliverable"
        assert change_ids(await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)) == (
            change_ids(after)
        )

        # a token we signed for a membership not recorded here (a join contacts made a moment
        # ago, still being applied): confirmed and kept for when the join arrives, never an
        # invalid link; nothing changes or is published meanwhile
        for pending in (token(999), token(5, group_id=99)):
            status, _, body, _ = await fetch(api, "GET", pending)
            assert status == 200 and "配信停止の確認" in body.decode()
            status, _, body, _ = await fetch(api, "POST", pending, **one_click_urlencoded())
            assert (status, body) == (200, done[0])
        assert await membership(api, 999, 1) is None
        assert await membership(api, 5, 99) is None
        assert change_ids(await published(suppression, kafka, Topic.SUPPRESSION_CHANGES)) == (
            change_ids(after)
        )

        # a POST to a good link whose body cannot be parsed still unsubscribes, no error page
        status, _, body, _ = await fetch(api, "POST", token(6, "camp-6"), **broken_multipart())
        assert (status, body) == (200, done[0])
        got = await membership(api, 6, 1)
        assert (got["state"], got["method"], got["campaign_id"]) == (
            "unsubscribed",
            "form",
            "camp-6",
        )


async def test_links_only_for_memberships_opaque_and_every_mailed_link_works(
    stack, database, prefix, kafka
):
    """Issue 18 #9 (F-13): GET /v1/unsubscribe-link answers 404 for a contact and group that
    are no membership; a link it issues shows no id; links mailed before tokens were sealed
    (signed JSON, by a key since rotated out of first place) still unsubscribe."""
    async with running(
        "suppression", stack, database, prefix, signing_keys=ROTATED_KEYS
    ) as suppression:
        api = suppression.api
        joins = [(c, join(c, 1)) for c in (11, 12)]
        await send_all(kafka, Topic.SUPPRESSION_COMMANDS, joins)
        for key, cmd in joins:
            await wait_member(api, key, cmd["group_id"])

        for contact_id, group_id in ((987_654_321, 1), (11, 2), (987_654_321, 987_654_321)):
            status, body = await api.call(
                "GET", f"/v1/unsubscribe-link?contact_id={contact_id}&group_id={group_id}"
            )
            assert status == 404, body
            assert body["status"] == 404 and body["type"], body
            assert f"contact {contact_id} is not a member" in body["detail"]

        campaign = "6f3a1c52-8d4e-4b7a-9c2f-1e5d7b9a0c34"
        link = await api.ok(
            "GET", f"/v1/unsubscribe-link?contact_id=11&group_id=1&campaign_id={campaign}"
        )
        token = link["url"].rpartition("/")[2]
        assert link["url"].endswith(f"/u/{token}")
        assert link["headers"]["List-Unsubscribe"] == f"<{link['url']}>"
        kid, _, box = token.partition(".")
        assert kid == "k2" and re.fullmatch(r"[A-Za-z0-9_-]+", box), token
        raw = base64.urlsafe_b64decode(box + "=" * (-len(box) % 4))
        assert b'"c"' not in raw and b"11" not in raw and campaign.encode() not in raw
        assert bytes.fromhex(campaign.replace("-", "")) not in raw
        status, _, _, _ = await fetch(api, "POST", token, **one_click_urlencoded())
        assert status == 200
        got = await membership(api, 11, 1)
        assert (got["state"], got["method"], got["campaign_id"]) == (
            "unsubscribed",
            "form",
            campaign,
        )

        # a link as mailed before: signed JSON under the old key
        mailed = Signer("k1:old-secret", "unsubscribe").sign({"c": 12, "g": 1, "m": "camp-old"})
        status, _, page, _ = await fetch(api, "GET", mailed)
        assert status == 200 and "配信停止の確認" in page.decode()
        status, _, _, _ = await fetch(api, "POST", mailed, **one_click_multipart())
        assert status == 200
        got = await membership(api, 12, 1)
        assert (got["state"], got["campaign_id"]) == ("unsubscribed", "camp-old")


# Durability: kill right after the 200 -----------------------------------------------------


def start_service(
    stack: Any, database: str, prefix: str, keys: str, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    env = service_environ(stack, database, prefix, TAYORI_SIGNING_KEYS=keys)
    port = int(env["HTTP_PORT"])
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tayori", "suppression"],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, port


async def wait_ready(session: aiohttp.ClientSession, proc: subprocess.Popen[bytes], port: int):
    async def ready() -> bool:
        assert proc.poll() is None, f"the service exited with {proc.returncode}"
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await eventually(ready)


async def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    await asyncio.to_thread(proc.wait)


async def test_an_answered_unsubscribe_survives_a_kill(stack, database, prefix, kafka, tmp_path):
    keys = "k1:durable-secret"
    token = UnsubscribeLinks(keys, BASE).token(UnsubscribeTarget(41, 1, "camp-kill"))
    await send_all(kafka, Topic.SUPPRESSION_COMMANDS, [(41, join(41, 1)), (41, join(41, 2))])
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    log = tmp_path / "suppression.log"
    processes = []
    try:
        async with aiohttp.ClientSession() as session:
            proc, port = start_service(stack, database, prefix, keys, log)
            processes.append(proc)
            await wait_ready(session, proc, port)
            url = f"http://127.0.0.1:{port}"

            async def joined() -> bool:
                async with session.get(f"{url}/v1/memberships/41", headers=auth) as response:
                    return len((await response.json())["items"]) == 2

            await eventually(joined)
            async with session.post(
                f"{url}/u/{token}",
                data=ONE_CLICK,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                allow_redirects=False,
            ) as response:
                status = response.status
                if status == 200:
                    proc.send_signal(signal.SIGKILL)  # before even reading the page
            assert status == 200
            assert await asyncio.to_thread(proc.wait, 30) == -signal.SIGKILL

            proc, port = start_service(stack, database, prefix, keys, log)
            processes.append(proc)
            await wait_ready(session, proc, port)
            url = f"http://127.0.0.1:{port}"
            async with session.get(f"{url}/v1/memberships/41/1", headers=auth) as response:
                got = await response.json()
            assert (got["state"], got["method"], got["campaign_id"]) == (
                "unsubscribed",
                "form",
                "camp-kill",
            )
            async with session.get(f"{url}/v1/memberships/41/2", headers=auth) as response:
                assert (await response.json())["state"] == "deliverable"

            def unsubscribed(records: list[dict[str, Any]]) -> bool:
                return (1, "unsubscribed", "form") in of_contact(records, 41)

            changes = await kafka.read(Topic.SUPPRESSION_CHANGES, until=unsubscribed)
            assert [c for c in of_contact(changes, 41) if c[1] != "deliverable"] in (
                [(1, "unsubscribed", "form")],
                # published, then killed before the relay deleted the row: once more
                [(1, "unsubscribed", "form")] * 2,
            )
    finally:
        for proc in processes:
            await stop_process(proc)


# End to end with contacts ------------------------------------------------------------------


async def test_unsubscribe_reaches_contacts_search(stack, database, prefix):
    async with (
        running("contacts", stack, database, prefix) as contacts,
        running("suppression", stack, database, prefix) as suppression,
    ):
        capi, sapi = contacts.api, suppression.api
        news = (await capi.ok("POST", "/v1/groups", {"name": "ニュースレター"}))["id"]
        seminar = (await capi.ok("POST", "/v1/groups", {"name": "セミナー案内"}))["id"]
        reader = (await capi.ok("POST", "/v1/contacts", {"email": "yomu@example.jp"}))["id"]
        other = (await capi.ok("POST", "/v1/contacts", {"email": "hoka@example.jp"}))["id"]
        await capi.ok("POST", f"/v1/groups/{news}/members", {"contact_ids": [reader, other]})
        await capi.ok("POST", f"/v1/groups/{seminar}/members", {"contact_ids": [reader]})

        # the Join went over suppression.commands; the address over contacts.changelog
        for contact_id, group_id in ((reader, news), (other, news), (reader, seminar)):
            got = await wait_member(sapi, contact_id, group_id)
            assert (got["state"], got["method"]) == ("deliverable", "system")

        async def address_known() -> bool:
            answer = await sapi.ok("GET", f"/v1/can-send?contact_id={reader}&group_id={news}")
            return answer["address_known"] and answer["allowed"]

        await eventually(address_known)
        assert await search_ids(capi, {"delivery_state": "any_unsubscribed"}) == set()

        await unsubscribe_by_link(sapi, reader, news, "camp-e2e")

        async def found() -> bool:
            by_group = await search_ids(
                capi, {"membership": {"group_id": news, "state": "unsubscribed"}}
            )
            any_unsubscribed = await search_ids(capi, {"delivery_state": "any_unsubscribed"})
            assert (by_group, any_unsubscribed) == ({reader}, {reader})
            return True

        await eventually(found)
        fetched = await capi.ok("GET", f"/v1/contacts/{reader}")
        assert sorted((m["group_id"], m["state"], m["method"]) for m in fetched["memberships"]) == (
            sorted([(news, "unsubscribed", "form"), (seminar, "deliverable", "system")])
        )
        assert await search_ids(
            capi, {"membership": {"group_id": news, "state": "deliverable"}}
        ) == {other}
        assert await sapi.ok("GET", f"/v1/can-send?contact_id={reader}&group_id={news}") == {
            "allowed": False,
            "reason": "unsubscribed",
            "membership_state": "unsubscribed",
            "blacklist_rule": None,
            "address_known": True,
        }


async def test_a_link_used_before_its_join_is_applied_still_unsubscribes(
    stack, database, prefix, monkeypatch
):
    """Issue 18 item 4: contacts answers {"joined": n} at once; suppression applies the joins
    a moment later. Held in that moment (suppression's command consumer paused), its
    membership routes must not say "not a member", and a reader's link must unsubscribe."""
    from services.suppression import agents

    gate = asyncio.Event()
    applied = agents.handle_commands

    async def paused(ctx: Any, batch: Any) -> None:
        await gate.wait()
        await applied(ctx, batch)

    monkeypatch.setattr(agents, "handle_commands", paused)
    async with (
        running("contacts", stack, database, prefix) as contacts,
        running("suppression", stack, database, prefix) as suppression,
    ):
        capi, sapi = contacts.api, suppression.api
        news = (await capi.ok("POST", "/v1/groups", {"name": "ニュースレター"}))["id"]
        reader, other, later = [
            (await capi.ok("POST", "/v1/contacts", {"email": f"{name}@example.jp"}))["id"]
            for name in ("hayai", "matsu", "ato")
        ]
        answer = await capi.ok(
            "POST", f"/v1/groups/{news}/members", {"contact_ids": [reader, other]}
        )
        assert (answer["joined"], answer["already_members"]) == (2, 0)

        # the joins are committed in contacts, not applied in suppression yet
        for method, body in (("GET", None), ("PUT", {"state": "banned"})):
            status, problem = await sapi.call(method, f"/v1/memberships/{other}/{news}", body)
            assert status == 404, problem
            assert "is not a member" not in problem["detail"]
            assert "still being applied" in problem["detail"] and "retry" in problem["detail"]
        status, problem = await sapi.call("GET", f"/v1/can-send?contact_id={other}&group_id={news}")
        assert status == 404 and "still being applied" in problem["detail"]

        # the reader's link, as the campaign mail carries it (the sender seals it; the
        # operator route issues links only for memberships it has): the confirmation page,
        # then unsubscribed — never "invalid link"
        settings = suppression.runtime.settings
        links = UnsubscribeLinks(settings.signing_keys, settings.public_base_url)
        token = links.token(UnsubscribeTarget(reader, news, "c-early"))
        status, _, page, _ = await fetch(sapi, "GET", token)
        assert status == 200 and "配信停止の確認" in page.decode(), page.decode()
        status, _, page, _ = await fetch(sapi, "POST", token, **one_click_urlencoded())
        assert status == 200 and "配信を停止しました" in page.decode(), page.decode()
        assert "このリンクは無効です" not in page.decode()

        # a click for someone not (yet) a member, who joins only after it: that later join is
        # a new subscription and stands
        late = links.token(UnsubscribeTarget(later, news))
        status, _, _, _ = await fetch(sapi, "POST", late, **one_click_urlencoded())
        assert status == 200
        await capi.ok("POST", f"/v1/groups/{news}/members", {"contact_ids": [later]})

        gate.set()  # suppression applies the joins: the click was kept, not lost
        got = await wait_member(sapi, reader, news, "unsubscribed")
        assert (got["method"], got["campaign_id"]) == ("form", "c-early")
        assert (await wait_member(sapi, other, news))["state"] == "deliverable"
        assert (await wait_member(sapi, later, news))["state"] == "deliverable"

        async def contacts_sees_it() -> bool:
            found = await search_ids(
                capi, {"membership": {"group_id": news, "state": "unsubscribed"}}
            )
            assert found == {reader}
            return True

        await eventually(contacts_sees_it)
