"""LangfuseSender against the Langfuse stand-in in each server generation (HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast
from uuid import UUID

import httpx
import pytest
from pydantic import ValidationError

from testkit.standin import (
    EVENTS_ONLY,
    GENERATIONS,
    INGESTION_PATH,
    Generation,
    LangfuseStandin,
    Mode,
)
from worker import langfuse_http
from worker.langfuse_check import (
    LangfuseConfigError,
    LangfuseHostUnusable,
    LangfuseRefused,
    LangfuseUnavailable,
    LangfuseWait,
    check,
    generation,
)
from worker.langfuse_http import check_host, unusable_host
from worker.langfuse_response import Outcome, classify, parse_version
from worker.langfuse_sender import (
    Delivery,
    LangfuseSender,
    ScoreItem,
    body,
    score_id_for,
)
from worker.outbox import OutboxDrainer
from worker.store import CheckTurn, OutboxBacklog, Store

pytestmark = pytest.mark.timeout(30)

TWIN = UUID("6f9619ff-8b86-4011-b42d-00c04fc964ff")
BASE_TIME = datetime(2024, 5, 1, 23, 59, 59, 123456, tzinfo=UTC)
CEST = timezone(timedelta(hours=2))


@pytest.fixture(params=GENERATIONS)
def standin(request: pytest.FixtureRequest) -> Iterator[LangfuseStandin]:
    with LangfuseStandin(generation=request.param) as lf:
        yield lf


@pytest.fixture
def cloud() -> Iterator[LangfuseStandin]:
    with LangfuseStandin(generation="cloud") as lf:
        yield lf


def sender_for(lf: LangfuseStandin, **kwargs: Any) -> LangfuseSender:
    options: dict[str, Any] = {"environment": "production"} | kwargs
    timeout = options.pop("timeout", 2.0)
    secret = options.pop("secret_key", lf.secret_key)
    return LangfuseSender(lf.url, lf.public_key, secret, timeout, **options)


@pytest.fixture
def sender(standin: LangfuseStandin) -> Iterator[LangfuseSender]:
    with sender_for(standin) as s:
        yield s


def make_items(count: int, *, start: int = 0) -> list[ScoreItem]:
    items = []
    for i in range(start, start + count):
        trace = f"trace-{i}"
        items.append(
            ScoreItem(
                event_id=i + 1,
                score_id=score_id_for(TWIN, trace, UUID(int=i + 1)),
                trace_id=trace,
                name="user_feedback",
                value=(i % 3) - 1,
                comment=None if i % 2 else f"comment {i}",
                metadata={"reason": "helpful", "intent_label": "factual", "n": i},
                # a non-UTC offset: the sender must send the same instant, in UTC
                timestamp=(BASE_TIME + timedelta(seconds=i)).astimezone(CEST),
            )
        )
    return items


def outcomes(deliveries: list[Delivery]) -> set[Outcome]:
    return {d.outcome for d in deliveries}


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_check_reads_the_version_and_tries_the_keys_without_storing(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    version = check(sender)

    assert version is not None and ".".join(map(str, version)) == standin.version
    health, probe = standin.requests
    assert (health.method, health.path, health.status) == ("GET", "/api/public/health", 200)
    assert (probe.method, probe.path, probe.body, probe.status) == (
        "POST",
        INGESTION_PATH,
        {"batch": []},
        207,
    )
    assert standin.scores == {}


def test_batch_of_250_goes_in_three_requests_and_every_score_arrives_once(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    items = make_items(250)

    deliveries = sender.send(items)

    assert [d.event_id for d in deliveries] == [i.event_id for i in items]
    assert all(d.outcome == Outcome.sent and d.error is None for d in deliveries)
    requests = standin.requests
    assert [len(r.body["batch"]) for r in requests] == [100, 100, 50]
    assert all(r.method == "POST" and r.path == INGESTION_PATH for r in requests)
    assert all(r.status == 207 for r in requests)
    assert all(r.auth == (standin.public_key, standin.secret_key) for r in requests)

    scores = standin.scores
    assert len(scores) == 250 and standin.duplicates() == {}
    for item in items:
        (version,) = scores[item.score_id]  # exactly once by id
        assert version["traceId"] == item.trace_id
        assert version["name"] == "user_feedback"
        assert version["value"] == item.value
        assert version["dataType"] == "NUMERIC"
        assert version.get("comment") == item.comment
        assert version["metadata"] == item.metadata
        assert version["environment"] == "production"
        assert parse_ts(version["timestamp"]) == item.timestamp
    event = requests[0].body["batch"][0]
    assert event["type"] == "score-create"
    assert event["timestamp"].endswith("Z")  # sent in UTC


def test_thousand_rows_take_at_most_one_request_per_fifty(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    deliveries = sender.send(make_items(1000))

    assert outcomes(deliveries) == {Outcome.sent}
    assert len(standin.score_requests) <= 1000 / 50
    assert len(standin.scores) == 1000


def test_a_vote_changed_on_another_day_replaces_the_one_score(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    (first,) = make_items(1)  # voted at 23:59:59 UTC
    changed = first.model_copy(update={"event_id": 500, "value": -1.0})

    assert sender.send([first])[0].outcome == Outcome.sent
    standin.advance(days=3)
    assert sender.send([changed])[0].outcome == Outcome.sent

    versions = standin.scores[first.score_id]
    assert [v["value"] for v in versions] == [first.value, -1.0]
    assert versions[0]["timestamp"] == versions[1]["timestamp"]
    assert standin.duplicates() == {}
    ((_, row),) = [(k, v) for k, v in standin.table.items() if k[2] == first.score_id]
    assert row["value"] == -1.0


def test_the_newest_vote_wins_even_when_an_older_one_arrives_last(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    """Langfuse orders a score's stored events by timestamp, equal ones in reverse order of
    their event ids: the newest vote (smallest envelope id) is merged last, whatever came
    first over the wire."""
    (old,) = make_items(1)
    new = old.model_copy(update={"event_id": 10**6, "value": -1.0})
    assert sender.send([new])[0].outcome == Outcome.sent
    assert sender.send([old])[0].outcome == Outcome.sent
    ((row),) = standin.table.values()
    assert row["value"] == -1.0


def test_the_newest_vote_has_the_smallest_envelope_id() -> None:
    old, new = make_items(1)[0], make_items(1)[0].model_copy(update={"event_id": 10**6})
    assert new.envelope_id < old.envelope_id
    assert old.envelope_id.startswith(old.score_id + "-") and len(old.envelope_id) <= 800


def test_versions_of_one_score_in_one_send_collapse_to_the_latest(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    (first,) = make_items(1)
    newer = first.model_copy(update={"event_id": 900, "value": -1.0})
    other = make_items(1, start=1)[0]

    deliveries = sender.send([first, other, newer])

    assert [d.event_id for d in deliveries] == [first.event_id, other.event_id, newer.event_id]
    assert outcomes(deliveries) == {Outcome.sent}
    assert len(standin.requests) == 1
    assert [v["value"] for v in standin.scores[first.score_id]] == [-1.0]


def test_server_error_means_retry_for_every_item(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    standin.set_mode("error")

    deliveries = sender.send(make_items(250))

    assert outcomes(deliveries) == {Outcome.retry}
    assert all(d.error is not None and "HTTP 500" in d.error for d in deliveries)
    assert all(d.hold for d in deliveries)  # the rows not attempted hold every worker too
    assert len(standin.requests) == 1  # the other chunks are not attempted
    assert standin.scores == {}


def test_a_proxys_502_waits_for_every_item_and_sends_no_more(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    """langfuse-web restarting behind nginx: a wait (no attempt), the rest not attempted."""
    standin.set_mode("proxy_bad_gateway")

    deliveries = sender.send(make_items(250))

    assert outcomes(deliveries) == {Outcome.wait}
    assert {d.retry_after_seconds for d in deliveries} == {None}
    assert all(d.error is not None and "HTTP 502" in d.error for d in deliveries)
    assert len(standin.requests) == 1


def test_rate_limited_waits_for_retry_after(cloud: LangfuseStandin) -> None:
    cloud.set_mode("rate_limited")
    with sender_for(cloud, batch_size=2) as sender:
        deliveries = sender.send(make_items(5))

    assert outcomes(deliveries) == {Outcome.wait}
    assert {d.retry_after_seconds for d in deliveries} == {2.0}
    assert deliveries[0].error is not None and "HTTP 429" in deliveries[0].error
    assert len(cloud.requests) == 1  # no retry inside a send, no further chunk


def test_a_proxys_429_without_retry_after_waits_without_a_delay_of_its_own(
    standin: LangfuseStandin,
) -> None:
    """nginx's `limit_req` in front of any generation answers 429 with no delay: a wait (not an
    attempt) with no delay, which the database's hold backs off for every worker (the
    integration tests); the rest of the send is not attempted. The same 429 on the health route
    is 'not reachable', not a bad host."""
    with sender_for(standin, batch_size=2) as sender:
        check(sender)
        standin.set_mode("proxy_rate_limited")
        deliveries = sender.send(make_items(5))
        assert outcomes(deliveries) == {Outcome.wait}
        assert {d.retry_after_seconds for d in deliveries} == {None}
        assert "HTTP 429: <html>" in (deliveries[0].error or "")
        assert len(standin.score_requests) == 1
        with pytest.raises(LangfuseUnavailable, match="health answered 429"):
            check(sender)


@pytest.mark.parametrize("mode", ["suspended", "rate_limited"])
def test_a_wait_answered_to_the_checks_empty_batch_is_a_wait(
    cloud: LangfuseStandin, mode: Mode
) -> None:
    """The check's empty batch meets a usage suspension or a 429: the check does not pass (no
    "ready"), it raises the wait, with its delay, for the drainer to make the hold."""
    cloud.set_mode(mode)
    with sender_for(cloud) as sender, pytest.raises(LangfuseWait) as raised:
        check(sender)
    assert sender.waited  # the next check is the empty batch alone
    verdict = raised.value.verdict
    assert verdict.outcome == Outcome.wait
    assert verdict.retry_after_seconds == (300.0 if mode == "suspended" else 2.0)
    assert [r.path for r in cloud.requests] == ["/api/public/health", "/api/public/ingestion"]


def test_langfuses_500_at_the_check_holds_like_a_sends() -> None:
    """Langfuse's catch-all 500 to the empty batch (its storage or queue down) holds every
    worker, as on a send (no request per worker per pass meanwhile); no rows, so no attempt.
    The next check, the hold's probe, is the empty batch alone."""
    with LangfuseStandin() as lf, sender_for(lf) as sender:
        lf.set_mode("error")
        with pytest.raises(LangfuseWait) as raised:
            check(sender)
        assert raised.value.verdict.hold and "HTTP 500" in (raised.value.verdict.error or "")
        lf.set_mode("ok")
        assert check(sender) == parse_version(lf.version)
        assert [r.path for r in lf.requests] == [
            "/api/public/health", "/api/public/ingestion", "/api/public/ingestion"]


