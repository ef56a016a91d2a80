"""The worker's command line starts without the mirror's modules unless it drains the outbox,
nothing loads the Langfuse SDK any more (the mirror sends one request with httpx), and only
`serve` with metrics on loads prometheus_client."""

import subprocess
import sys

MIRROR = ("langfuse", "worker.langfuse", "worker.outbox")
PROMETHEUS = ("prom",)


def loaded_modules(module: str, prefixes: tuple[str, ...]) -> str:
    """The sorted names of the modules starting with `prefixes` that importing `module` loads,
    in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c",
         f"import sys, {module}; "
         f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_cli_loads_no_mirror_module_until_it_drains() -> None:
    # `pfl run-once` (cron) never needs them.
    assert loaded_modules("worker.cli", MIRROR) == "[]"


def test_the_outbox_loads_the_sender_and_no_sdk() -> None:
    assert loaded_modules("worker.outbox", MIRROR) == (
        "['worker.langfuse_check', 'worker.langfuse_http', 'worker.langfuse_response', "
        "'worker.langfuse_sender', 'worker.outbox']"
    )


def test_the_cli_loads_prometheus_client_only_for_the_metrics_of_serve() -> None:
    assert loaded_modules("worker.cli", PROMETHEUS) == "[]"
    assert "'prometheus_client'" in loaded_modules("worker.metrics", PROMETHEUS)
