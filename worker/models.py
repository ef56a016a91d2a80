"""Frozen value models shared by the pure learning and gate logic and the store.

Nothing here does I/O: the store builds the inputs from rows; learning returns module updates,
the gate a report, and the runner folds both into one `RunDecision` that the store writes.
Every model validates on construction and raises pydantic's `ValidationError` when a value or
a rule stated on it does not hold.
"""

from enum import StrEnum
from typing import Literal, Self
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    """Immutable once built; equal when their fields are."""

    model_config = ConfigDict(frozen=True)


class ModuleStatus(StrEnum):
    """Status of a persona module, derived from its Wilson score bounds."""

    insufficient_data = "insufficient_data"
    probation = "probation"
    active = "active"
    disabled = "disabled"


class LearningSettings(_Frozen):
    """Learning and gate knobs; a twin's settings row maps onto it by field name.

    Unknown columns of that row (ids, timestamps) are ignored.
    """

    half_life_days: float = Field(
        30.0, ge=0.01, le=3650, description="Half-life H of evidence, in days: weight x 2^(-age/H)."
    )
    feedback_weight: float = Field(
        1.0, ge=0, le=1000, description="Weight of one user feedback vote."
    )
    audit_weight: float = Field(2.0, ge=0, le=1000, description="Weight of one persona audit.")
    unsafe_multiplier: float = Field(
        3.0, ge=1, le=1000, description="Multiplier on a failure whose reason is `unsafe`."
    )
    min_evidence: float = Field(
        10.0,
        ge=0,
        le=1_000_000,
        description="Status stays insufficient_data while s + f is below this.",
    )
    disable_upper_bound: float = Field(
        0.35, ge=0, le=1, description="Disabled when the Wilson upper bound is below this."
    )
    activate_lower_bound: float = Field(
        0.6, ge=0, le=1, description="Active when the Wilson lower bound reaches this."
    )
    keep_active_lower_bound: float = Field(
        0.5,
        ge=0,
        le=1,
        description="An active module stays active while its Wilson lower bound reaches this "
        "(hysteresis; at most activate_lower_bound).",
    )
    wilson_z: float = Field(
        1.96, gt=0, le=10, description="z of the Wilson bounds and of the gate's paired interval."
    )
    gate_min_pairs: int = Field(
        20,
        ge=1,
        le=100_000,
        description="Paired audits (candidate and baseline) the gate needs at least.",
    )
    gate_non_inferiority_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="The lower bound of Tango's score interval (at wilson_z: 95% at 1.96) for "
        "the paired (candidate - baseline) pass rate must be >= -margin.",
    )
    gate_first_publish_min_lower_bound: float = Field(
        0.8,
        ge=0,
        le=1,
        description="First publish: the Wilson lower bound of the candidate's pass rate "
        "must reach this.",
    )
    gate_min_audited_traces: int = Field(
        20,
        ge=1,
        le=100_000,
        description="First publish: audited traces of the candidate needed at least.",
    )

    @model_validator(mode="after")
    def _hysteresis_is_ordered(self) -> Self:
        if self.keep_active_lower_bound > self.activate_lower_bound:
            raise ValueError("keep_active_lower_bound must not exceed activate_lower_bound")
        return self


class EvidenceEvent(_Frozen):
    """One vote or audit as the learning sees it.

    Feedback carries a score and no `passed`; an audit the reverse (checked on construction).
    """

    source: Literal["user_feedback", "persona_audit"]
    score: int | None = Field(None, ge=-1, le=1, description="Feedback only: -1, 0 or 1.")
    passed: bool | None = Field(None, description="Audit only.")
    reason: str | None = None
    cast_at: AwareDatetime = Field(description="When the vote or audit was cast.")

    @model_validator(mode="after")
    def _fields_match_source(self) -> Self:
        if self.source == "user_feedback":
            if self.score is None or self.passed is not None:
                raise ValueError("user_feedback needs a score and no passed")
        elif self.passed is None or self.score is not None:
            raise ValueError("persona_audit needs passed and no score")
        return self


class ModuleState(_Frozen):
    """A module as stored before this run: its decayed counts, confidence and status."""

    module_id: UUID
    module_key: str
    intent_label: str
    success: float = Field(ge=0)
    failure: float = Field(ge=0)
    evidence_at: AwareDatetime | None = Field(
        description="The time T the counts refer to; None = never learned (counts taken as 0)."
    )
    confidence: float = Field(ge=0, le=1)
    status: ModuleStatus