def test_usage_suspension_waits(cloud: LangfuseStandin) -> None:
    cloud.set_mode("suspended")
    with sender_for(cloud) as sender:
        deliveries = sender.send(make_items(3))

    assert outcomes(deliveries) == {Outcome.wait}
    assert deliveries[0].error is not None and "Ingestion suspended" in deliveries[0].error


@pytest.mark.parametrize("generation_name", ["v3", "v4", "v4.59"])
def test_self_hosted_generations_never_rate_limit(generation_name: Generation) -> None:
    lf = LangfuseStandin(generation=generation_name)
    with pytest.raises(ValueError, match="never answers"):
        lf.set_mode("rate_limited")
    with pytest.raises(ValueError, match="never answers"):
        lf.set_mode("suspended")


def test_wrong_secret_turns_the_mirror_off_after_exactly_one_request(
    standin: LangfuseStandin,
) -> None:
    with sender_for(standin, secret_key="sk-wrong") as sender:
        deliveries = sender.send(make_items(250))
        with pytest.raises(LangfuseConfigError, match="refused the keys: HTTP 401"):
            check(sender)

    assert outcomes(deliveries) == {Outcome.off}
    assert all(
        d.error is not None and d.error.startswith("Langfuse refused the keys: HTTP 401")
        for d in deliveries
    )
    first, *_ = standin.requests
    assert first.status == 401
    assert first.auth == (standin.public_key, "sk-wrong")
    assert len(standin.score_requests) == 1
    assert standin.scores == {}


