"""The worker's command line starts without the mirror's modules unless it drains the outbox,
and nothing loads the Langfuse SDK any more (the mirror sends one request with httpx)."""

import subprocess
import sys

LOADED = (
    "import sys, {module}; "
    "print(sorted(m for m in sys.modules if m.startswith(('langfuse', 'worker.langfuse', "
    "'worker.outbox'))))"
)


def loaded_mirror_modules(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_cli_loads_no_mirror_module_until_it_drains() -> None:
    # `pfl run-once` (cron) never needs them.
    assert loaded_mirror_modules("worker.cli") == "[]"


def test_the_outbox_loads_the_sender_and_no_sdk() -> None:
    assert loaded_mirror_modules("worker.outbox") == (
        "['worker.langfuse_check', 'worker.langfuse_response', 'worker.langfuse_sender', "
        "'worker.outbox']"
    )


PROMETHEUS = "import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('prom')))"


def loaded_prometheus_modules(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROMETHEUS.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_cli_loads_prometheus_client_only_for_the_metrics_of_serve() -> None:
    assert loaded_prometheus_modules("worker.cli") == "[]"
    assert "'prometheus_client'" in loaded_prometheus_modules("worker.metrics")
