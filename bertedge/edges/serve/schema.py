"""The HTTP request and response bodies, the error body, and parsing a request into items.

Items are the runtime's own `Pair` (text, text_pair or None); predictions its `Result` dicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag, ValidationError
from starlette.requests import Request

from bertedge.runtime.records import Pair
from bertedge.runtime.text import has_text

Check = Callable[[Pair], Pair | str]  # the predictor's item check: the item, or what is wrong with it

# ----------------------------------------------------------------------------- bodies


class TextPair(BaseModel):
    """One item as an object; text_pair is the second text of a sentence pair (or QA context)."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    text_pair: StrictStr | None = None


class QuestionContext(BaseModel):
    """A QA item as an object (the same as {"text": question, "text_pair": context})."""

    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr


def item_kind(value: Any) -> str | None:
    """The union branch an item belongs to, chosen by its JSON type (so errors name one branch)."""
    if isinstance(value, str):
        return "~text"
    if isinstance(value, list | tuple):
        return "~pair"
    if isinstance(value, dict) and ("question" in value or "context" in value):
        return "~qa"
    return "~object" if isinstance(value, dict | TextPair | QuestionContext) else None


def texts_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "~one"
    return "~list" if isinstance(value, list) else None


ITEM_ERROR = ('expected a string, a ["text", "text_pair"] list, a {"text", "text_pair"} object '
              'or a {"question", "context"} object')
ItemModel = Annotated[
    Annotated[StrictStr, Tag("~text")] | Annotated[tuple[StrictStr, StrictStr], Tag("~pair")]
    | Annotated[TextPair, Tag("~object")] | Annotated[QuestionContext, Tag("~qa")],
    Discriminator(item_kind, custom_error_type="item_type", custom_error_message=ITEM_ERROR)]


class PredictRequest(BaseModel):
    """Texts to predict: one string, or a list of items (strings, pairs, or objects)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": "a gripping, beautifully shot film"},
        {"texts": ["a gripping film", ["is it good?", "it is great"],
                   {"text": "a man plays guitar", "text_pair": "someone makes music"}]},
        {"texts": [{"question": "where does john live?", "context": "john lives in paris"}]}]})
    texts: Annotated[
        Annotated[StrictStr, Tag("~one")] | Annotated[list[ItemModel], Tag("~list")],
        Discriminator(texts_kind, custom_error_type="texts_type",
                      custom_error_message="expected a string or a list of items"),
        Field(description="One text, or a list of items; each item is a string, a "
                          "[text, text_pair] list, a {text, text_pair} object or (QA) a "
                          "{question, context} object."),
    ]


class ModelSummary(BaseModel):
    """Which model answered."""

    task: str
    precision: str | None
    model_sha256: str | None
    digest: str | None = Field(None, description="the bundle digest `bertedge package` printed")


class PredictResponse(BaseModel):
    """One prediction per input item, in input order (the same dicts `bertedge predict` prints)."""

    predictions: list[dict[str, Any]] = Field(description="e.g. {label, score, probabilities} "
                                              "for classification; truncated: true when cut")
    truncated: int = Field(description="how many items were longer than max_length tokens")
    model: ModelSummary


class Problem(BaseModel):
    field: str
    message: str
    limit: int | None = None


class ErrorBody(BaseModel):
    """Every 4xx / 5xx answer."""

    error: str
    problems: list[Problem] = []


class ApiError(Exception):
    """A request the server refuses: HTTP status, a message and the fields at fault."""

    def __init__(self, status: int, message: str, problems: Sequence[Problem] = (),
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.problems = status, message, list(problems)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON answer: {"error", "problems"}."""
        return ErrorBody(error=self.message, problems=self.problems).model_dump(exclude_none=True)


