"""LangfuseSender against the Langfuse stand-in: the real SDK client, real HTTP on 127.0.0.1."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from testkit.standin import SCORES_PATH, LangfuseStandin
from worker.langfuse_sender import (
    Delivery,
    DeliveryOutcome,
    LangfuseSender,
    ScoreItem,
    score_id_for,
)

pytestmark = pytest.mark.timeout(30)

TWIN = UUID("6f9619ff-8b86-4011-b42d-00c04fc964ff")
BASE_TIME = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
CEST = timezone(timedelta(hours=2))


@pytest.fixture
def standin() -> Iterator[LangfuseStandin]:
    with LangfuseStandin() as lf:
        yield lf


@pytest.fixture
def sender(standin: LangfuseStandin) -> Iterator[LangfuseSender]:
    with LangfuseSender(standin.url, standin.public_key, standin.secret_key, 2.0) as s:
        yield s


def make_items(count: int, *, start: int = 0) -> list[ScoreItem]:
    items = []
    for i in range(start, start + count):
        user = UUID(int=i + 1)
        trace = f"trace-{i}"
        items.append(
            ScoreItem(
                item_id=f"outbox-{i}",
                score_id=score_id_for(TWIN, trace, user),
                trace_id=trace,
                name="user_feedback",
                value=(i % 3) - 1,
                data_type="NUMERIC",
                comment=None if i % 2 else f"comment {i}",
                metadata={"reason": "helpful", "intent_label": "factual", "n": i},
                # a non-UTC offset: the sender must send the same instant, in UTC
                timestamp=(BASE_TIME + timedelta(seconds=i)).astimezone(CEST),
            )
        )
    return items


def outcomes(deliveries: list[Delivery]) -> set[DeliveryOutcome]:
    return {d.outcome for d in deliveries}


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_batch_of_250_goes_in_three_requests_and_every_score_arrives_once(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    items = make_items(250)

    deliveries = sender.send(items)

    assert [d.item_id for d in deliveries] == [i.item_id for i in items]
    assert all(d.outcome == DeliveryOutcome.sent and d.error is None for d in deliveries)
    requests = standin.requests
    assert [len(r.body) for r in requests] == [100, 100, 50]
    assert all(r.method == "POST" and r.path == SCORES_PATH for r in requests)
    assert all(r.status == 202 for r in requests)
    assert all(r.auth == (standin.public_key, standin.secret_key) for r in requests)
    assert all(r.headers["x-langfuse-public-key"] == standin.public_key for r in requests)

    scores = standin.scores
    assert len(scores) == 250
    for item in items:
        (version,) = scores[item.score_id]  # exactly once by id
        assert version["traceId"] == item.trace_id
        assert version["name"] == "user_feedback"
        assert version["value"] == item.value
        assert version["dataType"] == "NUMERIC"
        assert version.get("comment") == item.comment
        assert version["metadata"] == item.metadata
        assert parse_ts(version["timestamp"]) == item.timestamp
        assert version["timestamp"].endswith("Z")  # sent in UTC


def test_thousand_rows_take_at_most_one_request_per_fifty(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    deliveries = sender.send(make_items(1000))

    assert outcomes(deliveries) == {DeliveryOutcome.sent}
    assert len(standin.requests) <= 1000 / 50
    assert len(standin.scores) == 1000


def test_resend_with_same_id_and_timestamp_updates_the_score(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    (first,) = make_items(1)
    changed = first.model_copy(update={"item_id": "outbox-vote-change", "value": -1.0})

    assert sender.send([first])[0].outcome == DeliveryOutcome.sent
    assert sender.send([changed])[0].outcome == DeliveryOutcome.sent

    versions = standin.scores[first.score_id]
    assert [v["value"] for v in versions] == [first.value, -1.0]
    assert versions[0]["timestamp"] == versions[1]["timestamp"]
    assert len(standin.scores) == 1


def test_versions_of_one_score_in_one_send_collapse_to_the_latest(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    (first,) = make_items(1)
    newer = first.model_copy(update={"item_id": "outbox-newer", "value": -1.0})
    other = make_items(1, start=1)[0]

    deliveries = sender.send([first, other, newer])

    assert [d.item_id for d in deliveries] == [first.item_id, other.item_id, newer.item_id]
    assert outcomes(deliveries) == {DeliveryOutcome.sent}
    assert len(standin.requests) == 1
    assert [v["value"] for v in standin.scores[first.score_id]] == [-1.0]


def test_server_error_means_retry_for_every_item(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    standin.set_mode("error")

    deliveries = sender.send(make_items(250))

    assert outcomes(deliveries) == {DeliveryOutcome.retry}
    assert all(d.error is not None and "HTTP 500" in d.error for d in deliveries)
    assert len(standin.requests) == 1  # the other chunks are not attempted
    assert standin.scores == {}


def test_rate_limited_means_retry(standin: LangfuseStandin, sender: LangfuseSender) -> None:
    standin.set_mode("rate_limited")

    deliveries = sender.send(make_items(3))

    assert outcomes(deliveries) == {DeliveryOutcome.retry}
    assert deliveries[0].error is not None and "HTTP 429" in deliveries[0].error
    assert len(standin.requests) == 1  # the SDK does not retry on its own


def test_wrong_secret_fails_with_401_after_exactly_one_request(
    standin: LangfuseStandin,
) -> None:
    with LangfuseSender(standin.url, standin.public_key, "sk-wrong", 2.0) as sender:
        deliveries = sender.send(make_items(250))

    assert outcomes(deliveries) == {DeliveryOutcome.failed}
    first = deliveries[0].error
    assert first is not None and first.startswith("HTTP 401: Invalid credentials")
    assert all(d.error is not None and "401" in d.error for d in deliveries)
    (request,) = standin.requests
    assert request.status == 401
    assert request.auth == (standin.public_key, "sk-wrong")
    assert standin.scores == {}


def test_forced_unauthorized_fails(standin: LangfuseStandin, sender: LangfuseSender) -> None:
    standin.set_mode("unauthorized")

    deliveries = sender.send(make_items(2))

    assert outcomes(deliveries) == {DeliveryOutcome.failed}
    assert len(standin.requests) == 1


def test_partial_rejection_gives_per_item_outcomes(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    items = make_items(10)
    bad = {items[2].score_id: "value out of range", items[7].score_id: "trace not found"}
    standin.set_mode("partial", reject=bad)

    deliveries = sender.send(items)

    by_id = {d.item_id: d for d in deliveries}
    for item in items:
        delivery = by_id[item.item_id]
        if item.score_id in bad:
            assert delivery.outcome == DeliveryOutcome.failed
            assert delivery.error is not None and bad[item.score_id] in delivery.error
            assert item.score_id not in standin.scores
        else:
            assert delivery == Delivery(item_id=item.item_id, outcome=DeliveryOutcome.sent)
            versions = standin.scores[item.score_id]
            assert all(v == versions[0] for v in versions)  # re-sent unchanged: an update
    requests = standin.requests
    assert requests[0].status == 207 and len(requests[0].body) == 10
    # halving isolates each rejected score: at most 2·k·log2(n) + 1 requests
    assert len(requests) <= 1 + 2 * len(bad) * math.ceil(math.log2(len(items)))


def test_partial_mode_without_rejections_answers_202(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    standin.set_mode("partial", reject={})

    deliveries = sender.send(make_items(5))

    assert outcomes(deliveries) == {DeliveryOutcome.sent}
    assert [r.status for r in standin.requests] == [202]


def test_connection_refused_means_retry_and_recovers_on_restart(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    items = make_items(150)
    assert sender.send(items[:1])[0].outcome == DeliveryOutcome.sent  # leaves a pooled connection
    standin.stop()

    deliveries = sender.send(items)

    assert outcomes(deliveries) == {DeliveryOutcome.retry}
    assert deliveries[0].error == "connection refused"

    standin.start()  # same port
    assert outcomes(sender.send(items)) == {DeliveryOutcome.sent}
    assert len(standin.scores) == 150


def test_hang_means_retry_within_the_timeout(standin: LangfuseStandin) -> None:
    standin.set_mode("hang")
    with LangfuseSender(standin.url, standin.public_key, standin.secret_key, 0.5) as sender:
        started = time.monotonic()
        deliveries = sender.send(make_items(250))
        elapsed = time.monotonic() - started

    assert outcomes(deliveries) == {DeliveryOutcome.retry}
    assert deliveries[0].error is not None and "timeout after 0.5s" in deliveries[0].error
    assert 0.45 <= elapsed < 0.5 + 0.75
    (request,) = standin.requests  # one timeout per send, not one per chunk
    assert request.status is None


def test_requests_are_also_bounded_by_size(standin: LangfuseStandin) -> None:
    with LangfuseSender(
        standin.url, standin.public_key, standin.secret_key, 2.0, max_request_bytes=4096
    ) as sender:
        items = [i.model_copy(update={"comment": "x" * 1500}) for i in make_items(6)]
        deliveries = sender.send(items)

    assert outcomes(deliveries) == {DeliveryOutcome.sent}
    assert all(len(r.body) <= 2 for r in standin.requests)
    assert len(standin.scores) == 6


def test_a_score_too_large_for_any_request_fails_without_being_sent(
    standin: LangfuseStandin,
) -> None:
    with LangfuseSender(
        standin.url, standin.public_key, standin.secret_key, 2.0, max_request_bytes=2048
    ) as sender:
        big, small = make_items(2)
        deliveries = sender.send([big.model_copy(update={"comment": "x" * 3000}), small])

    assert [d.outcome for d in deliveries] == [DeliveryOutcome.failed, DeliveryOutcome.sent]
    assert deliveries[0].error is not None and "request limit" in deliveries[0].error
    assert list(standin.scores) == [small.score_id]


def test_sender_starts_no_background_threads(standin: LangfuseStandin) -> None:
    before = set(threading.enumerate())
    with LangfuseSender(standin.url, standin.public_key, standin.secret_key, 2.0) as sender:
        assert set(threading.enumerate()) == before
        assert sender.send(make_items(1))[0].outcome == DeliveryOutcome.sent
    new = set(threading.enumerate()) - before
    assert all("process_request_thread" in t.name for t in new)  # only stand-in handlers


def test_empty_send_makes_no_request(standin: LangfuseStandin, sender: LangfuseSender) -> None:
    assert sender.send([]) == []
    assert standin.requests == []


def test_duplicate_item_ids_are_a_programming_error(sender: LangfuseSender) -> None:
    (item,) = make_items(1)
    with pytest.raises(ValueError, match="duplicate item_id"):
        sender.send([item, item])


def test_score_id_for_is_deterministic() -> None:
    user = UUID("00000000-0000-0000-0000-000000000001")
    first = score_id_for(TWIN, "trace-1", user)

    assert first == score_id_for(TWIN, "trace-1", user)
    assert first == score_id_for(str(TWIN).upper(), "trace-1", str(user))
    assert UUID(first).version == 5
    # pinned: changing the namespace or the encoding would duplicate every score in Langfuse
    assert first == "af1fce97-0cd9-587b-9939-73e0b944c448"
    assert first != score_id_for(TWIN, "trace-2", user)
    assert first != score_id_for(TWIN, "trace-1", UUID(int=2))
    assert first != score_id_for(UUID(int=3), "trace-1", user)
    with pytest.raises(ValueError):
        score_id_for("not-a-uuid", "trace-1", user)


@pytest.mark.parametrize(
    "changes",
    [
        {"value": float("nan")},
        {"value": "1"},
        {"value": 0.5, "data_type": "BOOLEAN"},
        {"value": 1.0, "data_type": "CATEGORICAL"},
        {"timestamp": datetime(2024, 5, 1, 12, 0)},
        {"metadata": {"bad": object()}},
        {"trace_id": ""},
    ],
)
def test_score_item_rejects_what_langfuse_would(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "item_id": "1",
        "score_id": "s",
        "trace_id": "t",
        "name": "user_feedback",
        "value": 1,
        "timestamp": BASE_TIME,
    }
    with pytest.raises(ValidationError):
        ScoreItem(**(fields | changes))


def test_score_item_normalises_timestamp_to_utc() -> None:
    item = make_items(1)[0]
    assert item.timestamp.tzinfo is UTC
    assert item.timestamp == BASE_TIME


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        LangfuseSender("localhost:3000", "pk", "sk", 1.0)
    with pytest.raises(ValueError):
        LangfuseSender("http://localhost:3000", "pk", "sk", 0)
    with pytest.raises(ValueError):
        LangfuseSender("http://localhost:3000", "pk", "sk", 1.0, batch_size=0)
