"""Which address a console login is counted against (login throttling behind a proxy)."""

from __future__ import annotations

import pytest

from libs.common.settings import load
from services.console.auth import client_address, trusted_networks
from services.console.settings import ConsoleSettings

INGRESS = trusted_networks(["10.0.0.0/8", "fd00::/8"])


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert client_address("10.1.2.3", "203.0.113.9", ()) == "10.1.2.3"
    assert client_address(None, None, ()) == "unknown"


def test_a_trusted_proxy_names_the_client_in_x_forwarded_for() -> None:
    assert client_address("10.1.2.3", "203.0.113.9", INGRESS) == "203.0.113.9"
    # through two proxies of ours: the first untrusted hop from the right
    assert client_address("10.1.2.3", "203.0.113.9, 10.4.4.4", INGRESS) == "203.0.113.9"
    assert client_address("fd00::5", "2001:db8::7", INGRESS) == "2001:db8::7"


def test_what_a_client_writes_on_the_left_is_not_believed() -> None:
    # The client sent "X-Forwarded-For: 198.51.100.1" itself; the proxy appended its peer.
    assert client_address("10.1.2.3", "198.51.100.1, 203.0.113.9", INGRESS) == "203.0.113.9"


def test_an_untrusted_peer_cannot_choose_its_address() -> None:
    assert client_address("203.0.113.9", "198.51.100.1", INGRESS) == "203.0.113.9"


def test_a_malformed_hop_stops_the_walk_at_the_last_address_believed() -> None:
    assert client_address("10.1.2.3", "junk", INGRESS) == "10.1.2.3"
    assert client_address("10.1.2.3", "203.0.113.9, junk", INGRESS) == "10.1.2.3"
    assert client_address("10.1.2.3", "", INGRESS) == "10.1.2.3"


def test_only_proxies_in_the_header_leave_the_leftmost_of_them() -> None:
    assert client_address("10.1.2.3", "10.9.9.9, 10.4.4.4", INGRESS) == "10.9.9.9"


def test_the_setting_takes_networks_and_refuses_anything_else() -> None:
    settings = load(ConsoleSettings, {"CONSOLE_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"})
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    with pytest.raises(ValueError, match="CONSOLE_TRUSTED_PROXIES"):
        load(ConsoleSettings, {"CONSOLE_TRUSTED_PROXIES": "ingress-nginx"})
