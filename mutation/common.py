"""Paths, the equivalent-mutant list (docs/mutation.md) and the JSON report."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"  # scratch copies; gitignored
EQUIVALENTS_DOC = ROOT / "docs" / "mutation.md"
# A row of the equivalents table: | `mutant name` | reason |
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(.+?)\s*\|\s*$")


def equivalents() -> dict[str, str]:
    """Mutant name -> reason, from the tables of docs/mutation.md (rows `| `name` | reason |`)."""
    if not EQUIVALENTS_DOC.exists():
        return {}
    out: dict[str, str] = {}
    for line in EQUIVALENTS_DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


@dataclass
class Mutant:
    name: str
    file: str
    status: str  # killed | survived | equivalent | timeout | stale | error | no tests ...
    detail: str = ""


@dataclass
class Report:
    kind: str  # python | sql
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    mutants: list[Mutant] = field(default_factory=list)

    def per_file(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for m in self.mutants:
            row = table.setdefault(m.file, {})
            row[m.status] = row.get(m.status, 0) + 1
        return table

    def failures(self) -> list[Mutant]:
        """Mutants that make the run fail: unexplained survivors, stale or broken mutants."""
        return [m for m in self.mutants if m.status not in ("killed", "timeout", "equivalent")]

    def print(self) -> None:
        print(f"\n== {self.kind} mutants ({self.seconds:.0f} s)")
        print(f"{'file':66} {'killed':>7} {'equiv':>6} {'survived':>8} {'other':>6} {'score':>7}")
        for file, row in sorted(self.per_file().items()):
            killed = row.get("killed", 0) + row.get("timeout", 0)
            equiv = row.get("equivalent", 0)
            survived = row.get("survived", 0)
            other = sum(row.values()) - killed - equiv - survived
            judged = sum(row.values()) - equiv
            score = f"{100 * killed / judged:.1f}%" if judged else "-"
            print(f"{file:66} {killed:7} {equiv:6} {survived:8} {other:6} {score:>7}")
        for m in self.failures():
            print(f"  {m.status.upper()}: {m.name} ({m.file}) {m.detail}")

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.started))
        path = out_dir / f"{self.kind}-{stamp}.json"
        body = {
            "kind": self.kind,
            "started_utc": stamp,
            "seconds": round(self.seconds, 1),
            "per_file": self.per_file(),
            "failures": [m.name for m in self.failures()],
            "mutants": [asdict(m) for m in self.mutants],
        }
        path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        return path
