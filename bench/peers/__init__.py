"""Peers: the designs Postroom is compared with, run from their own venv (``bench/.venv-peers``).

Only :mod:`bench.peers.venv` is imported by the harness; the peer apps
(``celery_peer``, the generated Django project) run inside the peers' venv
and import nothing from ``bench``.
"""
