"""SQL mutants (mutation/sql_mutants.toml), applied one at a time on a stack of their own.

For each mutant: a shadow checkout (.mutation/sql/root: symlinks to the repository, a real copy
of supabase/ with the one change) brings the driver's own stack up with `scripts/stack up`, which
resets the database to the mutated migrations and seed and reloads PostgREST; then every pgTAP
file runs, then the mutant's pytest paths. A failing test kills the mutant. The unmutated schema
runs first and must pass everything, or nothing is judged. A mutant whose text is not found
exactly once in the last migration defining its object is `stale` and fails the run: the
schema moved and the list must follow.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mutation.common import ROOT, WORK, Mutant, Report, equivalents

MUTANTS_FILE = Path(__file__).with_name("sql_mutants.toml")
MIGRATIONS = ROOT / "supabase" / "migrations"


@dataclass(frozen=True)
class SqlMutant:
    id: str
    defined_in: str
    find: str
    replace: str
    tests: tuple[str, ...]
    reason: str


def load() -> list[SqlMutant]:
    """The mutants of sql_mutants.toml; raises SystemExit for a malformed or duplicate entry."""
    data = tomllib.loads(MUTANTS_FILE.read_text())
    out, seen = [], set()
    for entry in data.get("mutant", []):
        try:
            mutant = SqlMutant(
                id=entry["id"],
                defined_in=entry["defined_in"],
                find=entry["find"],
                replace=entry["replace"],
                tests=tuple(entry["tests"]),
                reason=entry["reason"],
            )
        except KeyError as exc:
            raise SystemExit(
                f"{MUTANTS_FILE.name}: mutant {entry.get('id')!r} lacks {exc}"
            ) from exc
        if mutant.id in seen:
            raise SystemExit(f"{MUTANTS_FILE.name}: duplicate id {mutant.id}")
        seen.add(mutant.id)
        out.append(mutant)
    return out


def locate(mutant: SqlMutant) -> tuple[Path, str]:
    """(migration file, mutated text), or raises LookupError saying why the mutant is stale."""
    files = [p for p in sorted(MIGRATIONS.glob("*.sql")) if mutant.defined_in in p.read_text()]
    if not files:
        raise LookupError(f"no migration contains {mutant.defined_in!r}")
    path = files[-1]
    text = path.read_text()
    found = text.count(mutant.find)
    if found != 1:
        raise LookupError(f"{path.name}: the text to change occurs {found} times, not once")
    return path, text.replace(mutant.find, mutant.replace)


class Stack:
    """The driver's stack, on ports <prefix>xx, built from a shadow checkout."""

    def __init__(self, prefix: str) -> None:
        self.root = WORK / "sql" / "root"
        self.env = dict(os.environ)
        self.env.update(
            PFL_STACK_DIR=str(ROOT / ".stack" / "mutation"),
            PFL_PG_PORT=f"{prefix}22",
            PFL_API_PORT=f"{prefix}21",
            PFL_REST_PORT=f"{prefix}31",
            PFL_REST_ADMIN_PORT=f"{prefix}32",
        )
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        skip = {"supabase", ".git", ".stack", ".mutation", "mutation-results", "artifacts"}
        for entry in ROOT.iterdir():
            if entry.name not in skip:
                (self.root / entry.name).symlink_to(entry)

    def up(self, mutated: tuple[Path, str] | None) -> None:
        """Reset the database to the migrations, with `mutated` (file, text) in place."""
        target = self.root / "supabase"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "supabase", target, ignore=shutil.ignore_patterns(".temp"))
        if mutated is not None:
            path, text = mutated
            (target / "migrations" / path.name).write_text(text)
        out = self._run(["scripts/stack", "up"])
        for line in out.splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                self.env[key] = value

    def down(self) -> None:
        subprocess.run(
            ["scripts/stack", "down"], cwd=self.root, env=self.env, capture_output=True, text=True
        )

    def pgtap(self) -> subprocess.CompletedProcess[str]:
        db = self.env["DATABASE_URL"]
        self._run(
            [
                "psql",
                db,
                "-X",
                "-q",
                "-c",
                "create extension if not exists pgtap with schema extensions",
            ]
        )
        return subprocess.run(
            [
                "pg_prove",
                "-h",
                "127.0.0.1",
                "-p",
                self.env["PFL_PG_PORT"],
                "-U",
                "postgres",
                "-d",
                "postgres",
                "--ext",
                ".sql",
                "-r",
                "--failures",
                "supabase/tests",
            ],
            cwd=self.root,
            env={**self.env, "PGOPTIONS": "--client-min-messages=warning"},
            capture_output=True,
            text=True,
        )

    def pytest(self, paths: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ROOT / ".venv" / "bin" / "pytest"), "-q", "-x", "-p", "no:cacheprovider", *paths],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
        )

    def _run(self, cmd: list[str]) -> str:
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc.stdout


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    failed = [
        ln.strip("# ")
        for ln in lines
        if ln.startswith(("FAILED", "ERROR")) or "Failed test" in ln and ":" in ln
    ]
    return " / ".join((failed or lines[-2:])[:3])


