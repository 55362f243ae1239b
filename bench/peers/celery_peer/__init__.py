"""The Celery peer: a FastAPI producer and a Celery worker, as in their docs (runs in .venv-peers)."""
