"""The oracle of the zero-shot evaluation: for a held-out task, the cluster expert of its family.

Ostapenko et al. (2024, Sec. 6) compare routing with an oracle that knows which expert suits the
task. For a task no expert was trained on, lorlib's oracle is the MBC cluster expert trained on
most of the tasks of the held-out task's own family (`family_cluster`). It is resolved per task
(`for_task`), so it runs in evaluations only, not on a typed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lorlib_ui.core.routers.base import TaskContext, TaskRouter, register
from lorlib_ui.core.routers.expert import ExpertRouter

if TYPE_CHECKING:
    from lorlib_ui.core.library import Library


def family_cluster(library: Library, family: str | None) -> str | None:
    """The cluster expert trained on most of a family's library tasks (None when no cluster expert
    has a task of it); ties go to the first name in sorted order."""
    from lorlib_ui.core.library import TASK_KINDS  # the library module loads torch; the registry need not

    family_of = {t: e.family for e in library.experts if e.kind in TASK_KINDS for t in e.tasks}
    votes = {e.name: sum(family_of.get(t) == family for t in e.tasks) for e in library.experts if e.kind == "cluster"}
    best = max(sorted(votes), key=lambda name: votes[name], default=None)
    return best if best is not None and votes[best] > 0 else None


@register()
@dataclass(frozen=True)
class OracleRouter(TaskRouter):
    name: ClassVar[str] = "oracle"
    summary: ClassVar[str] = "per evaluated task, the cluster expert of its family (evaluate only)"
    presets: ClassVar[dict[str, str]] = {"oracle": "oracle"}

    @classmethod
    def unavailable(cls, groups: dict[str, list[str]]) -> str | None:
        return None if groups.get("cluster") else "the library has no cluster experts (run `cluster`)"

    def for_task(self, context: TaskContext) -> ExpertRouter | None:
        """The expert router it stands for on a task of the context's family; None when no expert fits."""
        expert = family_cluster(context.library, context.family)
        if expert is None:
            return None
        return ExpertRouter.build(expert, context.library.names)