def run(out_dir: Path, only: list[str] | None = None) -> Report:
    report = Report(kind="sql")
    start = time.monotonic()
    mutants = [m for m in load() if not only or m.id in only]
    if only and len(mutants) != len(set(only)):
        raise SystemExit(f"unknown SQL mutant id among {only}")
    known = equivalents()
    # Stale mutants are reported before anything slow starts (and fail the run at the end).
    for mutant in mutants:
        try:
            locate(mutant)
        except LookupError as exc:
            print(f"STALE     {mutant.id}: {exc}", flush=True)
    stack = Stack(os.environ.get("PFL_MUTATION_PORT_PREFIX", "568"))
    test_lists = list(dict.fromkeys(m.tests for m in mutants if m.tests))
    try:
        # The unmutated schema must pass what each mutant will run, run the same way.
        # Like a mutant, each test list gets a freshly reset database.
        print("baseline (no mutation) ...", flush=True)
        stack.up(None)
        checks = [stack.pgtap]
        checks += [functools.partial(stack.pytest, paths) for paths in test_lists]
        for index, check in enumerate(checks):
            if index > 1:
                stack.up(None)
            proc = check()
            if proc.returncode != 0:
                raise SystemExit(f"baseline fails, nothing judged: {_tail(proc)}")
        for mutant in mutants:
            began = time.monotonic()
            try:
                mutated = locate(mutant)
            except LookupError as exc:
                report.mutants.append(Mutant(mutant.id, "?", "stale", str(exc)))
                print(f"STALE     {mutant.id}: {exc}", flush=True)
                continue
            file = f"supabase/migrations/{mutated[0].name}"
            try:
                stack.up(mutated)
            except RuntimeError as exc:
                report.mutants.append(Mutant(mutant.id, file, "error", str(exc)[-500:]))
                print(f"ERROR     {mutant.id}: the mutated migrations do not apply", flush=True)
                continue
            status, by = "survived", ""
            proc = stack.pgtap()
            if proc.returncode != 0:
                status, by = "killed", f"pgTAP: {_tail(proc)}"
            elif mutant.tests:
                proc = stack.pytest(mutant.tests)
                if proc.returncode == 1:
                    status, by = "killed", f"pytest: {_tail(proc)}"
                elif proc.returncode != 0:
                    status, by = "error", f"pytest exit {proc.returncode}: {_tail(proc)}"
            if status == "survived" and mutant.id in known:
                status, by = "equivalent", known[mutant.id]
            elif status == "survived":
                by = mutant.reason
            report.mutants.append(Mutant(mutant.id, file, status, by))
            print(
                f"{status.upper():9} {mutant.id} ({time.monotonic() - began:.0f} s) {by[:160]}",
                flush=True,
            )
    finally:
        stack.down()
    report.seconds = time.monotonic() - start
    return report
