"""Request bodies, validated at the edge. Unknown fields are refused by name."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name", "refusal" from clients
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None

    def text(self) -> str:
        if isinstance(self.content, list):
            bad = [p.type for p in self.content if p.type != "text"]
            if bad:
                raise ValueError(f"content parts of type {bad[0]!r} are not supported; send text")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] | None = None
    correction: str | None = Field(default=None, min_length=1)
    response_id: str | None = None
    rating: int | None = Field(default=None, ge=-1, le=1)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictInt | None = Field(default=None, ge=0)  # strict: true is not version 1
    id: str | None = None


class SchedulerUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enable_background_training: bool | None = None
    max_idle_time_ms: int | None = None
    min_idle_time_ms: int | None = None
    check_interval_ms: int | None = None
    max_cpu_usage: float | None = None
    pause_on_inference: bool | None = None
    min_training_share: float | None = None
    starved_after_ms: int | None = None
