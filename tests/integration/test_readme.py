"""The README's "Using it" examples run as written on a fresh ``tayori dev`` (issue 18 #11).

Every ```sh block of that section runs, in order, in one bash (as a person pastes them into
one shell), with ``set -euo pipefail``: each ``curl -fsS`` that fails fails the run. A block
meant only as a template is marked ``<!-- not run: why -->`` on the line before it and is
skipped here by name. What the test changes, and only this:

- the dev ports (``localhost:8081`` … and ``127.0.0.1:2525``) become free ones, so the test
  never meets another stack on the machine;
- ``+4 min`` (the campaign's ``scheduled_at``) becomes ``+10 sec``, with dev started with
  ``SCHEDULER_MIN_LEAD_SECONDS=5``: the README waits for 配信済, the suite does not wait
  four minutes for it.

The blocks run in a temporary directory holding ``.tayori`` (dev's home) and a link to the
checkout's ``.venv``, so ``.tayori/maildir`` and ``.venv/bin/python`` mean what they mean
at the top of a checkout, and the files the examples write stay out of the checkout.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tayori.dev import PORTS
from tests.integration.test_dev import DevRun, _assert_all_gone, _free_ports

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"(?:^(<!-- not run: [^>]*-->)\n)?^```sh\n(.*?)^```$", re.M | re.S)
_MARK = "@@ block {} @@"


def using_it_blocks(readme: str) -> list[str]:
    """The ```sh blocks of the README's "Using it" section, less those marked not run."""
    start = readme.index("\n## Using it\n")
    end = readme.index("\n## ", start + 1)
    return [code for mark, code in _BLOCK.findall(readme[start:end]) if not mark]


def localize(code: str, ports: dict[str, int]) -> str:
    """The block with the test's ports and the short campaign lead (see the module doc)."""
    for name, default in PORTS.items():
        code = re.sub(rf"\b(localhost|127\.0\.0\.1):{default}\b", rf"\g<1>:{ports[name]}", code)
    return code.replace("'+4 min'", "'+10 sec'")


def test_readme_using_it_blocks_run_as_written(
    pg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = pg_home  # tayori dev's PostgreSQL lives in .tayori: see the fixture
    blocks = using_it_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 8, "a block was added or removed: check the assertions below"
    ports = _free_ports()
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    monkeypatch.setenv("SCHEDULER_MIN_LEAD_SECONDS", "5")
    dev = DevRun(tmp_path / ".tayori", ports)  # TAYORI_ADMIN_TOKEN=dev-test-token
    try:
        dev.wait_banner()
        script = ["set -euo pipefail"]
        for number, code in enumerate(blocks, 1):
            script += [f"echo '{_MARK.format(number)}'", localize(code, ports)]
            assert not re.search(r":(80[0-9][0-9]|2525)\b", script[-1]), script[-1]
        run = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "TAYORI_ADMIN_TOKEN": "dev-test-token"},
            capture_output=True,
            text=True,
            timeout=600,  # a hang must end; the blocks take well under a minute
        )
    finally:
        children = dev.stop()
    _assert_all_gone(children)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = dict(enumerate(re.split(r"^@@ block \d+ @@\n", run.stdout, flags=re.M)[1:], 1))
    # contacts: the contact created is found by tag and custom field.
    assert '"email": "taro@example.jp"' in out[1]
    # the import: done, both rows in, their tags split on 、 and ,.
    assert '"status": "done"' in out[2] and '"errors": []' in out[2]
    assert '"inserted": 2' in out[2]
    assert "hanako@example.jp" in out[2] and "jiro@example.jp" in out[2]
    # suppression: Taro is a member, can be sent to, and the link is a public /u/ page.
    assert f"127.0.0.1:{ports['suppression']}/u/" in out[3]
    assert '"allowed": true' in out[3]
    # the campaign: reserved, sent, its re-send a new draft.
    assert '"status": "reserving"' in out[4]
    assert re.search(r'"status": "(sent|aggregating|aggregated)"', out[4]), out[4]
    assert "taro@example.jp" in out[4] and '"status": "draft"' in out[4]
    # bounces: the VERP address, the soft bounce counted, the unreadable mail kept.
    assert re.search(r"^b-\S+@bounces\.localhost$", out[5], re.M), out[5]
    assert '"soft_streak": 1' in out[5] and '"items": [{' in out[5]
    # step mail, the one-click unsubscribe, the export.
    assert '"day_offset": 3' in out[6]
    assert '"state": "unsubscribed"' in out[7]
    exported = (tmp_path / "export.csv").read_bytes().decode("cp932")
    assert exported.startswith("email,name,配信停止日時(配信停止方法)")
    assert "\ntaro@example.jp,山田 太郎," in exported.replace("\r\n", "\n")
    assert '"kind": "export", "status": "done"' in out[8]
