"""The FastAPI producer: validate with pydantic, enqueue the Celery task, answer 202."""

from celery_peer.tasks import send_email
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, NameEmail

app = FastAPI(title="celery peer")


class EmailIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    sender: NameEmail = Field(alias="from")
    to: list[NameEmail] = Field(min_length=1)
    subject: str = Field(min_length=1, max_length=998)
    text: str


class Queued(BaseModel):
    id: str


# A plain "def": .delay() blocks on the broker, so FastAPI runs it in its thread pool.
@app.post("/messages", status_code=202)
def enqueue(email: EmailIn) -> Queued:
    result = send_email.delay(
        str(email.sender), [str(a) for a in email.to], email.subject, email.text
    )
    return Queued(id=result.id)


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