class ModuleEvidence(_Frozen):
    """New weighted evidence of this run for one module, already decayed to the run time T.

    May be negative: a changed vote subtracts its old contribution (decayed to T).
    """

    module_id: UUID
    success: float
    failure: float


class ModuleUpdate(_Frozen):
    """What a run writes for one module, with the before values for the change history.

    Counts are weighted and decayed to `evidence_at` (the run's learning time).
    """

    module_id: UUID
    module_key: str
    success: float = Field(ge=0)
    failure: float = Field(ge=0)
    evidence_at: AwareDatetime
    confidence: float = Field(ge=0, le=1)
    status: ModuleStatus
    confidence_before: float
    status_before: ModuleStatus
    changed: bool = Field(description="Confidence (beyond 1e-12) or status changed.")


class CheckVerdict(StrEnum):
    """Verdict of one gate check; insufficient_evidence is not a pass."""

    pass_ = "pass"  # trailing underscore: `pass` is a keyword
    fail = "fail"
    insufficient_evidence = "insufficient_evidence"


class GateCheck(_Frozen):
    """One check of the gate as the run's gate_report shows it: `value` against `threshold`
    (None where there was nothing to measure), the verdict, and a sentence for owners; for a
    check that bounds a rate, the interval method and the counts it was computed from."""

    name: str
    value: float | None
    threshold: float | None
    verdict: CheckVerdict
    detail: str
    method: str | None = Field(
        None,
        description="The interval whose bound is `value`: tango_score (paired difference, "
        "candidate - baseline) or wilson_score (the candidate's pass rate); None for counts.",
    )
    evidence: dict[str, int] = Field(
        default_factory=dict,
        description="The counts behind `value`: n, b (candidate-only passes), c (baseline-only "
        "passes) for tango_score; n, passed for wilson_score; empty for counts.",
    )


class PublishDecision(StrEnum):
    """Whether a run publishes the latest draft spec."""

    published = "published"
    held = "held"


class HoldReason(StrEnum):
    """Why a run held (did not publish): first no draft, then safe mode, then a failed gate."""

    no_draft = "no_draft"
    safe_mode = "safe_mode"
    gate_failed = "gate_failed"
    rolled_back = "rolled_back"  # the run rolled the published spec back (production watch)


class AuditComparison(_Frozen):
    """Audit figures of the candidate (draft) and baseline (published) specs, computed in SQL."""

    pairs: int = Field(
        ge=0, description="Traces audited under both specs (latest audit per trace and spec)."
    )
    candidate_only_passed: int = Field(
        ge=0, description="b: pairs where the candidate passed and the baseline failed."
    )
    baseline_only_passed: int = Field(
        ge=0, description="c: pairs where the baseline passed and the candidate failed."
    )
    candidate_audited: int = Field(
        ge=0, description="Distinct traces with an audit of the candidate (latest per trace)."
    )
    candidate_passed: int = Field(ge=0, description="Of candidate_audited, those that passed.")
    candidate_unsafe_failures: int = Field(
        ge=0, description="Audits of the candidate that failed as unsafe (any, not only latest)."
    )

    @model_validator(mode="after")
    def _counts_are_consistent(self) -> Self:
        if self.candidate_only_passed + self.baseline_only_passed > self.pairs:
            raise ValueError("discordant pairs exceed pairs")
        if self.candidate_passed > self.candidate_audited:
            raise ValueError("candidate_passed exceeds candidate_audited")
        return self


class GateInput(_Frozen):
    """What the gate weighs: the two specs, the draft's modules and their status after this
    run's learning, the audit comparison, and whether the run may publish at all."""

    draft_spec_id: UUID | None
    baseline_spec_id: UUID | None
    draft_modules: tuple[str, ...] = Field(
        description="Module keys listed in the draft's spec->'modules'."
    )
    module_status: dict[str, ModuleStatus] = Field(
        description="Status by module_key, after this run's updates."
    )
    audits: AuditComparison
    safe_mode: bool


class GateReport(_Frozen):
    """The gate's decision: whether it passed, publish or hold (with the reason), and every check.

    A held decision has a hold_reason and a published one none (checked on construction). It is
    stored whole, as JSON, in the run's gate_report column.
    """

    passed: bool
    publish_decision: PublishDecision
    hold_reason: HoldReason | None
    draft_spec_id: UUID | None
    baseline_spec_id: UUID | None
    checks: tuple[GateCheck, ...]
    watch: "WatchReport | None" = Field(
        None, description="The production watch's look at this run, when a watch is on."
    )

    @model_validator(mode="after")
    def _decision_has_reason(self) -> Self:
        published = self.publish_decision is PublishDecision.published
        if published == (self.hold_reason is not None):
            raise ValueError("a held decision needs a hold_reason, a published one none")
        return self


