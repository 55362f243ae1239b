"""The command line as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

POSTROOM = [sys.executable, "-m", "postroom.cli"]


def run(tmp_path: Path, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    e["POSTROOM_DATABASE_URL"] = f"sqlite:///{tmp_path}/p.db"
    e.update(env)
    return subprocess.run([*POSTROOM, *args], cwd=tmp_path, env=e, capture_output=True, text=True, input=input, timeout=60)


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    made = run(tmp_path, "keys", "create", "--name", "billing")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("pr_") and "shown only now" in made.stderr
    listed = run(tmp_path, "keys", "list")
    line = next(ln for ln in listed.stdout.splitlines() if "billing" in ln)
    assert secret[:10] in line and "active" in line and secret not in listed.stdout
    key_id = line.split()[0]
    assert run(tmp_path, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in run(tmp_path, "keys", "list").stdout
    bad = run(tmp_path, "keys", "revoke", "nope")
    assert bad.returncode != 0 and "not found" in bad.stderr


def test_send_queues_straight_into_the_database(tmp_path: Path) -> None:
    r = run(tmp_path, "send", "--to", "ada@example.org", "--subject", "Hi", "--text", "-", input="from stdin\n")
    assert r.returncode == 0, r.stderr
    msg_id, status = r.stdout.split()
    assert status == "queued"
    import sqlite3

    with sqlite3.connect(tmp_path / "p.db") as c:
        assert c.execute("SELECT source FROM messages WHERE id = ?", (msg_id,)).fetchone() == ("cli",)


def test_send_with_a_bad_address_says_which_field(tmp_path: Path) -> None:
    r = run(tmp_path, "send", "--to", "not-an-address", "--text", "x")
    assert r.returncode != 0
    assert "to.0" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_setting_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    r = run(tmp_path, "run", POSTROOM_PORT="eighty")
    assert r.returncode != 0
    assert "configuration error: port" in r.stderr and "Traceback" not in r.stderr


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    r = run(tmp_path, "migrate")
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
