"""The soak's world: users, and twins of four kinds (and four more plain ones) with their
modules and specs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from soak.config import FEEDBACK_USERS
from testkit.world import Twin, make_twin, make_users


@dataclass(frozen=True)
class TwinPlan:
    name: str
    feedback_from: str
    modules: dict[str, str]  # module_key -> intent_label
    settings: dict[str, Any] = field(default_factory=dict)
    draft: bool = False  # a draft spec the audit pipeline audits (auto-publish twins publish it)


TWIN_PLANS = (
    TwinPlan("owner-only", "owner", {"answers": "factual_with_evidence", "chat": "casual_chat"}),
    TwinPlan(
        "open",
        "any_user",
        {
            "answers": "factual_with_evidence",
            "answers_strict": "factual_with_evidence",  # two modules on one intent
            "chat": "casual_chat",
            "planning": "task_planning",
        },
    ),
    TwinPlan(
        "fast-decay",
        "any_user",
        {"answers": "factual_with_evidence", "chat": "casual_chat"},
        {"half_life_days": 0.01},  # 14.4 minutes: evidence decays visibly within the soak
    ),
    TwinPlan(
        "small-batches-auto-publish",
        "any_user",
        {"answers": "factual_with_evidence", "planning": "task_planning"},
        {"max_batch_events": 10, "auto_publish": True},
        draft=True,
    ),
    # More twins than workers, so that the workers compete for queued runs.
    *(TwinPlan(f"plain-{k}", "any_user", {"answers": "factual_with_evidence",
                                          "chat": "casual_chat"}) for k in range(1, 5)),
)


@dataclass(frozen=True)
class World:
    owner_id: str
    users: list[str]  # users[0] is the owner of every twin
    twins: list[Twin]
    open_twins: frozenset[str]  # the twins any signed-in user may send feedback on

    def twins_open_to(self, user_id: str) -> list[Twin]:
        return [t for t in self.twins if t.id in self.open_twins or user_id == self.owner_id]


def create_world(db: psycopg.Connection) -> World:
    """What the platform and the owner would have made: users, twins, modules and specs."""
    users = [u.id for u in make_users(db, "soak", FEEDBACK_USERS)]
    twins = [
        make_twin(db, users[0], plan.modules, name=f"soak-{plan.name}",
                  feedback_from=plan.feedback_from, settings=plan.settings,
                  draft={"modules": []} if plan.draft else None)
        for plan in TWIN_PLANS
    ]
    open_twins = frozenset(
        t.id for t, plan in zip(twins, TWIN_PLANS, strict=True) if plan.feedback_from == "any_user"
    )
    return World(users[0], users, twins, open_twins)