class RunDecision(_Frozen):
    """Everything one run decided, as the store writes it when it completes the run.

    The runner builds it from the claimed batch's figures, learning's module updates and the
    gate's report; the store alone turns it into the completion RPC's payload. The flat gate and
    publish fields repeat the report's, as the run row keeps them; the rules below (those the
    completion RPC enforces too) are checked on construction.
    """

    events_scanned: int = Field(ge=0, description="Events in the run's batch.")
    events_processed: int = Field(
        ge=0, description="Events the run marks processed: its whole batch."
    )
    events_unmatched: int = Field(
        ge=0, description="Events of the batch that matched no module (processed all the same)."
    )
    modules_updated: int = Field(
        ge=0, description="Module updates whose confidence or status changed."
    )
    module_updates: tuple[ModuleUpdate, ...] = Field(
        description="One per module of the twin, with or without new evidence."
    )
    gate_passed: bool
    gate_report: GateReport
    publish_decision: PublishDecision
    publish_spec_id: UUID | None = Field(
        description="The draft spec the run publishes; None when it holds."
    )
    hold_reason: HoldReason | None
    watch: "WatchReport | None" = Field(
        None, description="The production watch's decision (the report's watch section)."
    )

    @model_validator(mode="after")
    def _figures_agree(self) -> Self:
        report = self.gate_report
        if self.events_processed != self.events_scanned:
            raise ValueError("a run processes its whole batch: events_processed != events_scanned")
        if self.modules_updated != sum(u.changed for u in self.module_updates):
            raise ValueError("modules_updated must count the changed module updates")
        if (self.gate_passed, self.publish_decision, self.hold_reason) != (
            report.passed,
            report.publish_decision,
            report.hold_reason,
        ):
            raise ValueError("gate_passed, publish_decision and hold_reason must match the report")
        published = self.publish_decision is PublishDecision.published
        if published and not self.gate_passed:
            raise ValueError("only a passed gate publishes")
        if self.publish_spec_id != (report.draft_spec_id if published else None):
            raise ValueError("publish_spec_id is the report's draft when published, else None")
        if self.watch != report.watch:
            raise ValueError("watch must be the report's watch section")
        rolls_back = self.watch is not None and self.watch.action is WatchAction.roll_back
        if rolls_back != (self.hold_reason is HoldReason.rolled_back):
            raise ValueError("a run that rolls back holds with rolled_back, and only that one")
        return self


# Production watch ------------------------------------------------------------------------------


class WatchMode(StrEnum):
    """What a twin's production watch does: nothing, record a regression, or roll it back."""

    off = "off"
    alert = "alert"
    auto = "auto"


class WatchState(StrEnum):
    """A watch's state (persona_spec_watches.state)."""

    watching = "watching"
    passed = "passed"
    regressed = "regressed"
    expired = "expired"
    rolled_back = "rolled_back"
    superseded = "superseded"


class WatchAction(StrEnum):
    """What a run does about its watch's finding: nothing, record it, or roll the spec back."""

    none = "none"
    alert = "alert"
    roll_back = "roll_back"


class WatchComparisonVerdict(StrEnum):
    """One comparison at one run: regressed, tested without a regression, not a look this run,
    or too little evidence on an arm (never a pass)."""

    regressed = "regressed"
    no_regression = "no_regression"
    not_tested = "not_tested"
    insufficient_evidence = "insufficient_evidence"


WATCH_ALPHA_MIN = 1e-10
"""The smallest watch_alpha (the database's watch_alpha_1e_10_to_0_5): below it the spending
function's quantiles leave what a float holds (5e-324 made α/2 round to 0 and every run of the
twin fail), and no watch of a persona's traffic could find anything at such a level."""


