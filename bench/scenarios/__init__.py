"""Scenario modules: importing this package registers them all, in the order ``all`` runs them.

``limit`` comes first so every later rate has its reference from the same run.
Postroom's scenarios (deliver, end to end, batch ingest, scale) go in their own
modules here, imported after the peers.
"""

from bench.scenarios import limit, peer_celery, peer_post_office

__all__ = ["PENDING", "limit", "peer_celery", "peer_post_office"]

PENDING: tuple[str, ...] = (
    "deliver-sqlite",
    "deliver-postgres",
    "end-to-end-sqlite",
    "end-to-end-postgres",
    "batch-ingest-sqlite",
    "batch-ingest-postgres",
    "scale-1m",
)
"""Postroom scenarios still to be written: shown as "pending" rows until they have results."""