def field_name(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path; union branch tags (~...) are left out.

    >>> field_name(("texts", "~list", 3, "~object", "text_pair"))
    'texts[3].text_pair'
    """
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not part.startswith("~"):
            name += f".{part}" if name else part
    return name or "body"


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A 422 listing every pydantic / FastAPI validation problem with its field."""
    problems = [Problem(field=field_name(tuple(e.get("loc", ())) or ("body",)), message=e["msg"])
                for e in errors]
    return ApiError(422, f"invalid request: {len(problems)} problem(s)", problems)



# ----------------------------------------------------------------------------- parsing


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_big = ApiError(413, f"request body is larger than {limit} bytes",
                       [Problem(field="body", message="too large", limit=limit)])
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON; a 400 naming the byte or the line and column at fault."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})",
                       [Problem(field="body", message=f"invalid UTF-8 at byte {e.start}")]) from None
    if not text.strip():
        raise ApiError(400, "request body is empty; send JSON like {\"texts\": [\"a text\"]}",
                       [Problem(field="body", message="empty")])
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} "
                       f"column {e.colno})", [Problem(field="body", message=e.msg)]) from None
    except ValueError as e:  # an integer past Python's int-string digit limit (4,300 digits)
        raise ApiError(400, f"request body holds a number JSON cannot take here ({str(e)[:120]})",
                       [Problem(field="body", message="number too long")]) from None
    except RecursionError:
        raise ApiError(400, "request body nests JSON too deeply",
                       [Problem(field="body", message="nested too deeply")]) from None


def as_tuple(item: str | tuple[str, str] | TextPair | QuestionContext) -> Pair:
    """A validated item as the runtime's (text, text_pair or None)."""
    if isinstance(item, TextPair):
        return item.text, item.text_pair
    if isinstance(item, QuestionContext):
        return item.question, item.context
    return (item, None) if isinstance(item, str) else item


def as_request(payload: Any) -> Any:
    """The other body forms as {"texts": ...}: one item as the whole body ({"text", "text_pair"}
    or {"question", "context"}), and text-embeddings-inference's {"inputs": ...} (with its
    "truncate": true, which is what bertedge does anyway; false is refused, not ignored).

    >>> as_request({"text": "a", "text_pair": "b"}), as_request({"inputs": ["a", "b"], "truncate": True})
    ({'texts': [{'text': 'a', 'text_pair': 'b'}]}, {'texts': ['a', 'b']})
    """
    if not isinstance(payload, dict) or "texts" in payload:
        return payload
    if "inputs" in payload and set(payload) <= {"inputs", "truncate"} and payload.get("truncate", True) is True:
        return {"texts": payload["inputs"]}
    if payload.keys() & {"text", "question", "context"}:
        return {"texts": [payload]}
    return payload


def parse_items(payload: Any, max_texts: int, max_chars: int, check: Check) -> list[Pair]:
    """Validate a decoded body into (text, pair) items; one 422 listing every problem.

    Args:
        payload: the decoded JSON body, in any form `as_request` takes.
        max_texts: most items per request.
        max_chars: most characters per text (and per text_pair).
        check: the predictor's item check (empty texts, the task's own rules).
    """
    payload = as_request(payload)
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if isinstance(texts, list) and len(texts) > max_texts:  # before validating them all
        raise ApiError(422, f"too many texts: {len(texts)}, the limit is {max_texts} per request",
                       [Problem(field="texts", message=f"{len(texts)} texts", limit=max_texts)])
    try:
        request = PredictRequest.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    raw = [request.texts] if isinstance(request.texts, str) else request.texts
    if not raw:
        raise ApiError(422, f"texts is an empty list; send 1 to {max_texts} texts",
                       [Problem(field="texts", message="empty list", limit=max_texts)])
    items: list[Pair] = []
    problems: list[Problem] = []
    for i, item in enumerate(raw):
        text, pair = as_tuple(item)
        where = "texts" if isinstance(request.texts, str) else f"texts[{i}]"
        found = item_problems(where, text, pair, max_chars)
        checked = check((text, pair)) if not found else (text, pair)
        problems += found + ([Problem(field=where, message=checked)] if isinstance(checked, str) else [])
        items.append((text, pair))
    if problems:
        raise ApiError(422, f"invalid request: {len(problems)} problem(s)", problems)
    return items


def item_problems(where: str, text: str, pair: str | None, max_chars: int) -> list[Problem]:
    """Empty or over-long parts of one item."""
    problems = []
    for part, value in (("text", text), ("text_pair", pair)):
        if value is None:
            continue
        name = where if part == "text" and pair is None else f"{where}.{part}"
        if not has_text(value):  # blank, or only control / zero-width characters
            problems.append(Problem(field=name, message=f"empty {part}"))
        elif len(value) > max_chars:
            problems.append(Problem(field=name, limit=max_chars,
                                    message=f"{len(value)} characters, the limit is {max_chars}"))
    return problems


