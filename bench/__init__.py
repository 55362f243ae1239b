"""Postroom's benchmark harness: scenarios against smtp-sink, peers side by side, one results file.

Run ``python -m bench --help``. Add a scenario with :func:`bench.registry.scenario`;
reuse the messages from :mod:`bench.messages` and the sink from :mod:`bench.sink`.
"""
