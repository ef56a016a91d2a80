"""The worker's command line starts without the Langfuse SDK unless it drains the outbox."""

import subprocess
import sys

LOADED = "import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('langfuse')))"


def loaded_langfuse_modules(module: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_cli_loads_no_langfuse_module_until_it_drains() -> None:
    # `pfl run-once` (cron) starts about a quarter faster without it.
    assert loaded_langfuse_modules("worker.cli") == "[]"


def test_the_outbox_still_loads_the_sdk() -> None:
    assert "'langfuse'" in loaded_langfuse_modules("worker.outbox")


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