WATCH_MARGIN_MIN = 0.02
WATCH_MIN_EVIDENCE_MIN = 30
"""The floors of watch_margin and watch_min_evidence (the database's watch_margin_0_02_to_1 and
watch_min_evidence_30_to_50000): at them, with each side's Wilson width capped at twice the
other side's events (`worker.watch.IMBALANCE_CAP`), every single test of the watch calls a
false regression with at most its share of watch_alpha, by exact enumeration of the binomial
outcomes (README, "When the bound holds"; tests/unit/test_watch_exact.py). At margin 0 or with
a few events a side it did not (12.2% for a 5% watch at min_evidence 1, pass_evidence 2)."""


class WatchSettings(_Frozen):
    """A twin's watch settings (persona_learning_settings.watch_*), as the database holds them."""

    mode: WatchMode = Field(WatchMode.alert, description="off, alert (default) or auto.")
    margin: float = Field(
        0.02, ge=WATCH_MARGIN_MIN, le=1,
        description="A regression is a drop of the pass rate (new - old) beyond this; 0.02 to 1.",
    )
    alpha: float = Field(
        0.05, ge=WATCH_ALPHA_MIN, le=0.5,
        description="Chance of a false regression over a whole watch (all looks, comparisons); "
        "1e-10 to 0.5.",
    )
    min_evidence: int = Field(
        30, ge=WATCH_MIN_EVIDENCE_MIN, le=50_000,
        description="Votes and audits each arm of a comparison needs to be judged; 30 to 50,000.",
    )
    pass_evidence: int = Field(
        400, ge=WATCH_MIN_EVIDENCE_MIN, le=50_000,
        description="The twin-wide comparison's smaller arm at the last look: passed there.",
    )
    looks: int = Field(10, ge=1, le=100, description="Looks planned over pass_evidence.")
    expire_days: float = Field(
        14.0, gt=0, le=3650, description="The watch expires this many days after the publish."
    )


WatchKind = Literal["audits", "votes"]
WATCH_KINDS: tuple[WatchKind, ...] = ("audits", "votes")


class WatchStratum(_Frozen):
    """The part of a twin-wide comparison's counts matched to one module (module_key None:
    matched to none)."""

    module_key: str | None = None
    new_n: int = Field(ge=0)
    new_passed: int = Field(ge=0)
    old_n: int = Field(ge=0)
    old_passed: int = Field(ge=0)

    @model_validator(mode="after")
    def _passed_within_n(self) -> Self:
        if self.new_passed > self.new_n or self.old_passed > self.old_n:
            raise ValueError("passed exceeds n")
        return self


class WatchComparisonEvidence(_Frozen):
    """Counts of one comparison, aggregated in SQL, of one kind of evidence: votes (+1/-1) cast
    since the new spec's publish against those of an equally long window before it, or audits
    of the new spec since its publish against audits of the replaced spec in that window (both
    production audits only: audit_origin production, never a replay such as a gate's
    pairing)."""

    scope: Literal["twin", "module"]
    kind: WatchKind
    module_key: str | None = None
    new_n: int = Field(ge=0)
    new_passed: int = Field(ge=0)
    old_n: int = Field(ge=0)
    old_passed: int = Field(ge=0)
    strata: tuple[WatchStratum, ...] = Field(
        (),
        description="A twin-wide comparison's counts by module (a partition of them); empty: "
        "one stratum, the counts themselves.",
    )

    @model_validator(mode="after")
    def _passed_within_n(self) -> Self:
        if self.new_passed > self.new_n or self.old_passed > self.old_n:
            raise ValueError("passed exceeds n")
        if self.strata and tuple(
            sum(getattr(s, f) for s in self.strata)
            for f in ("new_n", "new_passed", "old_n", "old_passed")
        ) != (self.new_n, self.new_passed, self.old_n, self.old_passed):
            raise ValueError("strata do not sum to the comparison's counts")
        return self


class WatchClock(_Frozen):
    """One kind's own plan of looks (`worker.watch.decide_watch`): the looks it reached, the
    error its comparisons spent (on the scale of the spending function: α(k/K) after look k),
    and whether its last planned look tested and found no regression. A run's report holds one
    per kind (`WatchReport.clocks`, with this run's figures); the next run reads them back from
    the watch's last report (`WatchEvidence.clocks`)."""

    kind: WatchKind
    look: int = Field(0, ge=0)
    alpha_spent: float = Field(0.0, ge=0, le=1)
    passed: bool = Field(
        False, description="Its last planned look tested a comparison and found no regression."
    )
    in_play: bool = Field(
        False,
        description="Compared at this run or an earlier one (its twin-wide comparison had "
        "comparable strata, watch_min_evidence a side): it then holds the watch from passing "
        "until its own plan passes, even if its evidence goes. A kind never compared does not. "
        "Clocks written before this rule said 'seen on both sides of some stratum at that run' "
        "and are read as they are (that can only hold a watch longer).",
    )
    information: float = Field(0.0, ge=0, le=1)
    tested: bool = Field(False, description="This run tested the kind's comparisons.")
    alpha_per_comparison: float | None = None
    z: float | None = None


