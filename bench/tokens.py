"""Per-token cost of the unsubscribe link (issue 18 #9), a micro-benchmark with timeit.

    python -m bench.tokens [--number N]

The sender makes one link and its headers per mail (``UnsubscribeLinks.headers``), at
~3,000 mails/s; this prints µs per call of that, of ``token`` alone and of ``read`` (the
page's side), best of five runs, so a change of the token's form can be weighed against
the sender's budget (headers well under 20 µs a mail). No stack is started.
"""

from __future__ import annotations

import argparse
import timeit

from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget

KEYS = "k2:bench-signing-key-two,k1:bench-signing-key-one"
TARGET = UnsubscribeTarget(1_234_567, 28, "6f3a1c52-8d4e-4b7a-9c2f-1e5d7b9a0c34")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=100_000)
    number = parser.parse_args().number
    links = UnsubscribeLinks(KEYS, "https://mail.example.jp")
    token = links.token(TARGET)
    cases = {
        "headers (sender, per mail)": lambda: links.headers(TARGET),
        "token": lambda: links.token(TARGET),
        "read (page)": lambda: links.read(token),
    }
    print(f"token: {token} ({len(token)} chars)")
    for name, call in cases.items():
        best = min(timeit.repeat(call, number=number, repeat=5)) / number
        print(f"{name:28} {best * 1e6:6.2f} µs")


if __name__ == "__main__":
    main()
