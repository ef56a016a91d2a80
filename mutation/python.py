"""mutmut 3.8.1 over the pure worker modules, in a scratch copy of the repository.

TARGETS is the module list: a file and the functions of it that count (None: every function).
To add a module (e.g. a rewritten Langfuse sender), add a line here; its tests must live in
tests/unit (mutmut runs those, not the integration tests, for every mutant).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mutation.common import ROOT, WORK, Mutant, Report, equivalents

# file -> functions whose mutants count ("Class.method" or "function"); None: all of them.
TARGETS: dict[str, tuple[str, ...] | None] = {
    "worker/learning.py": None,
    "worker/gate.py": None,
    # The outbox's response classification: what each answer of Langfuse becomes per row (sent,
    # retry, wait, failed, split), one pure module since the mirror was rewritten.
    "worker/langfuse_response.py": None,
    # The production watch: Newcombe's interval, O'Brien-Fleming-type spending, decision per look.
    "worker/watch.py": None,
}

# mutmut's exit-code meaning (mutmut.stats.status_by_exit_code), reduced to ours.
_STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not checked",
}


def _patterns() -> list[str]:
    """fnmatch patterns of the mutant names in scope (mutmut names a function f of module m
    `m.x_f__mutmut_N` and a method C.f `m.xǁCǁf__mutmut_N`)."""
    out = []
    for file, functions in TARGETS.items():
        module = file.removesuffix(".py").replace("/", ".")
        if functions is None:
            out.append(f"{module}.*")
            continue
        for function in functions:
            if "." in function:
                cls, name = function.split(".")
                out.append(f"{module}.xǁ{cls}ǁ{name}__mutmut_*")
            else:
                out.append(f"{module}.x_{function}__mutmut_*")
    return out


def _prepare(work: Path) -> None:
    """A fresh copy of what the unit tests need, and a pyproject with mutmut's settings."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # testkit: tests/conftest.py imports it (tokens, the stack's environment, wait_until).
    for name in ("worker", "tests", "supabase", "testkit"):
        shutil.copytree(
            ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", ".temp")
        )
    files = json.dumps(sorted(TARGETS))
    settings = f"""

[tool.mutmut]
source_paths = ["worker"]
only_mutate = {files}
pytest_add_cli_args_test_selection = ["tests/unit"]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
also_copy = ["supabase", "tests", "testkit"]
"""
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + settings)


def run(out_dir: Path, only: list[str] | None = None) -> Report:
    """Run mutmut over TARGETS (or the mutant-name patterns in `only`); return the report."""
    report = Report(kind="python")
    start = time.monotonic()
    work = WORK / "python"
    _prepare(work)
    mutmut = Path(sys.executable).with_name("mutmut")
    children = os.environ.get("PFL_MUTATION_CHILDREN", "2")
    cmd = [str(mutmut), "run", "--max-children", children, *(only or _patterns())]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(
        cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"mutmut failed (exit {proc.returncode}); see above")

    known = equivalents()
    patterns = only or _patterns()
    for file in sorted(TARGETS):
        meta = json.loads((work / "mutants" / f"{file}.meta").read_text())
        for name, code in sorted(meta["exit_code_by_key"].items(), key=_natural):
            if not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            status = _STATUS.get(code, f"suspicious (exit {code})")
            detail = ""
            if status in ("survived", "no tests") and name in known:
                status, detail = "equivalent", known[name]
            elif status in ("survived", "no tests"):
                detail = _diff(work, mutmut, name)
            report.mutants.append(Mutant(name=name, file=file, status=status, detail=detail))
    report.seconds = time.monotonic() - start
    return report


def _natural(item: tuple[str, object]) -> tuple[str, int]:
    name = item[0]
    base, _, number = name.rpartition("__mutmut_")
    return base, int(number) if number.isdigit() else 0


def _diff(work: Path, mutmut: Path, name: str) -> str:
    shown = subprocess.run([str(mutmut), "show", name], cwd=work, capture_output=True, text=True)
    lines = [
        line
        for line in shown.stdout.splitlines()
        if line[:2] in ("- ", "+ ") and not line.startswith(("---", "+++"))
    ]
    return " | ".join(line.strip() for line in lines)
