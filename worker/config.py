"""Worker settings: environment variables (and a `.env` file), validated once at start-up."""

import os
import socket
from urllib.parse import urlsplit

import jwt
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Everything the worker needs to know; each knob is documented where it is defined.

    Read from the environment (upper-case names, e.g. PFL_LEASE_SECONDS) or `.env`. Building it
    raises pydantic's ValidationError naming each missing or out-of-range setting.
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    supabase_url: str = Field(description="The project's API URL, e.g. http://127.0.0.1:54321.")
    supabase_service_role_key: SecretStr = Field(
        description="The service-role key: the worker's functions are executable by it alone."
    )
    pfl_worker_id: str = Field(
        default_factory=_default_worker_id,
        min_length=1,
        max_length=200,
        description="Names this worker on the runs it holds.",
    )
    pfl_lease_seconds: int = Field(
        60,
        ge=5,
        le=3600,
        description="How long a claimed run stays ours before another worker "
        "may take it over; renewed while a run is in hand.",
    )
    pfl_http_timeout_seconds: float = Field(
        60.0, gt=0, description="Timeout of one request to the API."
    )
    pfl_store_attempts: int = Field(
        4, ge=1, le=20, description="Tries of one API call on transient errors (network, 5xx)."
    )
    pfl_poll_min_seconds: float = Field(
        0.5, gt=0, description="`serve`: first wait after finding nothing to do."
    )
    pfl_poll_max_seconds: float = Field(
        30.0, gt=0, description="`serve`: longest wait between polls while idle."
    )
    pfl_claim_runs: int = Field(
        16,
        ge=1,
        le=100,
        description="`serve` and `run-once`: the most runs claimed, read and completed per call "
        "(claim_learning_runs, read_learning_runs, complete_learning_runs); 1 takes one run at a "
        "time through the one-run functions. A run that needs a rebuild or holds more than "
        "10,000 events goes through the one-run path either way.",
    )
    pfl_log_format: str = Field(
        "text", pattern="^(text|json)$", description="Log lines as `text` or `json`."
    )
    langfuse_base_url: str | None = Field(
        None,
        description="Langfuse base URL, as Langfuse's SDK reads it (it wins over LANGFUSE_HOST "
        "when both are set, as in the SDK); unset with LANGFUSE_HOST too means feedback is kept "
        "locally only.",
    )
    langfuse_host: str | None = Field(
        None, description="Langfuse base URL, the SDK's older name for LANGFUSE_BASE_URL."
    )
    langfuse_public_key: str | None = Field(None, description="Langfuse project public key.")
    langfuse_secret_key: SecretStr | None = Field(None, description="Langfuse project secret key.")
    langfuse_tracing_environment: str | None = Field(
        None,
        description="Langfuse's own variable for the environment of traces (its SDKs read it); "
        "the default of PFL_LANGFUSE_ENVIRONMENT.",
    )
    pfl_langfuse_environment: str | None = Field(
        None,
        description="The Langfuse environment of the feedback scores: set it to the environment "
        "of the traces. Sent as Langfuse 4 files a name (lower-cased, leading 'langfuse' "
        "prefixes dropped, 40 characters), a name every Langfuse from 3.31 stores unchanged; "
        "one Langfuse 4 would file under `default` (nothing left, or other characters than "
        "a-z 0-9 - _) is refused when the mirror starts. Default: "
        "LANGFUSE_TRACING_ENVIRONMENT, else `default`.",
    )
    pfl_langfuse_batch_size: int = Field(
        100, ge=1, le=1000, description="Outbox rows claimed and sent per Langfuse request batch."
    )
    pfl_langfuse_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Timeout of one request to Langfuse, from its start to the answer's body "
        "read in full (connecting, uploading, headers, body; the host name's look-up is the "
        "system resolver's).",
    )
    pfl_langfuse_max_attempts: int = Field(
        8, ge=1, le=100, description="Deliveries of one score before it is marked failed."
    )
    pfl_langfuse_visibility_seconds: int = Field(
        120,
        ge=1,
        le=3600,
        description="Claimed outbox rows stay hidden from other workers this long; a worker "
        "that dies mid-send leaves them waiting until it ends. Must exceed the Langfuse timeout.",
    )

    pfl_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="`serve`: the port of the health endpoint (/healthz) and the Prometheus "
        "metrics (/metrics); unset or empty (the default) serves neither.",
    )
    pfl_metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="`serve`: the address the metrics port listens on, IPv4 or IPv6 (`[::1]` "
        "is taken as ::1), or a name (its first address); 0.0.0.0 for every IPv4 interface, :: "
        "for every interface (e.g. a scraper in another container).",
    )
    pfl_health_max_age_seconds: float = Field(
        90.0,
        gt=0,
        description="`serve`: /healthz answers 200 while the last successful poll for runs "
        "ended at most this many seconds ago, else 503. Must exceed PFL_POLL_MAX_SECONDS (an "
        "idle worker polls that rarely).",
    )

    @field_validator("supabase_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        """The project's API URL without surrounding space: http(s) and a host (a path there
        is caught at start by the API check). Raises ValueError otherwise."""
        url = value.strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be the project's API URL with its scheme, e.g. https://<ref>.supabase.co"
            )
        return url

    @field_validator("pfl_metrics_port", mode="before")
    @classmethod
    def _port_unset_when_empty(cls, value: object) -> object:
        """An empty PFL_METRICS_PORT (`PFL_METRICS_PORT=` in `.env`, or a template's blank)
        means unset, as for a variable not given: metrics off, not a refusal to start."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("pfl_metrics_host")
    @classmethod
    def _host_without_brackets(cls, value: str) -> str:
        """An IPv6 address as a URL writes it (`[::1]`) is taken without its brackets."""
        if value.startswith("[") and value.endswith("]"):
            return value[1:-1]
        return value

    @field_validator("supabase_service_role_key")
    @classmethod
    def _key_given(cls, value: SecretStr) -> SecretStr:
        """A key, not an empty value (an unfilled `.env` line). Raises ValueError."""
        if not value.get_secret_value().strip():
            raise ValueError("is empty: set it to the project's service_role/secret key")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerSettings":
        if self.pfl_poll_min_seconds > self.pfl_poll_max_seconds:
            raise ValueError("PFL_POLL_MIN_SECONDS must not exceed PFL_POLL_MAX_SECONDS")
        if self.pfl_health_max_age_seconds <= self.pfl_poll_max_seconds:
            raise ValueError("PFL_HEALTH_MAX_AGE_SECONDS must exceed PFL_POLL_MAX_SECONDS")
        if self.pfl_langfuse_visibility_seconds <= self.pfl_langfuse_timeout_seconds:
            raise ValueError(
                "PFL_LANGFUSE_VISIBILITY_SECONDS must exceed PFL_LANGFUSE_TIMEOUT_SECONDS"
            )
        return self

    @property
    def langfuse_url(self) -> tuple[str, str | None]:
        """(the setting's name, its value) of Langfuse's base URL: LANGFUSE_BASE_URL when set,
        else LANGFUSE_HOST, as Langfuse's SDK 5.x (`Langfuse.__init__`) reads them."""
        if self.langfuse_base_url:
            return "LANGFUSE_BASE_URL", self.langfuse_base_url
        return "LANGFUSE_HOST", self.langfuse_host

    @property
    def langfuse_configured(self) -> bool:
        """Whether Langfuse's base URL and both keys are set (else feedback stays local)."""
        return bool(self.langfuse_url[1] and self.langfuse_public_key and self.langfuse_secret_key)

    @property
    def langfuse_missing(self) -> list[str]:
        """The Langfuse settings missing when some, not all, are set (a configuration that
        cannot work); empty when all or none are set."""
        values = {
            "LANGFUSE_BASE_URL (or LANGFUSE_HOST)": self.langfuse_url[1],
            "LANGFUSE_PUBLIC_KEY": self.langfuse_public_key,
            "LANGFUSE_SECRET_KEY": self.langfuse_secret_key,
        }
        missing = [name for name, value in values.items() if not value]
        return missing if len(missing) < len(values) else []

    @property
    def langfuse_environment(self) -> str:
        """The environment the scores are sent with (see PFL_LANGFUSE_ENVIRONMENT)."""
        return self.pfl_langfuse_environment or self.langfuse_tracing_environment or "default"


def key_role(key: str) -> str | None:
    """The role an API key acts as, read without verifying it (the worker cannot: it holds no
    JWT secret; the API verifies every request): a legacy key is a JWT whose `role` claim says it
    (`anon`, `service_role`); a new-style key says it in its prefix (`sb_publishable_...` acts
    as anon, `sb_secret_...` as service_role). None when the key is neither."""
    if key.startswith("sb_publishable_"):
        return "anon"
    if key.startswith("sb_secret_"):
        return "service_role"
    try:
        claims = jwt.decode(key, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    role = claims.get("role")
    return role if isinstance(role, str) else None
