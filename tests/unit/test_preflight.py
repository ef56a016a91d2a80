"""What the worker checks before its first call: the key's role and the database's version."""

from pathlib import Path
from types import SimpleNamespace

import httpx
import jwt
import pytest
from postgrest.exceptions import APIError
from pydantic import SecretStr

from worker.config import WorkerSettings, key_role
from worker.store import REQUIRED_SCHEMA_VERSION, ConfigurationError, Store, StoreError


@pytest.mark.parametrize(
    ("key", "role"),
    [
        (jwt.encode({"role": "anon"}, "s" * 32, algorithm="HS256"), "anon"),
        (jwt.encode({"role": "service_role"}, "s" * 32, algorithm="HS256"), "service_role"),
        ("sb_publishable_abc", "anon"),
        ("sb_secret_abc", "service_role"),
        ("not-a-key", None),
        ("a.!!!.c", None),
        (jwt.encode({"sub": "x"}, "s" * 32, algorithm="HS256"), None),
    ],
)
def test_key_role(key: str, role: str | None) -> None:
    assert key_role(key) == role


class _Client:
    """Answers every rpc with `answer` (an exception is raised)."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def rpc(self, name: str, params: dict) -> SimpleNamespace:
        def execute() -> SimpleNamespace:
            if isinstance(self.answer, Exception):
                raise self.answer
            return SimpleNamespace(data=self.answer)

        return SimpleNamespace(execute=execute)


def _error(code: str) -> APIError:
    return APIError({"message": "m", "code": code, "hint": None, "details": None})


def test_a_current_database_passes() -> None:
    store = Store(_Client(REQUIRED_SCHEMA_VERSION), attempts=1)  # type: ignore[arg-type]
    assert store.check_worker_access("http://x") == REQUIRED_SCHEMA_VERSION


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (_error("PGRST202"), "the database at http://x is behind: it lacks the worker's "
         f"functions of migration {REQUIRED_SCHEMA_VERSION}; apply the migrations (supabase db "
         "push)"),
        ("20261130000600", "the database at http://x is behind: its migrations reach "
         f"20261130000600, the worker needs {REQUIRED_SCHEMA_VERSION}; apply the migrations "
         "(supabase db push)"),
        (_error("42501"), "SUPABASE_SERVICE_ROLE_KEY is not the service-role key: the API "
         "refused the worker's functions (permission denied); use the service_role/secret key "
         "of the project"),
        (APIError({"message": "JWT expired", "code": "PGRST301", "hint": None, "details": None}),
         "SUPABASE_SERVICE_ROLE_KEY has expired (JWT expired); use the project's current "
         "service_role/secret key"),
        (_error("404"), "the server at http://x answered HTTP 404 without the Data API's error "
         "body: SUPABASE_URL is not a Supabase project's API URL"),
        (httpx.ConnectError("refused"), "the Supabase Data API at http://x did not answer "
         "(worker_schema_version: ConnectError: refused); check SUPABASE_URL (the project's API "
         "URL, no path) and that the project is up"),
    ],
)
def test_bad_configuration_is_one_line(answer: object, line: str) -> None:
    store = Store(_Client(answer), attempts=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as raised:
        store.check_worker_access("http://x")
    assert str(raised.value) == line


@pytest.mark.parametrize("code", ["22023", "40001"])  # SQLSTATEs are digits too, and not HTTP
def test_other_refusals_stay_store_errors(code: str) -> None:
    store = Store(_Client(_error(code)), attempts=1)  # type: ignore[arg-type]
    with pytest.raises(StoreError) as raised:
        store.check_worker_access("http://x")
    assert raised.value.code == code


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"SUPABASE_SERVICE_ROLE_KEY": ""}, "pfl: invalid settings: SUPABASE_SERVICE_ROLE_KEY: is "
         "empty: set it to the project's service_role/secret key"),
        ({"SUPABASE_URL": "127.0.0.1:54321"}, "pfl: invalid settings: SUPABASE_URL: must be the "
         "project's API URL with its scheme, e.g. https://<ref>.supabase.co"),
        ({"SUPABASE_URL": "https://"}, "pfl: invalid settings: SUPABASE_URL: must be the "
         "project's API URL with its scheme, e.g. https://<ref>.supabase.co"),
        ({"SUPABASE_URL": None}, "pfl: invalid settings: SUPABASE_URL: Field required"),
        ({"PFL_LEASE_SECONDS": "-3"}, "pfl: invalid settings: PFL_LEASE_SECONDS: Input should be "
         "greater than or equal to 5"),
        # Not a number is refused; empty means unset (below).
        ({"PFL_METRICS_PORT": "metrics"}, "pfl: invalid settings: PFL_METRICS_PORT: Input should "
         "be a valid integer, unable to parse string as an integer"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(
    env: dict[str, str | None], line: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    from worker.cli import main

    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("SUPABASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "sb_secret_abc")
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    assert main(["run-once"]) == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_api_url_is_kept_without_surrounding_space() -> None:
    from worker.config import WorkerSettings

    settings = WorkerSettings(
        supabase_url=" https://abc.supabase.co ",
        supabase_service_role_key=SecretStr("sb_secret_x"),
        _env_file=None,
    )
    assert settings.supabase_url == "https://abc.supabase.co"


def settings() -> WorkerSettings:
    """Settings from the environment as the test left it, with an API URL and a key, no .env."""
    return WorkerSettings(
        supabase_url="https://abc.supabase.co",
        supabase_service_role_key=SecretStr("sb_secret_x"),
        _env_file=None,
    )


@pytest.mark.parametrize(("value", "port"), [("", None), ("  ", None), ("9464", 9464)])
def test_an_empty_metrics_port_means_metrics_off(
    value: str, port: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PFL_METRICS_PORT=` (a blank line of a `.env` template) is unset, not a refusal that
    stops every command."""
    monkeypatch.setenv("PFL_METRICS_PORT", value)
    assert settings().pfl_metrics_port == port


@pytest.mark.parametrize(("value", "host"), [("[::1]", "::1"), ("::", "::"),
                                            ("127.0.0.1", "127.0.0.1")])
def test_a_bracketed_ipv6_metrics_host_is_taken_without_brackets(
    value: str, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFL_METRICS_HOST", value)
    assert settings().pfl_metrics_host == host
