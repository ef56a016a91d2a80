"""How the Langfuse sender classifies each answer: sent, retry or failed, split or stop.

The SDK call is replaced by a stub that answers or raises what a test names, so each answer the
classification distinguishes is tested on its own: 413 (split, a lone score fails), a 207 with
per-score errors (their `status` decides retry or failed), 400 and other 4xx, an answer with no
status, the edges of the 4xx/5xx ranges, and transport errors. The stand-in tests
(test_langfuse_sender.py) cover the same paths over real HTTP for the common answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
import pydantic
import pytest
from langfuse.api import CreateScoreBatchResults
from langfuse.api.core import ApiError

from worker.langfuse_sender import (
    Delivery,
    DeliveryOutcome,
    LangfuseSender,
    ScoreItem,
    _classify_status,
    _RequestFailed,
    _single_rejection,
    _Split,
    score_id_for,
)

RETRY, FAILED, SENT = DeliveryOutcome.retry, DeliveryOutcome.failed, DeliveryOutcome.sent
TWIN = UUID("6f9619ff-8b86-4011-b42d-00c04fc964ff")


def item(i: int, *, user: int | None = None) -> ScoreItem:
    trace = f"trace-{i}"
    return ScoreItem(
        item_id=f"row-{i}",
        score_id=score_id_for(TWIN, trace, UUID(int=user if user is not None else i + 1)),
        trace_id=trace,
        name="user_feedback",
        value=1.0,
        timestamp=datetime(2026, 11, 30, tzinfo=UTC),
    )


def results(accepted: int, rejected: int, errors: list[dict[str, Any]]) -> CreateScoreBatchResults:
    return CreateScoreBatchResults.model_validate(
        {"accepted": accepted, "rejected": rejected, "errors": errors}
    )


Answer = Callable[[list[Any]], object]


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Answer], LangfuseSender]]:
    """A sender whose SDK call runs `answer(request)`: its return value or its exception."""
    senders: list[LangfuseSender] = []

    def make(answer: Answer) -> LangfuseSender:
        sender = LangfuseSender("http://127.0.0.1:9", "pk", "sk", 2.0)
        senders.append(sender)

        def create(*, request: list[Any], request_options: object) -> object:
            return answer(request)

        monkeypatch.setattr(sender._api.scores, "create", create)
        return sender

    yield make
    for sender in senders:
        sender.close()


def raise_(exc: BaseException) -> Answer:
    def answer(request: list[Any]) -> object:
        raise exc

    return answer


def view(deliveries: list[Delivery]) -> list[tuple[str, DeliveryOutcome, str | None]]:
    return [(d.item_id, d.outcome, d.error) for d in deliveries]


# ------------------------------------------------------------------------------ whole-request


@pytest.mark.parametrize(
    ("status", "outcome", "stop"),
    [
        (400, FAILED, False),
        (401, FAILED, True),
        (403, FAILED, True),
        (404, FAILED, True),
        (405, FAILED, True),
        (414, FAILED, False),
        (422, FAILED, False),
        (428, FAILED, False),
        (429, RETRY, True),
        (430, FAILED, False),
        (499, FAILED, False),
        (500, RETRY, True),
        (503, RETRY, True),
        (599, RETRY, True),
    ],
)
def test_an_error_status_is_failed_or_retried(
    status: int, outcome: DeliveryOutcome, stop: bool
) -> None:
    result = _classify_status(ApiError(status_code=status, body={"message": "no"}))
    assert result == _RequestFailed(outcome=outcome, error=f"HTTP {status}: no", stop_batch=stop)


@pytest.mark.parametrize("status", [None, 200, 302, 399, 600, 601])
def test_an_answer_with_no_error_status_is_unconfirmed_and_retried(status: int | None) -> None:
    result = _classify_status(ApiError(status_code=status, body=None))
    assert result == _RequestFailed(
        outcome=RETRY,
        error=f"unexpected response from Langfuse (HTTP {status})",
        stop_batch=True,
    )


def test_a_400_without_a_body_names_the_status_phrase() -> None:
    result = _classify_status(ApiError(status_code=400, body=None))
    assert result == _RequestFailed(outcome=FAILED, error="HTTP 400: Bad Request", stop_batch=False)


def test_413_asks_for_a_split() -> None:
    result = _classify_status(ApiError(status_code=413, body=None))
    assert result == _Split(reason="HTTP 413: Request Entity Too Large")


def test_413_splits_the_chunk_until_the_too_large_score_fails_alone(
    stubbed: Callable[[Answer], LangfuseSender],
) -> None:
    requests: list[list[str]] = []

    def answer(request: list[Any]) -> object:
        requests.append([r.trace_id for r in request])
        if len(request) > 1 or request[0].trace_id == "trace-2":
            raise ApiError(status_code=413, body=None)
        return None

    deliveries = stubbed(answer).send([item(i) for i in range(4)])

    assert view(deliveries) == [
        ("row-0", SENT, None),
        ("row-1", SENT, None),
        ("row-2", FAILED, "HTTP 413: Request Entity Too Large"),
        ("row-3", SENT, None),
    ]
    assert requests == [
        ["trace-0", "trace-1", "trace-2", "trace-3"],
        ["trace-0", "trace-1"],
        ["trace-0"],
        ["trace-1"],
        ["trace-2", "trace-3"],
        ["trace-2"],
        ["trace-3"],
    ]


def test_a_400_fails_its_chunk_only_and_is_logged(
    stubbed: Callable[[Answer], LangfuseSender], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def answer(request: list[Any]) -> object:
        calls.append(len(request))
        if len(calls) == 1:
            raise ApiError(status_code=400, body={"message": "bad score"})
        return None

    sender = stubbed(answer)
    sender.batch_size = 2
    with caplog.at_level(logging.WARNING, logger="worker.langfuse_sender"):
        deliveries = sender.send([item(i) for i in range(4)])

    assert view(deliveries) == [
        ("row-0", FAILED, "HTTP 400: bad score"),
        ("row-1", FAILED, "HTTP 400: bad score"),
        ("row-2", SENT, None),
        ("row-3", SENT, None),
    ]
    assert calls == [2, 2]
    assert [r.getMessage() for r in caplog.records] == [
        "Langfuse request of 2 scores: HTTP 400: bad score (failed)"
    ]


def test_a_transport_error_says_what_failed(stubbed: Callable[[Answer], LangfuseSender]) -> None:
    assert view(stubbed(raise_(httpx.ReadError("reset by peer"))).send([item(0)])) == [
        ("row-0", RETRY, "network error: reset by peer")
    ]
    assert view(stubbed(raise_(httpx.ReadError(""))).send([item(0)])) == [
        ("row-0", RETRY, "network error: ReadError")
    ]
    assert view(stubbed(raise_(httpx.ReadTimeout("slow"))).send([item(0)])) == [
        ("row-0", RETRY, "timeout after 2.0s waiting for a response")
    ]


def test_an_unreadable_body_is_retried(stubbed: Callable[[Answer], LangfuseSender]) -> None:
    try:
        CreateScoreBatchResults.model_validate({"accepted": "many"})
    except pydantic.ValidationError as exc:
        invalid = exc
    deliveries = stubbed(raise_(invalid)).send([item(0), item(1)])
    assert view(deliveries) == [
        ("row-0", RETRY, "unexpected response body from Langfuse"),
        ("row-1", RETRY, "unexpected response body from Langfuse"),
    ]


# ------------------------------------------------------------------------------ 207 answers


@pytest.mark.parametrize(
    ("answer", "sent"),
    [
        (results(2, 0, []), True),
        (results(3, 0, []), True),
        (results(1, 0, []), False),  # one score neither accepted nor rejected
        (results(2, 0, [{"message": "odd"}]), False),  # an error although all accepted
        (results(2, 1, []), False),  # a rejection although all accepted
        (results(0, 2, [{"message": "bad"}]), False),
    ],
)
def test_a_207_confirms_a_chunk_only_when_every_score_was_accepted(
    stubbed: Callable[[Answer], LangfuseSender], answer: CreateScoreBatchResults, sent: bool
) -> None:
    calls: list[int] = []

    def respond(request: list[Any]) -> object:
        calls.append(len(request))
        return answer if len(request) == 2 else None

    deliveries = stubbed(respond).send([item(0), item(1)])

    assert {d.outcome for d in deliveries} == {SENT}
    # A chunk Langfuse did not wholly confirm is sent again in halves.
    assert calls == ([2] if sent else [2, 1, 1])


@pytest.mark.parametrize(
    ("errors", "outcome"),
    [
        ([{"message": "slow down", "status": 429}], RETRY),
        ([{"message": "down", "status": 500}], RETRY),
        ([{"message": "down", "status": 501}], RETRY),
        ([{"message": "weird", "status": 499}], FAILED),
        ([{"message": "bad", "status": 430}], FAILED),
        ([{"message": "bad", "status": 400}], FAILED),
        ([{"message": "bad", "status": True}], FAILED),  # a bool is no status
        ([{"message": "bad", "status": "500"}], FAILED),  # nor is a string
        ([{"message": "bad"}], FAILED),
        ([{"message": "bad", "status": 400}, {"message": "down", "status": 503}], RETRY),
    ],
)
def test_a_lone_rejected_score_is_retried_only_for_a_transient_status(
    stubbed: Callable[[Answer], LangfuseSender],
    errors: list[dict[str, Any]],
    outcome: DeliveryOutcome,
) -> None:
    answer = results(0, 1, errors)
    expected = "rejected by Langfuse: " + "; ".join(e["message"] for e in errors)
    assert _single_rejection(answer) == (outcome, expected)
    assert view(stubbed(lambda request: answer).send([item(0)])) == [("row-0", outcome, expected)]


def test_a_lone_score_neither_accepted_nor_rejected_is_retried() -> None:
    assert _single_rejection(results(0, 0, [])) == (RETRY, "Langfuse did not confirm the score")


def test_a_lone_rejection_without_a_message_says_so() -> None:
    assert _single_rejection(results(0, 1, [])) == (FAILED, "rejected by Langfuse: no reason given")
    assert _single_rejection(results(0, 0, [{"message": ""}])) == (
        FAILED,
        "rejected by Langfuse: no reason given",
    )


# ------------------------------------------------------------------------------ versions


def test_a_newer_version_of_a_score_is_sent_in_its_own_place(
    stubbed: Callable[[Answer], LangfuseSender],
) -> None:
    sent: list[list[str]] = []

    def answer(request: list[Any]) -> object:
        sent.append([r.trace_id for r in request])
        return None

    old, other = item(0, user=7), item(1)
    new = item(0, user=7).model_copy(update={"item_id": "row-0-new"})
    deliveries = stubbed(answer).send([old, other, new])

    assert sent == [["trace-1", "trace-0"]]
    assert view(deliveries) == [
        ("row-0", SENT, None),
        ("row-1", SENT, None),
        ("row-0-new", SENT, None),
    ]
