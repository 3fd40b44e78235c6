"""The parallel plan as pure data: degrees, rank layout, memory and step-time model, search.

Imports no torch.distributed (nor torch): ``orch plan`` runs on a laptop, in milliseconds, for
clusters nobody here has.
"""

from orch.plan.degrees import Degrees
from orch.plan.machine import Machine, resolve_machine
from orch.plan.plan import Plan, build_plan, evaluate
from orch.plan.search import SearchResult, search

__all__ = ["Degrees", "Machine", "Plan", "SearchResult", "build_plan", "evaluate",
           "resolve_machine", "search"]
