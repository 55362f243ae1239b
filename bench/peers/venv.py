"""The peers' virtualenv: created on first use from ``requirements-peers.txt``, rebuilt when it changes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

__all__ = ["PEERS_VENV", "REQUIREMENTS", "ensure_peers_venv", "peer_version"]

BENCH_DIR = Path(__file__).resolve().parent.parent
PEERS_VENV = BENCH_DIR / ".venv-peers"
REQUIREMENTS = BENCH_DIR / "requirements-peers.txt"
_STAMP = PEERS_VENV / ".requirements.sha256"
INSTALL_TIMEOUT_S = 900


def _base_python() -> str:
    """The interpreter Postroom's venv was made from (same version), not the venv's own."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return str(base)


def ensure_peers_venv() -> Path:
    """Return the peers' python, creating or refreshing the venv first if needed."""
    python = PEERS_VENV / "bin" / "python"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and _STAMP.exists() and _STAMP.read_text().strip() == digest:
        return python
    print(f"creating {PEERS_VENV} from {REQUIREMENTS.name} …", file=sys.stderr, flush=True)
    subprocess.run(
        [_base_python(), "-m", "venv", "--clear", str(PEERS_VENV)], check=True, timeout=300
    )
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(REQUIREMENTS),
        ],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    _STAMP.write_text(digest + "\n")
    return python


def peer_version(python: Path, distribution: str) -> str:
    """Installed version of a distribution in the peers' venv."""
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()
