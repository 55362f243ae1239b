"""Peer: django-post-office on PostgreSQL, ``send_queued_mail --processes=2`` draining into smtp-sink.

The harness generates a minimal Django project in a temp directory (settings
as post-office's README gives them), creates a dedicated database, queues the
messages with ``post_office.mail.send_many`` (untimed, reported as queued/s)
and times ``manage.py send_queued_mail --processes=2`` from start to exit.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.peers.venv import ensure_peers_venv, peer_version
from bench.registry import Context, scenario

DB_NAME = "bench_post_office"
PROCESSES = 2

SETTINGS_PY = """\
import os

SECRET_KEY = "postroom-bench-not-secret"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = ["post_office"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["BENCH_DB_NAME"],
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "5432",
    }
}
EMAIL_BACKEND = "post_office.EmailBackend"
EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))
POST_OFFICE = {"BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"}}
"""

MANAGE_PY = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

# Queues the messages the way post-office's docs suggest for bulk: one send_many call.
BENCH_PO_PY = """\
import json
import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
import django

django.setup()
from django.db import connection
from post_office import mail
from post_office.models import Email

cmd = sys.argv[1]
if cmd == "reset":
    with connection.cursor() as cur:
        # CASCADE empties the tables that point at emails (logs, attachment links) too.
        cur.execute(f"TRUNCATE {Email._meta.db_table} CASCADE")
elif cmd == "enqueue":
    with open(sys.argv[2], encoding="utf-8") as fh:
        messages = [json.loads(line) for line in fh]
    t0 = time.monotonic()
    mail.send_many([
        {"sender": m["from"], "recipients": m["to"], "subject": m["subject"], "message": m["text"]}
        for m in messages
    ])
    print(json.dumps({"queued": len(messages), "seconds": time.monotonic() - t0}))
elif cmd == "status":
    from django.db.models import Count
    from post_office.models import STATUS

    names = {getattr(STATUS, f): f for f in STATUS._fields}
    rows = Email.objects.values_list("status").annotate(n=Count("id"))
    print(json.dumps({names.get(status, str(status)): n for status, n in rows}))
"""


def _require_postgres() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=3):
            return
    except OSError as e:
        raise RuntimeError(
            f"PostgreSQL is not reachable on 127.0.0.1:5432 ({e}); start it: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        ) from None


def _sql(python: Path, statement: str) -> None:
    """Run one statement on the ``postgres`` database (autocommit: CREATE/DROP DATABASE need it)."""
    code = (
        "import psycopg, sys\n"
        "with psycopg.connect('host=127.0.0.1 port=5432 user=postgres dbname=postgres', autocommit=True) as c:\n"
        "    c.execute(sys.argv[1])\n"
    )
    subprocess.run(
        [str(python), "-c", code, statement], check=True, timeout=120, capture_output=True
    )


def _django(
    project: Path, python: Path, env: dict[str, str], *args: str, timeout_s: float = 300
) -> str:
    out = subprocess.run(
        [str(python), *args],
        cwd=project,
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)


@contextlib.contextmanager
def _setup(ctx: Context) -> Iterator[dict[str, Any]]:
    _require_postgres()
    python = ensure_peers_venv()
    for dist in ("django-post-office", "django", "psycopg"):
        ctx.info[dist] = peer_version(python, dist)
    ctx.info["command"] = f"manage.py send_queued_mail --processes={PROCESSES}"
    ctx.info["settings"] = (
        "post-office defaults (BATCH_SIZE 100, THREADS_PER_PROCESS 5, LOG_LEVEL 2)"
    )
    project = ctx.work_dir / "project"
    project.mkdir()
    (project / "settings.py").write_text(SETTINGS_PY)
    (project / "manage.py").write_text(MANAGE_PY)
    (project / "bench_po.py").write_text(BENCH_PO_PY)
    _sql(python, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    _sql(python, f"CREATE DATABASE {DB_NAME}")
    try:
        _django(project, python, {"BENCH_DB_NAME": DB_NAME}, "manage.py", "migrate", "--no-input")
        yield {"python": python, "project": project}
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _sql(python, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


@scenario(
    "peer-post-office",
    primary="delivered_per_s",
    messages=5_000,
    quick_messages=200,
    setup=_setup,
    services=("postgres",),
    description=f"django-post-office on PostgreSQL: send_many, then send_queued_mail "
    f"--processes={PROCESSES} → smtp-sink (start to exit)",
)
def peer_post_office(ctx: Context) -> dict[str, float]:
    """A database-backed queue most Django shops know, with its documented command."""
    python: Path = ctx.state["python"]
    project: Path = ctx.state["project"]
    sink = ctx.sink()
    env = {"BENCH_DB_NAME": DB_NAME, "BENCH_SMTP_PORT": str(sink.port)}
    _django(project, python, env, "bench_po.py", "reset")
    messages_file = ctx.messages_file()
    queued = json.loads(
        _django(
            project,
            python,
            env,
            "bench_po.py",
            "enqueue",
            str(messages_file),
            timeout_s=ctx.remaining_s(),
        )
    )
    t0 = time.monotonic()
    sender = ctx.procs.start(
        "send_queued_mail",
        [
            str(python),
            "manage.py",
            "send_queued_mail",
            f"--processes={PROCESSES}",
            f"--lockfile={ctx.work_dir / 'post_office'}",
        ],
        env={**env, "PYTHONUNBUFFERED": "1"},
        cwd=project,
    )
    code = sender.wait(timeout_s=ctx.remaining_s())
    t1 = time.monotonic()
    if code != 0:
        raise RuntimeError(f"send_queued_mail exited with {code}: {sender.log_tail()}")
    t_sink = sink.wait_for(ctx.messages, timeout_s=10)
    status = json.loads(_django(project, python, env, "bench_po.py", "status"))
    if status.get("sent") != ctx.messages:
        raise RuntimeError(f"expected {ctx.messages} sent, database says {status}")
    print(f"  post-office statuses: {status}", file=sys.stderr)
    return {
        "delivered_per_s": ctx.messages / (t1 - t0),
        "queued_per_s": queued["queued"] / queued["seconds"],
        "sender_cpu_ms_per_msg": 1000 * (sender.exit_cpu_s or 0.0) / ctx.messages,
        "sink_complete_s": t_sink - t0,
        "elapsed_s": t1 - t0,
    }
