"""Scenario modules: importing this package registers them all, in the order ``all`` runs them.

``limit`` comes first so every later rate has its reference from the same run.
Postroom's scenarios (deliver, end to end, batch ingest, scale) go in their own
modules here, imported after the peers.
"""

from bench.scenarios import (  # Postroom's own
    limit,
    peer_celery,
    peer_post_office,
    postroom_deliver,
    postroom_http,
    postroom_scale,
)

__all__ = [
    "PENDING",
    "limit",
    "peer_celery",
    "peer_post_office",
    "postroom_deliver",
    "postroom_http",
    "postroom_scale",
]

PENDING: tuple[str, ...] = ()
"""Postroom scenarios still to be written: shown as "pending" rows until they have results."""