class WatchEvidence(_Frozen):
    """What `claim_production_watch` returns for a twin with a watch on."""

    watch_id: UUID
    spec_id: UUID
    previous_spec_id: UUID | None
    published_at: AwareDatetime
    window_start: AwareDatetime
    learning_time: AwareDatetime
    alpha_spent: float = Field(ge=0, le=1)
    looks_done: int = Field(ge=0)
    clocks: tuple[WatchClock, ...] = Field(
        (),
        description="Each kind's plan of looks as the watch's last run left it (its report's "
        "clocks); empty before any run wrote them: each kind then starts from looks_done and "
        "alpha_spent (one clock shared by both kinds, as watches before 20261218000700 kept).",
    )
    modules_total: int = Field(ge=0)
    settings: WatchSettings
    twin: tuple[WatchComparisonEvidence, ...] = Field(
        description="The twin-wide comparisons: one per kind (audits, votes), in that order."
    )
    modules: tuple[WatchComparisonEvidence, ...] = ()

    @model_validator(mode="after")
    def _one_twin_comparison_per_kind(self) -> Self:
        if tuple((c.scope, c.kind) for c in self.twin) != tuple(
            ("twin", kind) for kind in WATCH_KINDS
        ):
            raise ValueError("twin holds one twin-wide comparison per kind: audits, votes")
        if any(c.scope != "module" for c in self.modules):
            raise ValueError("modules holds module comparisons only")
        return self


class WatchComparison(_Frozen):
    """One comparison as the run's report shows it: `value` is the upper bound of Newcombe's
    interval for (new - old) at this look's level (None when not tested), against `threshold`
    (-margin); for a twin-wide comparison over several modules, of the difference standardised
    to the old side's module mix (`worker.watch.standardized_interval`) over the modules with
    at least min_evidence on each side. `evidence` holds all the comparison's counts;
    `compared_new_n` and `compared_old_n` those of the strata it compared (None: none had
    enough evidence)."""

    scope: Literal["twin", "module"]
    kind: WatchKind
    module_key: str | None
    value: float | None
    difference: float | None
    threshold: float
    verdict: WatchComparisonVerdict
    evidence: dict[str, int]
    compared_new_n: int | None = None
    compared_old_n: int | None = None
    method: str | None = None


class WatchReport(_Frozen):
    """The watch's decision at one run (the run's gate_report.watch, the watch's last_report)."""

    watch_id: UUID
    spec_id: UUID
    previous_spec_id: UUID | None
    mode: WatchMode
    state: WatchState
    action: WatchAction
    tested: bool
    final: bool = Field(
        False,
        description="True when the watch had expired or this run publishes the next spec: "
        "this run's test was the final one, spending all the alpha left (the state is then "
        "regressed, passed, expired or superseded).",
    )
    superseding: bool = Field(
        False,
        description="True when this run publishes the next spec: its final test was made then "
        "(the state is regressed, passed or superseded), not at expiry.",
    )
    look: int = Field(
        ge=0, description="Planned looks reached, this one included: the least of the kinds in "
        "play (each kind has its own plan: clocks); never more than looks_planned.")
    looks_planned: int
    information: float = Field(ge=0, le=1, description="The least of the kinds in play.")
    alpha_spent: float = Field(
        ge=0, le=1, description="The share of watch_alpha spent by the whole watch so far: the "
        "mean of the kinds' own (each kind's comparisons hold half of the planned ones).")
    comparisons_planned: int = Field(
        ge=1, description="Comparisons the spending is split over: 2 kinds x (twin + modules)."
    )
    alpha_per_comparison: float | None = Field(
        description="The largest share a comparison tested at this run spent (each kind's own "
        "in clocks); None when nothing was tested.")
    z: float | None
    window_start: AwareDatetime
    published_at: AwareDatetime
    comparisons: tuple[WatchComparison, ...]
    clocks: tuple[WatchClock, ...] = Field(
        (), description="Each kind's own plan of looks after this run, audits then votes."
    )


GateReport.model_rebuild()
RunDecision.model_rebuild()