def test_partial_rejection_gives_each_row_its_own_outcome_in_one_request(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    items = make_items(10)
    bad = {items[2].score_id: "trace not found", items[7].score_id: "value out of range"}
    standin.set_mode("partial", reject=bad)

    deliveries = sender.send(items)

    by_id = {d.event_id: d for d in deliveries}
    for item in items:
        delivery = by_id[item.event_id]
        if item.score_id in bad:
            assert delivery.outcome == Outcome.failed
            assert delivery.error is not None and bad[item.score_id] in delivery.error
            assert item.score_id not in standin.scores
        else:
            assert delivery == Delivery(item.event_id, Outcome.sent)
            assert len(standin.scores[item.score_id]) == 1
    assert [r.status for r in standin.requests] == [207]  # no halving, no re-send


def test_a_transient_per_item_error_retries_only_that_row(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    items = make_items(3)
    standin.set_mode(
        "partial", reject={items[1].score_id: "Internal Server Error"}, reject_status=500
    )

    deliveries = sender.send(items)

    assert [d.outcome for d in deliveries] == [Outcome.sent, Outcome.retry, Outcome.sent]


def test_a_redirect_is_refused_never_followed(standin: LangfuseStandin) -> None:
    standin.set_mode("redirect")
    with sender_for(standin) as sender:
        deliveries = sender.send(make_items(3))
        with pytest.raises(LangfuseConfigError, match="redirects .* https://") as refused:
            check(sender)

    https = f"https://{standin.host}:{standin.port}"
    assert str(refused.value).endswith(f"set LANGFUSE_HOST to {https}")
    assert outcomes(deliveries) == {Outcome.off}
    assert deliveries[0].error is not None
    assert deliveries[0].error.endswith(f"set LANGFUSE_HOST to {https}")
    assert [(r.method, r.status) for r in standin.requests] == [("POST", 301), ("GET", 301)]
    assert standin.scores == {}


def test_413_splits_the_request(standin: LangfuseStandin) -> None:
    big = "x" * 1_000_000  # six of them exceed the 4.5 MB ingestion limit
    with sender_for(standin, max_request_bytes=10_000_000, timeout=10.0) as sender:
        items = [i.model_copy(update={"comment": big}) for i in make_items(6)]
        deliveries = sender.send(items)

    assert outcomes(deliveries) == {Outcome.sent}
    statuses = [r.status for r in standin.requests]
    assert statuses[0] == 413 and statuses.count(207) >= 2
    assert len(standin.scores) == 6


@pytest.mark.parametrize("room", [0, -1], ids=["exactly-the-limit", "one-byte-over"])
def test_requests_are_counted_to_the_byte_as_sent(room: int) -> None:
    """A batch whose body is exactly max_request_bytes goes as one request; one byte less and it
    goes as two, none over the limit (the count is of the body as sent, separators included)."""
    with LangfuseStandin(generation="v3") as lf, sender_for(lf, batch_size=1000) as probe:
        items = make_items(40)
        whole = len(body([probe.event(i) for i in items]))
        assert whole > 4096
        with sender_for(lf, batch_size=1000, max_request_bytes=whole + room) as sender:
            assert outcomes(sender.send(items)) == {Outcome.sent}
        sizes = [int(r.headers["content-length"]) for r in lf.score_requests]
    if room == 0:
        assert sizes == [whole]
    else:
        assert len(sizes) == 2 and max(sizes) <= whole - 1, sizes


def test_once_the_worker_stops_no_request_starts(standin: LangfuseStandin) -> None:
    """`serve` stopping: the request in flight ends, the batch's other requests never start
    (`later`: left for after the claim window), and a pass that has not claimed yet claims
    nothing and checks nothing, so a pass in hand ends within what is in flight."""
    stop = threading.Event()
    with sender_for(standin, batch_size=2) as sender:

        def stopping() -> bool:  # stop is asked for once the first request has been answered
            if standin.score_requests:
                stop.set()
            return stop.is_set()

        deliveries = sender.send(make_items(5), stopping)
        assert [d.outcome for d in deliveries] == [Outcome.sent] * 2 + [Outcome.later] * 3
        assert len(standin.score_requests) == 1
        seen = len(standin.requests)
        drainer = OutboxDrainer(cast(Store, NoHold()), sender, 10, 8, stopping=stop.is_set)
        assert drainer.drain_once() == 0
    assert len(standin.requests) == seen


def test_a_score_too_large_for_any_request_fails_without_being_sent(
    standin: LangfuseStandin,
) -> None:
    with sender_for(standin, max_request_bytes=2048) as sender:
        big, small = make_items(2)
        deliveries = sender.send([big.model_copy(update={"comment": "x" * 3000}), small])

    assert [d.outcome for d in deliveries] == [Outcome.failed, Outcome.sent]
    assert deliveries[0].error is not None and "2048-byte limit" in deliveries[0].error
    assert list(standin.scores) == [small.score_id]


def test_connection_refused_sends_nothing_and_recovers_on_restart(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    """Langfuse down mid-run: the request never left (unreachable, not an attempt), as the
    check says at start; once it is back the same items go out."""
    items = make_items(150)
    assert sender.send(items[:1])[0].outcome == Outcome.sent  # leaves a pooled connection
    standin.stop()

    deliveries = sender.send(items)
    with pytest.raises(LangfuseUnavailable, match="connection refused"):
        check(sender)

    assert outcomes(deliveries) == {Outcome.unreachable}
    assert deliveries[0].error == "connection refused"
    standin.start()  # same port
    assert outcomes(sender.send(items)) == {Outcome.sent}
    assert len(standin.scores) == 150


def test_a_name_that_stops_resolving_or_tls_that_fails_mid_run_turns_the_mirror_off(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    """After a good start, the same failures the check reports as settings (`off`, as at
    start), never a retry that spends an attempt; nothing reaches the server."""
    check(sender)
    url = sender.host
    sender.host = "http://langfuse.invalid:3000"  # the name no longer resolves
    deliveries = sender.send(make_items(3))
    assert outcomes(deliveries) == {Outcome.off}
    assert "the host name langfuse.invalid does not resolve" in (deliveries[0].error or "")
    sender.host = url.replace("http://", "https://")  # TLS to a port that speaks plain HTTP
    deliveries = sender.send(make_items(3))
    assert outcomes(deliveries) == {Outcome.off}
    assert "the TLS handshake failed" in (deliveries[0].error or "")
    assert standin.score_requests == []


def test_hang_means_retry_within_the_timeout(standin: LangfuseStandin) -> None:
    standin.set_mode("hang")
    with sender_for(standin, timeout=0.5) as sender:
        started = time.monotonic()
        deliveries = sender.send(make_items(250))
        elapsed = time.monotonic() - started

    assert outcomes(deliveries) == {Outcome.retry}
    assert deliveries[0].error is not None and "timeout after 0.5s" in deliveries[0].error
    assert 0.45 <= elapsed < 0.5 + 0.75
    (request,) = standin.requests  # one timeout per send, not one per chunk
    assert request.status is None
    with (
        sender_for(standin, timeout=0.3) as sender,
        pytest.raises(LangfuseUnavailable, match=r"health: timeout after 0\.3s waiting"),
    ):
        check(sender)


def test_a_host_without_the_ingestion_route_is_refused_at_the_check_and_waits_later(
    cloud: LangfuseStandin,
) -> None:
    cloud.set_mode("no_route")
    with sender_for(cloud) as sender:
        with pytest.raises(LangfuseConfigError, match=r"answered 404 to POST .*ingestion"):
            check(sender)
        deliveries = sender.send(make_items(3))
    assert outcomes(deliveries) == {Outcome.wait}
    assert {d.retry_after_seconds for d in deliveries} == {300.0}
    assert all("no POST /api/public/ingestion" in (d.error or "") for d in deliveries)
    assert len([r for r in cloud.requests if r.path == INGESTION_PATH]) == 2  # probe + one send
    assert cloud.scores == {}


def test_a_wrong_public_key_with_the_right_secret_is_accepted_as_langfuse_does(
    standin: LangfuseStandin,
) -> None:
    """Langfuse finds the key by its secret; a public key that is not that key's own is only
    logged. The scores land in the secret key's project."""
    with LangfuseSender(standin.url, "pk-lf-other", standin.secret_key, 2.0) as sender:
        assert check(sender) is not None
        assert outcomes(sender.send(make_items(2))) == {Outcome.sent}
    assert len(standin.scores) == 2


def test_a_host_name_that_does_not_resolve_is_a_setting_checked_again_later() -> None:
    """Not "not reachable" (the error a down server gets, every pass): the name is wrong, or
    not there yet (a container not started); the mirror goes off and checks again later."""
    with (
        LangfuseSender("http://langfuse.invalid:3000", "pk", "sk", 2.0) as sender,
        pytest.raises(LangfuseHostUnusable, match="host name langfuse.invalid does not"),
    ):
        check(sender)


def test_https_to_a_plain_http_port_is_a_setting_checked_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with LangfuseStandin() as lf:
        url = lf.url.replace("http://", "https://")
        with LangfuseSender(url, lf.public_key, lf.secret_key, 2.0) as sender:
            with pytest.raises(LangfuseHostUnusable, match="TLS handshake failed .* use http://"):
                check(sender)
            # the drainer turns the mirror off with one line, and checks again (here at once)
            drainer = OutboxDrainer(cast(Store, NoHold()), sender, 10, 8, recheck_seconds=0)
            with caplog.at_level("ERROR", logger="worker.outbox"):
                assert drainer.drain_once() == drainer.drain_once() == 0
        assert lf.score_requests == []
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "Langfuse mirror off: LANGFUSE_HOST=https://" in line
    assert "checked again every 0 s" in line


def test_a_proxy_refusing_every_route_is_a_refusal() -> None:
    """A 403 to the health route (nginx's page) hides the version, and the empty batch, refused
    the same way, says so: a proxy or a firewall in front of Langfuse, which may be fixed later,
    not "no Langfuse at LANGFUSE_HOST"."""
    with LangfuseStandin() as lf, sender_for(lf) as sender:
        lf.set_mode("proxy_forbidden")
        with pytest.raises(LangfuseRefused, match="refused by something in front of Langfuse"):
            check(sender)
        assert [(r.path, r.status) for r in lf.requests] == [
            ("/api/public/health", 403),
            ("/api/public/ingestion", 403),
        ]


@pytest.mark.parametrize("status", [401, 403, 404, 405, 410])
def test_a_health_route_a_proxy_hides_leaves_the_version_unknown_and_the_ingestion_route_decides(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Langfuse serves its health route to anyone; a proxy that exposes only the ingestion route
    answers it with its own page. The check then takes the empty batch's answer: ready, the
    version unknown, and one warning that the 3.49 minimum could not be checked."""
    seen: list[str] = []

    def proxy(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/api/public/health":
            return httpx.Response(status, text="<html>nginx</html>")
        return httpx.Response(207, json={"successes": [], "errors": []})

    with LangfuseSender("http://lf.example", "pk", "sk", 2.0) as sender:
        sender.http.close()
        sender.http = httpx.Client(transport=httpx.MockTransport(proxy))
        drainer = OutboxDrainer(cast(Store, NoHold()), sender, 10, 8)
        with caplog.at_level("INFO", logger="worker.outbox"):
            assert drainer.ready()
        assert sender.version is None
    assert seen == ["/api/public/health", "/api/public/ingestion"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "version is unknown" in warning and "3.49" in warning


def test_a_server_too_old_is_checked_again_and_taken_once_upgraded() -> None:
    """A server older than 3.49 turns the mirror off; an upgrade is seen by the next check
    (`recheck_seconds`, 0 here: the time passing), with no restart."""
    with LangfuseStandin(generation="v3", version="3.48.2") as lf, sender_for(lf) as sender:
        drainer = OutboxDrainer(cast(Store, NoHold()), sender, 10, 8, recheck_seconds=0)
        assert not drainer.ready()
        assert drainer.config_error is not None and "too old" in drainer.config_error
        lf.version = "3.49.0"
        assert drainer.ready()
        assert sender.version == (3, 49, 0)


def test_a_one_shot_drain_does_not_promise_a_second_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with LangfuseStandin() as lf, sender_for(lf, secret_key="sk-wrong") as sender:
        drainer = OutboxDrainer(cast(Store, NoHold()), sender, 10, 8, recheck_seconds=None)
        with caplog.at_level("ERROR", logger="worker.outbox"):
            assert not drainer.ready()
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.endswith("feedback stays pending, not sent by this drain")
    assert "checked again" not in line


class NoHold:
    """The part of a Store the drainer asks before a check: no hold, nothing waiting."""

    def outbox_backlog(self) -> OutboxBacklog:
        return OutboxBacklog(rows=0)

    def claim_check(self, visibility_seconds: int) -> CheckTurn:
        return CheckTurn(turn="check")


def test_a_server_too_old_is_refused_at_the_check() -> None:
    with LangfuseStandin(generation="v3", version="3.48.2") as lf, sender_for(lf) as sender:
        with pytest.raises(LangfuseConfigError, match=r"3\.48\.2 .* too old"):
            check(sender)
        assert [r.path for r in lf.requests] == ["/api/public/health"]


def test_the_one_score_route_of_v3_and_v4_shows_why_it_is_not_used() -> None:
    """What the previous sender did (an array to /api/public/scores): refused by v3 and v4 before
    4.59. A single score there is an event stamped with the time of receipt: a change on
    another day replaces the row only while the first vote's event file is still stored (the
    worker re-reads it and keeps the row's first timestamp); once a lifecycle rule expired it,
    the change makes a second row."""
    import httpx

    for generation_name in ("v3", "v4"):
        with LangfuseStandin(generation=generation_name) as lf:
            auth = (lf.public_key, lf.secret_key)
            score = {
                "id": "s1",
                "traceId": "t",
                "name": "user_feedback",
                "value": 1,
                "dataType": "NUMERIC",
                "timestamp": "2024-05-01T12:00:00Z",
            }
            url = lf.url + "/api/public/scores"
            assert httpx.post(url, json=[score], auth=auth).status_code == 400
            assert httpx.post(url, json=score, auth=auth).status_code == 200
            lf.advance(days=1)
            assert httpx.post(url, json=score | {"value": -1}, auth=auth).status_code == 200
            assert lf.duplicates() == {}
            ((row),) = lf.table.values()
            assert row["value"] == -1 and row["timestamp"] == lf.scores["s1"][0]["timestamp"]

            lf.forget_event_log()
            lf.advance(days=1)
            assert httpx.post(url, json=score | {"value": 0}, auth=auth).status_code == 200
            assert lf.duplicates() == {"s1": 2}


def test_a_vote_change_replaces_the_one_row_even_after_the_event_log_expired(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    (first,) = make_items(1)
    assert sender.send([first])[0].outcome == Outcome.sent
    standin.forget_event_log()
    standin.advance(days=40)
    changed = first.model_copy(update={"event_id": 900, "value": -1.0})
    assert sender.send([changed])[0].outcome == Outcome.sent
    assert standin.duplicates() == {}
    ((row),) = standin.table.values()
    assert row["value"] == -1.0


def test_a_changed_vote_replaces_comment_and_values_and_merges_metadata(
    standin: LangfuseStandin, sender: LangfuseSender
) -> None:
    """Langfuse merges a score's events: a field sent as null replaces the old value, metadata
    keys are merged (a key the newer vote no longer has stays, as Langfuse keeps it)."""
    (first,) = make_items(1)
    first = first.model_copy(update={"comment": "too long", "metadata": {"a": 1, "b": "x"}})
    changed = first.model_copy(
        update={"event_id": 900, "value": -1.0, "comment": None, "metadata": {"a": 2}}
    )
    assert sender.send([first])[0].outcome == Outcome.sent
    assert sender.send([changed])[0].outcome == Outcome.sent
    ((row),) = standin.table.values()
    assert (row["value"], row["comment"]) == (-1.0, None)
    assert row["metadata"] == {"a": "2", "b": "x"}
    assert row["environment"] == "production"


def test_sender_starts_no_background_threads(standin: LangfuseStandin) -> None:
    before = set(threading.enumerate())
    with sender_for(standin) as sender:
        assert set(threading.enumerate()) == before
        assert sender.send(make_items(1))[0].outcome == Outcome.sent
    new = set(threading.enumerate()) - before
    assert all("process_request_thread" in t.name for t in new)  # only stand-in handlers


def test_empty_send_makes_no_request(standin: LangfuseStandin, sender: LangfuseSender) -> None:
    assert sender.send([]) == []
    assert standin.requests == []


def test_duplicate_event_ids_are_a_programming_error(sender: LangfuseSender) -> None:
    (item,) = make_items(1)
    with pytest.raises(ValueError, match="duplicate event_id"):
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
        {"timestamp": datetime(2024, 5, 1, 12, 0)},
        {"metadata": {"bad": object()}},
        {"trace_id": ""},
        {"event_id": 0},
    ],
)
def test_score_item_refuses_what_langfuse_would(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "event_id": 1,
        "score_id": "s",
        "trace_id": "t",
        "name": "user_feedback",
        "value": 1,
        "timestamp": BASE_TIME,
    }
    with pytest.raises(ValidationError):
        ScoreItem(**(fields | changes))


@pytest.mark.parametrize(
    "metadata",
    [
        {"x": 2**1024 - 2**970},  # the least that JavaScript reads as Infinity: jsonb's 1e309
        {"x": int("1" + "0" * 309)},
        {"deep": [{"x": -(2**1024)}]},
        {"x": float("inf")},
    ],
)
def test_score_item_refuses_a_metadata_number_beyond_a_double_ints_included(
    metadata: dict[str, Any],
) -> None:
    fields: dict[str, Any] = {
        "event_id": 1,
        "score_id": "s",
        "trace_id": "t",
        "name": "user_feedback",
        "value": 1,
        "timestamp": BASE_TIME,
    }
    with pytest.raises(ValidationError, match="beyond the range of a double|plain JSON"):
        ScoreItem(**fields, metadata=metadata)
    # just below the limit JavaScript rounds to the largest double: sent as it is
    near = {"x": 2**1024 - 2**970 - 1, "y": -(2**1024 - 2**970 - 1), "f": 1.7976931348623157e308}
    assert ScoreItem(**fields, metadata=near | {"b": True, "n": None}).metadata["x"] == near["x"]


def test_score_item_normalises_timestamp_to_utc() -> None:
    item = make_items(1)[0]
    assert item.timestamp.tzinfo is UTC
    assert item.timestamp == BASE_TIME


@pytest.mark.parametrize(
    ("host", "error"),
    [
        ("localhost:3000", "needs a scheme"),
        ("cloud.langfuse.com", "needs a scheme"),
        ("ftp://cloud.langfuse.com", "the scheme must be http or https, not ftp"),
        ("https://", "needs a host"),
        ("https://langfuse.example.com/?x=1", "query"),
        ("https://cloud.langfuse.com/api/public", "without /api/public"),
        ("https://example.com/langfuse/api/public/ingestion", "without /api/public"),
    ],
)
def test_a_host_without_scheme_or_host_is_refused(host: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_host(host)


def test_langfuse_base_url_wins_over_langfuse_host_as_in_langfuses_sdk() -> None:
    """Langfuse's SDK 5.x reads LANGFUSE_BASE_URL first, LANGFUSE_HOST (its older name) after;
    the worker too, and its messages name the setting in use."""
    from pydantic import SecretStr

    from worker.cli import make_drainer
    from worker.config import WorkerSettings

    def settings(**urls: str) -> WorkerSettings:
        values: dict[str, Any] = {
            "supabase_url": "http://127.0.0.1:1",
            "supabase_service_role_key": SecretStr("sb_secret_x"),
            "langfuse_public_key": "pk",
            "langfuse_secret_key": SecretStr("sk"),
            **urls,
        }
        return WorkerSettings(_env_file=None, **values)  # type: ignore[call-arg]

    both = settings(langfuse_base_url="https://b.example", langfuse_host="https://h.example")
    assert both.langfuse_url == ("LANGFUSE_BASE_URL", "https://b.example")
    assert settings(langfuse_host="https://h.example").langfuse_url == (
        "LANGFUSE_HOST", "https://h.example"
    )
    assert settings(langfuse_base_url="https://b.example").langfuse_configured
    drainer = make_drainer(settings(langfuse_base_url="b.example"), cast(Store, NoHold()))
    assert drainer.config_error is not None
    assert drainer.config_error.startswith("LANGFUSE_BASE_URL='b.example' needs a scheme")
    missing = settings().langfuse_missing
    assert missing == ["LANGFUSE_BASE_URL (or LANGFUSE_HOST)"]


def test_a_host_keeps_its_path_prefix() -> None:
    assert check_host("https://example.com/langfuse/") == "https://example.com/langfuse"
    assert check_host("https://example.com/api/publications") == "https://example.com/api/publications"


def test_a_host_pasted_with_blanks_is_trimmed() -> None:
    assert check_host(" https://example.com/ \n") == "https://example.com"


@pytest.mark.parametrize(
    ("environment", "kept"),
    [
        ("production", "production"),
        ("Staging", "staging"),
        ("langfuse-prod", "prod"),
        ("LANGFUSE_Prod", "prod"),
        ("langfuselangfuse-x", "x"),
        ("a" * 41, "a" * 40),
        ("eu-1_B", "eu-1_b"),
    ],
)
def test_the_environment_is_kept_as_langfuse_keeps_it(
    standin: LangfuseStandin, environment: str, kept: str
) -> None:
    """Langfuse's PublicEnvironmentName (types.ts, v3.225.4 and main) lower-cases, strips
    leading langfuse prefixes and keeps 40 characters: traces sent as `Staging` are in
    `staging`, and so are the scores."""
    with sender_for(standin, environment=environment) as sender:
        assert sender.environment == kept
        assert outcomes(sender.send(make_items(1))) == {Outcome.sent}
    ((row,),) = standin.scores.values()
    assert row["environment"] == kept


@pytest.mark.parametrize("environment", ["", "langfuse", "Langfuse_", "prod env", "prod.eu"])
def test_an_environment_langfuse_would_file_under_default_is_refused(environment: str) -> None:
    with pytest.raises(ValueError, match=f"environment {environment!r} would be filed under"):
        LangfuseSender("http://localhost:3000", "pk", "sk", 1.0, environment=environment)


def test_the_check_reads_an_empty_batch_result_with_other_top_level_keys() -> None:
    """A 207 for the empty batch with a notice beside successes and errors (as Cloud adds
    `_deprecation` to some 207s) still means the keys work; without the two lists it does not."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/public/health":
            return httpx.Response(200, json={"status": "OK", "version": "4.61.0"})
        return httpx.Response(207, json=body)

    with LangfuseSender("http://langfuse.test", "pk", "sk", 1.0) as sender:
        sender.http.close()
        sender.http = httpx.Client(transport=httpx.MockTransport(answer))
        body: dict[str, Any] = {"successes": [], "errors": [], "_deprecation": {"message": "x"}}
        assert check(sender) == (4, 61, 0)
        body = {"successes": [], "_deprecation": {"message": "x"}}
        with pytest.raises(LangfuseUnavailable, match="without the ingestion result"):
            check(sender)


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        LangfuseSender("http://localhost:3000", "pk", "", 1.0)
    with pytest.raises(ValueError):
        LangfuseSender("http://localhost:3000", "pk", "sk", 0)
    with pytest.raises(ValueError):
        LangfuseSender("http://localhost:3000", "pk", "sk", 1.0, batch_size=0)
    with pytest.raises(ValueError):
        LangfuseSender("http://localhost:3000", "pk", "sk", 1.0, max_request_bytes=1023)


def test_versions_and_generations() -> None:
    assert parse_version("4.16.0") == (4, 16, 0)
    assert parse_version("v3.225.4") == (3, 225, 4)
    assert parse_version("4.60.1-rc.1") == (4, 60, 1)
    assert parse_version("latest") is None and parse_version(None) is None
    assert generation((3, 225, 4)) == "v3"
    assert generation((4, 58, 9)) == "v4 before 4.59"
    assert generation((4, 59, 0)) == "v4 4.59 or later"


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ({}, True),
        ({"traceId": ""}, False),  # an empty trace id counts as none
        ({"sessionId": "s"}, False),  # exactly one subject
        ({"traceId": None, "sessionId": "s"}, True),
        ({"traceId": None, "sessionId": "s", "observationId": "o"}, False),
        ({"source": "SDK"}, False),
        ({"source": "EVAL"}, True),
        ({"dataType": "TEXT", "value": "x" * 501}, False),
        ({"dataType": "TEXT", "value": "x" * 500}, True),
        ({"dataType": "BOOLEAN", "value": 2}, False),
        ({"comment": 5}, False),
        ({"unknownKey": 1}, True),  # zod strips unknown keys
    ],
)
def test_the_standin_validates_score_events_as_langfuse_does(
    change: dict[str, Any], accepted: bool
) -> None:
    """ScoreBody and applyScoreValidation (packages/shared, v3.225.4 and v4.16.0): a refused
    event is a 400 item in the 207, the others pass."""
    import httpx

    score = {"id": "s1", "traceId": "t", "name": "n", "value": 1, "dataType": "NUMERIC"}
    event = {
        "id": "e1",
        "type": "score-create",
        "timestamp": "2024-05-01T12:00:00.000Z",
        "body": {k: v for k, v in (score | change).items() if v is not None},
    }
    with LangfuseStandin(generation="v4") as lf:
        answer = httpx.post(
            lf.url + INGESTION_PATH, json={"batch": [event]}, auth=(lf.public_key, lf.secret_key)
        )
        assert answer.status_code == 207
        result = answer.json()
        assert [s["id"] for s in result["successes"]] == (["e1"] if accepted else [])
        assert [(e["id"], e["status"]) for e in result["errors"]] == (
            [] if accepted else [("e1", 400)]
        )
        assert bool(lf.table) is accepted


def test_the_standin_reads_json_only_when_the_request_says_it_is_json() -> None:
    """Next.js parses the body as JSON only with Content-Type application/json; otherwise the
    route sees a string and answers 400 Invalid request data."""
    import httpx

    with LangfuseStandin(generation="v3") as lf:
        answer = httpx.post(
            lf.url + INGESTION_PATH,
            content=b'{"batch": []}',
            headers={"content-type": "text/plain"},
            auth=(lf.public_key, lf.secret_key),
        )
    assert answer.status_code == 400
    assert answer.json()["message"] == "Invalid request data"


@pytest.mark.parametrize("generation_name", sorted(EVENTS_ONLY))
def test_v4_and_cloud_take_score_events_and_refuse_other_types_one_by_one(
    generation_name: Generation,
) -> None:
    """v4's default `events_only` write mode (Cloud's for this route from its v3 ingestion
    sunset on 2026-11-16): a trace-create, or an event that is not an object, is refused on
    its own inside the 207 (400 "Event type not accepted", after the batch's own errors); an
    sdk-log is taken and dropped (neither a success nor an error); our score-create events are
    stored, and the worker reads the answer as sent for them, failed for the others."""
    import httpx

    with LangfuseStandin(generation=generation_name) as lf, sender_for(lf) as sender:
        items = make_items(3)
        ours = [sender.event(item) for item in items]
        stamp = ours[0]["timestamp"]
        trace = {"id": "ev-trace", "type": "trace-create", "timestamp": stamp, "body": {}}
        log = {"id": "ev-log", "type": "sdk-log", "timestamp": stamp, "body": {"log": "hi"}}
        bad = ours[0] | {"id": "ev-bad", "body": ours[0]["body"] | {"id": "x", "value": "1"}}
        batch = [trace, *ours, log, bad, 42]
        answer = httpx.post(
            lf.url + INGESTION_PATH, json={"batch": batch}, auth=(lf.public_key, lf.secret_key)
        )
        assert answer.status_code == 207
        result = answer.json()
        assert sorted(s["id"] for s in result["successes"]) == sorted(e["id"] for e in ours)
        assert {s["status"] for s in result["successes"]} == {201}
        assert [(e["id"], e["status"], e["message"]) for e in result["errors"]] == [
            ("ev-bad", 400, "Invalid request data"),
            ("ev-trace", 400, "Event type not accepted"),
            ("unknown", 400, "Event type not accepted"),
        ]
        assert "'trace-create'" in result["errors"][1]["error"]
        assert set(lf.scores) == {item.score_id for item in items}

        ids = [e["id"] for e in batch if isinstance(e, dict)]
        verdicts = classify(207, answer.headers, answer.content, ids, datetime.now(UTC))
        assert {i: v.outcome for i, v in verdicts.items()} == {
            "ev-trace": Outcome.failed,
            **{e["id"]: Outcome.sent for e in ours},
            "ev-log": Outcome.retry,  # never confirmed: the sender never sends one
            "ev-bad": Outcome.failed,
        }
        assert "Event type not accepted" in (verdicts["ev-trace"].error or "")

        assert outcomes(sender.send(make_items(5, start=10))) == {Outcome.sent}
        assert len(lf.scores) == 8 and lf.duplicates() == {}


# -- what a failure to connect says about LANGFUSE_HOST --------------------------------------


def connect_error(cause: BaseException) -> httpx.ConnectError:
    """A ConnectError as httpx raises it, from `cause` (httpcore's error in between)."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise httpx.ConnectError(str(inner)) from inner
    except httpx.ConnectError as exc:
        return exc


@pytest.mark.parametrize(
    ("cause", "setting"),
    [
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), False),
        (socket.gaierror(socket.EAI_FAIL, "Non-recoverable failure in name resolution"), False),
        (ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred"), False),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"), False),
        (ConnectionResetError(104, "Connection reset by peer"), False),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), True),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), True),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), True),
    ],
    ids=["eai-again", "eai-fail", "tls-eof", "tls-closed", "reset", "nxdomain", "cert",
         "plain-http-port"],
)
def test_only_a_name_that_does_not_exist_or_tls_that_cannot_work_is_a_setting(
    cause: BaseException, setting: bool
) -> None:
    """A resolver's temporary failure or a handshake cut short is the moment's trouble: the
    rows wait for the next pass (unreachable); a wrong name, an untrusted certificate or a
    plain-HTTP port is a setting (off, checked again every few minutes)."""
    exc = connect_error(cause)
    assert (unusable_host(exc, "https://langfuse.example.com") is not None) is setting
    with LangfuseSender("https://langfuse.example.com", "pk", "sk", 2.0) as sender:
        verdict = sender._unanswered(exc)
    assert verdict.outcome == (Outcome.off if setting else Outcome.unreachable)
    assert verdict.stop


@pytest.mark.parametrize(
    ("cause", "outcome", "error"),
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            Outcome.off,
            "the host name langfuse.example.com does not resolve",
        ),
        (
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure"),
            Outcome.unreachable,
            "timeout after 0.2s connecting",
        ),
    ],
    ids=["nxdomain", "eai-again"],
)
def test_a_name_lookup_answered_after_the_deadline_keeps_its_verdict(
    monkeypatch: pytest.MonkeyPatch, cause: BaseException, outcome: Outcome, error: str
) -> None:
    """The resolver's look-up is the one wait no watchdog cuts. When it says, past the
    exchange's deadline, that the name does not exist, that is still a setting to fix (no
    timeout would ever find the host); a temporary failure past the deadline is the timeout
    it ran into: nothing was sent."""
    expired = threading.Event()
    expire = langfuse_http.Deadline._expire

    def expire_and_tell(deadline: langfuse_http.Deadline) -> None:
        expire(deadline)
        expired.set()

    monkeypatch.setattr(langfuse_http.Deadline, "_expire", expire_and_tell)

    def slow_resolver(request: httpx.Request) -> httpx.Response:
        assert expired.wait(10), "the deadline's watchdog never fired"
        raise connect_error(cause)

    with LangfuseSender("http://langfuse.example.com", "pk", "sk", 0.2) as sender:
        sender.http = httpx.Client(transport=httpx.MockTransport(slow_resolver))
        (delivery,) = sender.send(make_items(1))
    assert delivery.outcome == outcome
    assert error in (delivery.error or "")


def test_a_temporary_dns_failure_at_the_check_is_unavailable_not_a_setting() -> None:
    """The start-up check follows the same rule: EAI_AGAIN is "not reachable, checked again
    next pass", not "mirror off for 5 minutes"."""

    def transport(request: httpx.Request) -> httpx.Response:
        raise connect_error(socket.gaierror(socket.EAI_AGAIN, "Temporary failure"))

    with LangfuseSender("http://langfuse.example.com", "pk", "sk", 2.0) as sender:
        sender.http = httpx.Client(transport=httpx.MockTransport(transport))
        with pytest.raises(LangfuseUnavailable) as raised:
            check(sender)
    assert not isinstance(raised.value, LangfuseConfigError)


def test_an_answer_whose_body_cannot_be_read_at_the_check_is_unavailable() -> None:
    """A health answer marked gzip that is not: httpx raises DecodingError (no TransportError);
    the check says Langfuse cannot be asked now, instead of raising it."""

    def transport(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-encoding": "gzip"}, content=b'{"status":"OK"}'
        )

    with LangfuseSender("http://langfuse.example.com", "pk", "sk", 2.0) as sender:
        sender.http = httpx.Client(transport=httpx.MockTransport(transport))
        with pytest.raises(LangfuseUnavailable, match="an answer that could not be read"):
            check(sender)


def test_a_207_whose_body_cannot_be_read_is_an_unconfirmed_retry() -> None:
    """A proxy marks Langfuse's 207 gzip without compressing it (the stand-in's
    proxy_bad_encoding): each row is a retry (an attempt: resending is harmless, Langfuse
    stored them), not an exception out of `send`."""
    with LangfuseStandin() as lf, sender_for(lf) as sender:
        check(sender)  # the empty batch's 207 is readable
        lf.set_mode("proxy_bad_encoding")
        deliveries = sender.send(make_items(3))
        assert len(lf.score_requests) == 1
    assert outcomes(deliveries) == {Outcome.retry}
    assert all("HTTP 207 with a body that could not be read" in (d.error or "")
               for d in deliveries)


class _Drip:
    """A server on 127.0.0.1 (port 0) whose answers, health route and ingestion alike, are
    `status` with `body`, sent `drip` bytes at a time every `pause` seconds (pause 0: at once),
    until the client goes or the server stops."""

    def __init__(self, status: int, body: bytes, *, drip: int = 1, pause: float = 0.0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stop = self.stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                step = drip if pause else len(body)
                for start in range(0, len(body), step):
                    if stop.wait(pause) if pause else stop.is_set():
                        return
                    try:
                        self.wfile.write(body[start : start + step])
                        self.wfile.flush()
                    except OSError:
                        return

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> _Drip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _drip_sender(url: str, timeout: float) -> LangfuseSender:
    return LangfuseSender(url, "pk", "sk", timeout, environment="production")


def test_an_answer_trickling_in_times_out_within_the_timeout_in_all() -> None:
    # httpx's timeout bounds each read: a byte every 0.1 s never trips it, the deadline does
    items = make_items(2)
    ok = json.dumps(
        {"successes": [{"id": i.envelope_id, "status": 201} for i in items], "errors": []}
    ).encode()
    with _Drip(207, ok + b" " * 1000, pause=0.1) as server:
        with _drip_sender(server.url, 0.6) as sender:
            started = time.monotonic()
            deliveries = sender.send(items)
            elapsed = time.monotonic() - started
        assert outcomes(deliveries) == {Outcome.retry}  # as a read timeout: an attempt
        assert "timeout after 0.6s waiting for a response" in (deliveries[0].error or "")
        assert 0.55 <= elapsed < 0.6 + 0.6 + 1.0  # the deadline, then at most one read
        with _drip_sender(server.url, 0.6) as sender:
            started = time.monotonic()
            with pytest.raises(LangfuseUnavailable, match=r"health: timeout after 0\.6s"):
                check(sender)
            assert time.monotonic() - started < 0.6 + 0.6 + 1.0


def test_an_answer_over_a_mebibyte_is_unreadable() -> None:
    items = make_items(2)
    ok = json.dumps(
        {"successes": [{"id": i.envelope_id, "status": 201} for i in items], "errors": []}
    ).encode()
    with _Drip(207, ok + b" " * (1 << 20)) as server, _drip_sender(server.url, 5) as sender:
        deliveries = sender.send(items)
        # read in full it would confirm both: over the cap, a 2xx confirms nothing
        assert outcomes(deliveries) == {Outcome.retry}
        assert "bytes" in (deliveries[0].error or "")
        with pytest.raises(LangfuseUnavailable, match="could not be read"):
            check(sender)
    health = json.dumps({"status": "OK", "version": "4.16.0"}).encode()
    # under the cap: the health route is read as before (its version passes), the batch not
    with (
        _Drip(200, health + b" " * 1000) as server,
        _drip_sender(server.url, 5) as sender,
        pytest.raises(LangfuseUnavailable, match="without the ingestion result"),
    ):
        check(sender)
