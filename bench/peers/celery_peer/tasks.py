"""The Celery app and its one task: build an ``EmailMessage`` and send it with ``smtplib``.

Written as Celery's docs and most FastAPI + Celery tutorials do it, with no
tuning: default prefork pool, default concurrency (CPU count), default
prefetch, no result backend, one SMTP connection per message.
"""

import os
import smtplib
from email.message import EmailMessage

from celery import Celery

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "postroom-bench-celery")
SMTP_HOST = os.environ.get("BENCH_SMTP_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))

app = Celery("celery_peer", broker=BROKER_URL)
# A dedicated queue so the benchmark never touches another app's "celery" queue on the shared broker.
app.conf.task_default_queue = QUEUE
app.conf.broker_connection_retry_on_startup = True


@app.task
def send_email(sender: str, to: list[str], subject: str, text: str) -> None:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg.set_content(text)
    with smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=30) as smtp:
        smtp.send_message(msg)
