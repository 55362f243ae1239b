"""Deterministic, personalised ~2 KB test messages in Postroom's JSON API shape.

Every scenario, Postroom's and the peers', sends exactly these messages, so the
figures compare like with like. Message ``i`` is the same whatever ``n`` is
asked for (each message is seeded by its own index), so a batch of 1,000 and
a run of 100,000 share their first 1,000 messages.

    >>> from bench.messages import generate
    >>> m = generate(1)[0]
    >>> sorted(m)
    ['from', 'subject', 'text', 'to']
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "SENDER",
    "TEXT_SIZE_B",
    "envelope",
    "generate",
    "iter_messages",
    "message",
    "write_jsonl",
]

SENDER = "Postroom Bench <bench@example.com>"
TEXT_SIZE_B = 2000
"""Target size of the body text, like ``smtp-source -l 2000`` in the limit scenario."""

_FIRST = (
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Margaret",
    "Dennis",
    "Barbara",
    "Ken",
    "Frances",
    "Edsger",
    "Radia",
    "Niklaus",
    "Hedy",
    "Tim",
    "Katherine",
    "Guido",
    "Sophie",
    "Bjarne",
    "Joan",
    "Donald",
    "Shafi",
    "Leslie",
    "Anita",
    "Robin",
    # A few non-ASCII names, so header encoding is exercised as in real traffic.
    "José",
    "Zoë",
    "Jürgen",
    "Søren",
    "Ángela",
    "Łukasz",
)
_LAST = (
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Ritchie",
    "Liskov",
    "Thompson",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Wirth",
    "Lamarr",
    "Berners-Lee",
    "Johnson",
    "van Rossum",
    "Wilson",
    "Stroustrup",
    "Clarke",
    "Knuth",
    "Goldwasser",
    "Lamport",
    "Borg",
    "Milner",
    "Müller",
    "Nørgaard",
    "García",
    "Kowalski",
)
_SUBJECTS = (
    "Your order #{order} has shipped",
    "{first}, your invoice {order} is ready",
    "Reminder: appointment on {date}",
    "Welcome aboard, {first}!",
    "Your weekly summary ({date})",
    "Password reset requested for {email}",
    "{first}, 3 new comments on your post",
    "Receipt for payment {order}",
)
_SENTENCES = (
    "Thank you for being with us; we are glad you chose our service.",
    "Your account number is {account} and your reference for this message is {order}.",
    "If anything in this message looks wrong, reply and a person will look into it.",
    "The total of {amount} EUR was charged to the card ending in {card}.",
    "We expect delivery on {date}, between 08:00 and 18:00 local time.",
    "You can follow every step on your dashboard, which is updated every few minutes.",
    "Our support team answers within one working day, often much sooner.",
    "This summary covers the activity of the last seven days on your workspace.",
    "Three documents were shared with you and two tasks are waiting for your review.",
    "To keep your account safe, never share this message or its links with anyone.",
    "If you did not ask for this, you can ignore this message: nothing will change.",
    "Your plan renews on {date}; you can change or cancel it at any time before then.",
    "We have updated our terms; the changes take effect thirty days from today.",
    "Items in your basket are reserved for forty-eight hours after this message.",
    "Your feedback helps: tell us in two minutes how we did this time.",
    "The meeting room on the second floor is booked for you from 14:00 to 15:30.",
)


def _fields(i: int, rng: random.Random) -> dict[str, str]:
    first = _FIRST[rng.randrange(len(_FIRST))]
    last = _LAST[rng.randrange(len(_LAST))]
    return {
        "first": first,
        "last": last,
        "email": f"user{i}@example.com",
        "order": f"{rng.randrange(100_000, 999_999)}-{i}",
        "account": f"AC{rng.randrange(10**7, 10**8)}",
        "amount": f"{rng.randrange(1, 2000)}.{rng.randrange(100):02d}",
        "card": f"{rng.randrange(10_000):04d}",
        "date": f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
    }


def message(i: int) -> dict[str, Any]:
    """Message number ``i`` (0-based) for recipient ``user{i}@example.com``."""
    rng = random.Random(i * 7919 + 17)
    f = _fields(i, rng)
    closing = "\nKind regards,\nThe Postroom Bench team\n"
    budget = TEXT_SIZE_B - len(closing)
    # One sentence per line (all well under SMTP's 998-octet limit), paragraphs of 2-4.
    parts = ["Hello {first},\n"]
    size = len(parts[0])
    n_sentences = len(_SENTENCES)
    while size < budget:
        paragraph = (
            "\n"
            + "\n".join(_SENTENCES[rng.randrange(n_sentences)] for _ in range(rng.randrange(2, 5)))
            + "\n"
        )
        parts.append(paragraph)
        size += len(paragraph) + 8  # placeholders grow a little when filled in
    body = "".join(parts).format(**f)
    if len(body) > budget:
        body = body[: body.rfind("\n", 0, budget) + 1]
    return {
        "from": SENDER,
        "to": [f"{f['first']} {f['last']} <{f['email']}>"],
        "subject": _SUBJECTS[rng.randrange(len(_SUBJECTS))].format(**f),
        "text": body + closing,
    }


@lru_cache(maxsize=4)
def _cached(n: int, start: int) -> tuple[dict[str, Any], ...]:
    return tuple(message(i) for i in range(start, start + n))


def generate(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Messages ``start … start+n-1`` as a new list of dicts (cached; safe to mutate the list)."""
    return list(_cached(n, start))


def iter_messages(n: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """The same messages as :func:`generate`, lazily, for very large counts."""
    for i in range(start, start + n):
        yield message(i)


def envelope(msg: dict[str, Any]) -> tuple[str, list[str]]:
    """SMTP envelope (sender, recipients) of a message: the bare addresses."""
    return parseaddr(msg["from"])[1], [parseaddr(a)[1] for a in msg["to"]]


def write_jsonl(path: Path, n: int, start: int = 0) -> Path:
    """Write the messages one JSON object per line, for peers running in another venv."""
    with path.open("w", encoding="utf-8") as fh:
        for m in iter_messages(n, start):
            fh.write(json.dumps(m, ensure_ascii=False))
            fh.write("\n")
    return path
