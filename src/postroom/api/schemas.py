"""Request shapes, for the OpenAPI docs. Validation itself is `domain.validate` (one rule, every door)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Address = str | dict[str, str]


class AttachmentIn(BaseModel):
    filename: str
    content_type: str | None = Field(None, description="guessed from the filename when absent")
    content: str = Field(description="base64")
    content_id: str | None = Field(None, description="for inline parts referenced as cid: in the html")


class MessageIn(BaseModel):
    model_config = {"populate_by_name": True, "extra": "forbid"}

    from_: Address = Field(alias="from", examples=["Shop <shop@example.com>"])
    to: list[Address] = Field(default_factory=list, examples=[["Ada <ada@example.org>"]])
    cc: list[Address] = Field(default_factory=list)
    bcc: list[Address] = Field(default_factory=list)
    reply_to: list[Address] = Field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    attachments: list[AttachmentIn] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    send_at: str | None = Field(None, description="ISO 8601; scheduled send", examples=["2030-01-31T09:00:00Z"])
    priority: Literal["high", "normal", "low"] = "normal"


class BatchIn(BaseModel):
    messages: list[MessageIn] = Field(max_length=100_000)
    atomic: bool = Field(False, description="all or nothing: one invalid message rejects the batch")


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }
