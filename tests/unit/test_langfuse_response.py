"""The pure classification of one Langfuse ingestion answer into a verdict per row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.langfuse_response import (
    MAX_ERROR_CHARS,
    MAX_RETRY_AFTER_SECONDS,
    SUSPENDED_RETRY_SECONDS,
    Outcome,
    Verdict,
    classify,
    health_version,
    passed_empty_batch,
    redirect_advice,
    retry_after,
    unreadable,
)

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
IDS = ["a", "b", "c"]


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def run(
    status: int, payload: Any = None, headers: dict[str, str] | None = None
) -> dict[str, Verdict]:
    raw = payload if isinstance(payload, bytes) else b"" if payload is None else body(payload)
    return classify(status, headers or {}, raw, IDS, NOW)


def one(verdicts: dict[str, Verdict]) -> Verdict:
    """The verdict shared by every row (asserts they share one)."""
    assert set(verdicts) == set(IDS)
    (verdict,) = set(verdicts.values())
    return verdict


# -- 207: the documented result, one entry per event ---------------------------------------------


def test_207_gives_each_row_its_own_outcome() -> None:
    verdicts = run(
        207,
        {
            "successes": [{"id": "a", "status": 201}],
            "errors": [
                {
                    "id": "b",
                    "status": 400,
                    "message": "Invalid request data",
                    "error": "name: required",
                },
                {"id": "c", "status": 500, "error": "Internal Server Error"},
            ],
        },
    )
    assert verdicts["a"] == Verdict(Outcome.sent)
    assert verdicts["b"].outcome == Outcome.failed
    assert (
        verdicts["b"].error
        == "rejected by Langfuse (HTTP 400): Invalid request data: name: required"
    )
    assert verdicts["c"].outcome == Outcome.retry
    assert "HTTP 500" in (verdicts["c"].error or "")
    assert not any(v.stop for v in verdicts.values())


@pytest.mark.parametrize("item_status", [429, 500, 503])
def test_207_item_errors_that_are_transient_retry(item_status: int) -> None:
    verdicts = run(
        207, {"successes": [], "errors": [{"id": i, "status": item_status} for i in IDS]}
    )
    assert {v.outcome for v in verdicts.values()} == {Outcome.retry}


@pytest.mark.parametrize("item_status", [400, 401, 404, 409])
def test_207_item_errors_that_are_permanent_fail(item_status: int) -> None:
    verdicts = run(
        207, {"successes": [], "errors": [{"id": i, "status": item_status} for i in IDS]}
    )
    assert {v.outcome for v in verdicts.values()} == {Outcome.failed}


def test_207_a_row_neither_accepted_nor_rejected_is_not_confirmed() -> None:
    verdicts = run(207, {"successes": [{"id": "a", "status": 201}], "errors": []})
    assert verdicts["a"].outcome == Outcome.sent
    assert verdicts["b"] == Verdict(Outcome.retry, "Langfuse did not confirm the score")


def test_207_an_id_both_accepted_and_rejected_counts_as_rejected() -> None:
    verdicts = run(207, {"successes": [{"id": "a"}], "errors": [{"id": "a", "status": 400}]})
    assert verdicts["a"].outcome == Outcome.failed


def test_207_an_item_status_that_is_not_a_number_is_read_as_a_server_error() -> None:
    verdicts = run(207, {"successes": [], "errors": [{"id": "a", "status": "bad"}]})
    assert verdicts["a"] == Verdict(
        Outcome.retry, "rejected by Langfuse (HTTP 500): Internal Server Error"
    )


def test_207_an_item_rejected_without_a_message_is_named_by_its_status() -> None:
    # `message` and `error` are optional in an error entry: the row's error names the status.
    verdicts = run(207, {"successes": [], "errors": [{"id": "a", "status": 400}]})
    assert verdicts["a"] == Verdict(Outcome.failed, "rejected by Langfuse (HTTP 400): Bad Request")


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (200, {}),  # `{}` is no confirmation
        (200, {"successes": [{"id": "a"}], "errors": []}),  # the right shape, the wrong status
        (201, {"id": "a"}),
        (202, {"message": "Accepted"}),  # the /scores answer, not the ingestion one
        (204, None),
        (207, {}),
        (207, {"accepted": 3, "rejected": 0, "errors": []}),
        (207, {"successes": "a", "errors": []}),
        (207, {"successes": [], "errors": {}}),
        (207, {"successes": ["a"], "errors": []}),
        (207, {"successes": [{"id": 1}], "errors": []}),
        (207, {"successes": [], "errors": [{"status": 400}]}),
        (207, [{"id": "a"}]),
        (207, b"<html>ok</html>"),
        (207, b"\xff\xfe"),
    ],
)
def test_a_2xx_without_the_documented_body_confirms_nothing(status: int, payload: Any) -> None:
    verdict = one(run(status, payload))
    assert verdict.outcome == Outcome.retry
    assert verdict.error is not None and "not confirmed" in verdict.error
    assert not verdict.stop


# -- whole-request answers ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
def test_a_redirect_is_never_taken_for_delivery(status: int) -> None:
    """As at start: the mirror turns off (no attempt), saying where the host redirects."""
    verdict = one(run(status, b"Moved", {"Location": "https://langfuse.example.com/api"}))
    assert verdict.outcome == Outcome.off
    assert verdict.stop
    assert verdict.error is not None
    assert "https://langfuse.example.com/api" in verdict.error and "LANGFUSE_HOST" in verdict.error


def test_a_redirect_without_a_location_says_so() -> None:
    verdict = one(run(302, b""))
    assert verdict == Verdict(
        Outcome.off,
        "HTTP 302: redirected to no location given; set LANGFUSE_HOST to the server itself",
        stop=True,
    )


def test_413_asks_for_smaller_requests() -> None:
    verdict = one(run(413, b"Body exceeded 4.5mb limit"))
    assert verdict == Verdict(Outcome.smaller, "HTTP 413: Body exceeded 4.5mb limit")


def test_429_waits_as_long_as_retry_after_says() -> None:
    verdict = one(run(429, {"message": "Rate limit exceeded"}, {"Retry-After": "17"}))
    assert verdict == Verdict(Outcome.wait, "HTTP 429: Rate limit exceeded", 17.0, stop=True)


def test_429_without_retry_after_waits_for_the_backoff_alone() -> None:
    verdict = one(run(429, {"message": "Rate limit exceeded"}))
    assert (verdict.outcome, verdict.retry_after_seconds, verdict.stop) == (
        Outcome.wait,
        None,
        True,
    )


SUSPENSION = "Ingestion suspended: Usage threshold exceeded. Please upgrade your plan."
NGINX_403 = (
    b"<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
    b"<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def test_403_usage_suspension_waits() -> None:
    # exactly what web/src/pages/api/public/ingestion.ts answers (ForbiddenError -> 403)
    verdict = one(run(403, {"error": "ForbiddenError", "message": SUSPENSION}))
    assert verdict.outcome == Outcome.wait
    assert verdict.retry_after_seconds == SUSPENDED_RETRY_SECONDS
    assert verdict.stop and verdict.error is not None and SUSPENSION in verdict.error


@pytest.mark.parametrize(
    "payload",
    [
        # the MCP route's wording, not the ingestion route's
        {"error": "ForbiddenError", "message": SUSPENSION.replace("Ingestion", "Access")},
        # the right words without Langfuse's error shape: not Langfuse's answer
        {"message": SUSPENSION},
        SUSPENSION.encode(),
        # a proxy's page that happens to say "suspended"
        b"<html><body>Your account has been suspended</body></html>",
    ],
)
def test_only_langfuses_own_suspension_waits(payload: Any) -> None:
    """The word "suspended" alone is no suspension: these refuse us, the mirror goes off."""
    verdict = one(run(403, payload))
    assert (verdict.outcome, verdict.retry_after_seconds, verdict.stop) == (Outcome.off, None, True)


def test_a_403_without_langfuses_error_body_is_named_a_proxy_or_firewall() -> None:
    verdict = one(run(403, NGINX_403))
    assert verdict.outcome == Outcome.off and verdict.stop
    assert verdict.error is not None
    assert verdict.error.startswith("refused by something in front of Langfuse, not Langfuse")
    assert "a proxy or firewall" in verdict.error and "HTTP 403: <html>" in verdict.error
    assert "keys" not in verdict.error


@pytest.mark.parametrize(
    "payload",
    [
        {"error": "Forbidden", "message": "Forbidden"},  # not a `<Name>Error`
        {"error": "ForbiddenError"},  # no message
        {"error": "ForbiddenError", "message": ["Forbidden"]},  # a message that is not text
        {"error": ["ForbiddenError"], "message": "Forbidden"},
        ["ForbiddenError", "Forbidden"],
    ],
)
def test_only_langfuses_error_body_makes_a_403_langfuses(payload: Any) -> None:
    """Langfuse's refusals are `{"error": "<Name>Error", "message": "..."}` (its handlers'
    `res.status(error.httpCode).json({error: error.name, message: error.message})`); any other
    body came from something in front of it."""
    verdict = one(run(403, payload))
    assert verdict.outcome == Outcome.off and verdict.error is not None
    assert verdict.error.startswith("refused by something in front of Langfuse")


def test_langfuses_own_403_other_than_a_suspension_is_a_refused_request() -> None:
    verdict = one(run(403, {"error": "ForbiddenError", "message": "Forbidden"}))
    assert verdict == Verdict(
        Outcome.off, "Langfuse refused the request: HTTP 403: Forbidden: ForbiddenError", stop=True
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"error": "MethodNotAllowedError", "message": "Method not allowed"},  # Langfuse's shape
        b"<html><head><title>405 Not Allowed</title></head></html>",  # nginx, static files
    ],
)
def test_405_is_a_wrong_host_or_path_or_a_proxy_not_the_keys(payload: Any) -> None:
    verdict = one(run(405, payload))
    assert verdict.outcome == Outcome.off and verdict.stop
    assert verdict.error is not None
    assert verdict.error.startswith("method not allowed, though Langfuse takes POST")
    assert "a wrong host or path" in verdict.error and "a proxy" in verdict.error
    assert "keys" not in verdict.error


@pytest.mark.parametrize("status", [502, 503, 504])
@pytest.mark.parametrize(("headers", "delay"), [({"Retry-After": "5"}, 5.0), ({}, None)])
def test_a_gateways_5xx_is_an_outage_that_waits_not_an_attempt(
    status: int, headers: dict[str, str], delay: float | None
) -> None:
    """langfuse-web restarting behind a proxy: the rows wait (the database's hold, for the
    Retry-After when given, else its doubling backoff), no attempt spent."""
    verdict = one(run(status, b"<html>Bad Gateway</html>", headers))
    assert verdict == Verdict(
        Outcome.wait, f"HTTP {status}: <html>Bad Gateway</html>", delay, stop=True
    )


@pytest.mark.parametrize("status", [500, 501, 599])
@pytest.mark.parametrize(("headers", "delay"), [({"Retry-After": "5"}, 5.0), ({}, None)])
def test_langfuses_500_holds_every_worker_and_stays_an_attempt(
    status: int, headers: dict[str, str], delay: float | None
) -> None:
    """Langfuse's catch-all 500 (storage, Redis, the database down, or a body that breaks
    it): a retry, so attempts bound it, that also sets the hold (no storm)."""
    payload = {"message": "Invalid request data", "errors": ["Redis not initialized"]}
    verdict = one(run(status, payload, headers))
    assert (verdict.outcome, verdict.retry_after_seconds, verdict.stop, verdict.hold) == (
        Outcome.retry, delay, True, True
    )


def test_a_408_retries_and_stops_the_pass_without_a_hold() -> None:
    verdict = one(run(408, {"message": "boom"}, {"Retry-After": "5"}))
    assert verdict == Verdict(Outcome.retry, "HTTP 408: boom", 5.0, stop=True, hold=False)


def test_only_a_top_level_500_holds() -> None:
    """Per-item 5xx inside a 207 are one event's: they retry without holding anyone."""
    payload = {"successes": [], "errors": [{"id": i, "status": 503} for i in IDS]}
    assert {(v.outcome, v.hold, v.stop) for v in run(207, payload).values()} == {
        (Outcome.retry, False, False)
    }
    for status in (200, 207, 301, 400, 401, 404, 413, 429):
        assert not any(v.hold for v in run(status, {"message": "x"}).values()), status


@pytest.mark.parametrize(
    ("status", "outcome"), [(429, Outcome.wait), (503, Outcome.wait), (500, Outcome.retry)]
)
@pytest.mark.parametrize(
    "headers",
    [
        # Retry-After as an HTTP-date (RFC 9110), e.g. from a gateway in front of Langfuse
        {"Retry-After": format_datetime(NOW + timedelta(seconds=90), usegmt=True)},
        # X-RateLimit-Reset as Langfuse writes it (JavaScript's Date.toString())
        {"X-RateLimit-Reset": "Mon Nov 30 2026 12:01:30 GMT+0000 (Coordinated Universal Time)"},
    ],
)
def test_a_date_to_come_back_at_is_read_against_now(
    status: int, outcome: Outcome, headers: dict[str, str]
) -> None:
    verdict = one(run(status, {"message": "later"}, headers))
    assert (verdict.outcome, verdict.retry_after_seconds, verdict.stop) == (outcome, 90.0, True)


@pytest.mark.parametrize(
    ("status", "outcome", "stop"),
    [
        (400, Outcome.failed, False),
        (401, Outcome.off, True),
        (405, Outcome.off, True),
        (409, Outcome.failed, False),
        (422, Outcome.failed, False),
    ],
)
def test_other_4xx_fail_for_good_or_turn_the_mirror_off_with_the_servers_message(
    status: int, outcome: Outcome, stop: bool
) -> None:
    """401/405 (and a 403 that is not a suspension) refuse us, not the scores: the mirror goes
    off and the rows are left as they were; the other 4xx fail the rows they carried."""
    verdict = one(
        run(
            status,
            {"message": "Invalid request data", "errors": ["Expected object, received array"]},
        )
    )
    assert verdict.outcome == outcome
    assert verdict.stop is stop
    assert verdict.error is not None
    assert f'HTTP {status}: Invalid request data: ["Expected object, received array"]' in (
        verdict.error
    )


@pytest.mark.parametrize("status", [404, 410])
def test_no_ingestion_route_waits_and_says_why(status: int) -> None:
    """A host that does not serve the route (a proxy, a wrong base path): the rows are not at
    fault, so they wait without spending an attempt, and the pass stops."""
    verdict = one(run(status, b"404: This page could not be found."))
    assert verdict.outcome == Outcome.wait
    assert verdict.stop is True
    assert verdict.retry_after_seconds == 300.0
    assert verdict.error is not None and "no POST /api/public/ingestion" in verdict.error


def test_401_keeps_langfuses_words() -> None:
    message = "Invalid credentials. Confirm that you've configured the correct host."
    verdict = one(run(401, {"error": "UnauthorizedError", "message": message}))
    assert verdict.error == f"Langfuse refused the keys: HTTP 401: {message}: UnauthorizedError"


def test_a_401_without_langfuses_error_body_is_not_about_the_keys() -> None:
    """A proxy asking for credentials of its own (basic auth in front of Langfuse)."""
    verdict = one(run(401, b"<html><title>401 Authorization Required</title></html>"))
    assert verdict.outcome == Outcome.off and verdict.error is not None
    assert verdict.error.startswith("refused by something in front of Langfuse")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "HTTP 400: Bad Request"),
        (b"plain words", "HTTP 400: plain words"),
        (b"{}", "HTTP 400: {}"),
    ],
)
def test_error_text_falls_back_to_the_body_then_the_phrase(raw: bytes, expected: str) -> None:
    assert one(run(400, raw)).error == expected


def test_a_proxys_detail_is_the_message() -> None:
    # `detail` is how many gateways and frameworks in front of a server phrase an error
    verdict = one(run(502, {"detail": "upstream connect error"}))
    assert verdict.error == "HTTP 502: upstream connect error"


def test_a_body_that_is_not_utf8_is_shown_not_raised() -> None:
    verdict = one(run(503, b"Service unavailable \xe9t\xe9"))
    assert verdict == Verdict(
        Outcome.wait, "HTTP 503: Service unavailable \ufffdt\ufffd", stop=True
    )


def test_an_unknown_status_has_a_message_too() -> None:
    assert one(classify(499, {}, b"", IDS, NOW)).error == "HTTP 499: error"


def test_errors_are_cut_to_a_bounded_length() -> None:
    error = one(run(400, {"message": "x" * 5000})).error or ""
    assert len(error) == MAX_ERROR_CHARS and error.endswith("…")


def test_an_error_exactly_at_the_bound_is_kept_whole() -> None:
    message = "x" * (MAX_ERROR_CHARS - len("HTTP 400: "))
    assert one(run(400, {"message": message})).error == f"HTTP 400: {message}"


@settings(deadline=None)
@given(
    status=st.integers(min_value=100, max_value=999),
    headers=st.dictionaries(
        st.sampled_from(["Retry-After", "X-RateLimit-Reset", "Location", "Content-Type"]),
        st.text(max_size=40),
    ),
    raw=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda ids, status: body(
                {"successes": [{"id": i} for i in ids], "errors": [{"id": "b", "status": status}]}
            ),
            st.lists(st.sampled_from(IDS)),
            st.one_of(st.integers(), st.text(max_size=5), st.none()),
        ),
    ),
)
def test_classify_is_total(status: int, headers: dict[str, str], raw: bytes) -> None:
    # The documented contract: never raises, and every row gets a verdict.
    verdicts = classify(status, headers, raw, IDS, NOW)
    assert set(verdicts) == set(IDS)
    assert all(len(v.error or "") <= MAX_ERROR_CHARS for v in verdicts.values())


def test_every_row_gets_a_verdict_even_with_no_rows() -> None:
    assert classify(207, {}, body({"successes": [], "errors": []}), [], NOW) == {}


# -- Retry-After -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "99999999"}, MAX_RETRY_AFTER_SECONDS),
        ({"retry-after": format_datetime(NOW + timedelta(seconds=90), usegmt=True)}, 90.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "soon", "x-ratelimit-reset": "30"}, 30.0),
        ({"x-ratelimit-reset": str(int(NOW.timestamp()) + 45)}, 45.0),
        (
            {"x-ratelimit-reset": "Mon Nov 30 2026 12:01:00 GMT+0000 (Coordinated Universal Time)"},
            60.0,
        ),
        ({"x-ratelimit-reset": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_dates_and_langfuses_reset(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after(headers, NOW) == seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        # Unix time in milliseconds (what Date.now() gives): 60 s, not a day
        ({"x-ratelimit-reset": str(int(NOW.timestamp() * 1000) + 60_000)}, 60.0),
        ({"ratelimit-reset": str(int(NOW.timestamp() * 1000) + 30_000)}, 30.0),
        # Unix time in seconds, in either reset header
        ({"ratelimit-reset": str(int(NOW.timestamp()) + 20)}, 20.0),
        # delta-seconds: the IETF draft's RateLimit-Reset, and an X-RateLimit-Reset so sent
        ({"ratelimit-reset": "60"}, 60.0),
        ({"x-ratelimit-reset": "75"}, 75.0),
        # a time gone by is no wait; 1e9 - 1 s of delta is over a day, read as a day
        ({"x-ratelimit-reset": str(int(NOW.timestamp()) - 5)}, 0.0),
        ({"ratelimit-reset": "999999999"}, MAX_RETRY_AFTER_SECONDS),
        # Retry-After first, then RateLimit-Reset, then X-RateLimit-Reset
        ({"retry-after": "3", "ratelimit-reset": "60", "x-ratelimit-reset": "90"}, 3.0),
        ({"ratelimit-reset": "60", "x-ratelimit-reset": "90"}, 60.0),
        ({"ratelimit-reset": "later", "x-ratelimit-reset": "90"}, 90.0),
        # Retry-After is delta-seconds only (RFC 9110): a big number is a long wait, not a time
        ({"retry-after": str(int(NOW.timestamp()) + 20)}, MAX_RETRY_AFTER_SECONDS),
        # the bounds belong to the larger unit: 10^12 is milliseconds, 10^9 seconds (both in
        # 2001: gone by, no wait), not 10^12 seconds or a 31-year delay (a day)
        ({"x-ratelimit-reset": "1000000000000"}, 0.0),
        ({"ratelimit-reset": "1000000000"}, 0.0),
    ],
)
def test_reset_headers_read_epoch_seconds_milliseconds_and_delta_seconds(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after(headers, NOW) == pytest.approx(seconds)


def test_a_429_with_only_an_ietf_ratelimit_reset_holds_that_long() -> None:
    verdict = one(run(429, b"", {"RateLimit-Reset": "42"}))
    assert (verdict.outcome, verdict.retry_after_seconds) == (Outcome.wait, 42.0)


@pytest.mark.parametrize("status", [200, 207])
def test_a_2xx_whose_body_cannot_be_read_confirms_nothing(status: int) -> None:
    verdicts = unreadable(status, {}, "Error -3 while decompressing data", IDS, NOW)
    assert set(verdicts) == set(IDS)
    verdict = one(verdicts)
    assert verdict.outcome == Outcome.retry and not verdict.hold
    assert verdict.error is not None
    assert f"HTTP {status} with a body that could not be read" in verdict.error
    assert "decompressing" in verdict.error and "not confirmed" in verdict.error


def test_a_408_takes_an_http_date_retry_after() -> None:
    later = format_datetime(NOW + timedelta(seconds=40), usegmt=True)
    verdict = one(run(408, b"", {"Retry-After": later}))
    assert (verdict.outcome, verdict.retry_after_seconds) == (Outcome.retry, 40.0)


def test_a_3xx_whose_body_cannot_be_read_is_still_a_redirect() -> None:
    headers = {"location": "https://lf.example.com/api/public/ingestion"}
    for status in (300, 301):
        verdict = one(unreadable(status, headers, "bad gzip", IDS, NOW))
        assert verdict.outcome == Outcome.off and "redirected" in (verdict.error or "")


def test_an_unreadable_429_takes_its_http_date_retry_after() -> None:
    later = format_datetime(NOW + timedelta(seconds=25), usegmt=True)
    verdict = one(unreadable(429, {"retry-after": later}, "bad gzip", IDS, NOW))
    assert (verdict.outcome, verdict.retry_after_seconds) == (Outcome.wait, 25.0)


def test_another_status_whose_body_cannot_be_read_is_read_without_it() -> None:
    assert one(unreadable(429, {"retry-after": "7"}, "bad gzip", IDS, NOW)) == Verdict(
        Outcome.wait, "HTTP 429: Too Many Requests", 7.0, stop=True)
    assert one(unreadable(400, {}, "bad gzip", IDS, NOW)).outcome == Outcome.failed
    assert one(unreadable(500, {}, "bad gzip", IDS, NOW)).hold


def test_header_names_are_read_in_any_case() -> None:
    verdict = one(run(429, b"", {"RETRY-AFTER": "3"}))
    assert verdict.retry_after_seconds == 3.0


def test_207_read_with_extra_top_level_keys() -> None:
    """Langfuse Cloud adds a top-level deprecation notice to some 207s (batches with trace or
    observation events, langfuse/langfuse#17261); any key beside successes and errors is
    ignored, so the per-event result is still read."""
    verdicts = run(
        207,
        {
            "successes": [{"id": "a", "status": 201}, {"id": "b", "status": 201}],
            "errors": [{"id": "c", "status": 400, "message": "Event type not accepted"}],
            "_deprecation": {"message": "move to OpenTelemetry"},
        },
    )
    assert verdicts["a"] == verdicts["b"] == Verdict(Outcome.sent)
    assert verdicts["c"].outcome == Outcome.failed
    assert verdicts["c"].error == "rejected by Langfuse (HTTP 400): Event type not accepted"


@pytest.mark.parametrize(
    ("location", "advice"),
    [
        ("https://lf.example.com/api/public/ingestion", "set LANGFUSE_HOST to https://lf.example.com"),
        (
            "http://lf.example.com:8080/lf/api/public/ingestion?x=1",
            "set LANGFUSE_HOST to http://lf.example.com:8080/lf",
        ),
        ("/api/public/ingestion", "set LANGFUSE_HOST to the server itself"),
        ("https://lf.example.com/login", "set LANGFUSE_HOST to the server itself"),
        ("https:///api/public/ingestion", "set LANGFUSE_HOST to the server itself"),
        ("http://[::1/api/public/ingestion", "set LANGFUSE_HOST to the server itself"),
    ],
)
def test_a_redirect_names_the_host_it_implies(location: str, advice: str) -> None:
    """An http->https proxy answers with the full URL of the route: the error says which
    LANGFUSE_HOST that is, not the route's URL (which would double the path)."""
    verdict = one(run(301, b"", {"Location": location}))
    assert verdict.error == f"HTTP 301: redirected to {location}; {advice}"


@pytest.mark.parametrize(
    ("location", "advice"),
    [
        ("https://lf.example.com/api/public/ingestion", "set LANGFUSE_HOST to https://lf.example.com"),
        ("http://lf.example.com/langfuse/api/public/ingestion?x=1",
         "set LANGFUSE_HOST to http://lf.example.com/langfuse"),
        # Not an absolute http(s) URL ending with the route, or not a URL at all.
        ("/api/public/ingestion", "set LANGFUSE_HOST to the server itself"),
        ("ftp://lf.example.com/api/public/ingestion", "set LANGFUSE_HOST to the server itself"),
        ("https://lf.example.com/login", "set LANGFUSE_HOST to the server itself"),
        ("http://[::1/api/public/ingestion", "set LANGFUSE_HOST to the server itself"),
    ],
)
def test_redirect_advice_names_the_host_the_location_implies(location: str, advice: str) -> None:
    assert redirect_advice(location, "/api/public/ingestion") == advice


@pytest.mark.parametrize("status", [200, 207, 400, 429, 500, 502])
def test_a_body_nested_beyond_pythons_stack_is_unreadable_not_a_crash(status: int) -> None:
    deep = b"[" * 200_000
    verdicts = classify(status, {}, deep, ["e1"], datetime.now(UTC))  # must not raise
    assert set(verdicts) == {"e1"}
    assert verdicts["e1"].outcome != Outcome.sent
    assert health_version(deep) is None and not passed_empty_batch(status, deep)
