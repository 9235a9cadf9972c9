"""The precompute job: plan, score and write reference log-probs into a store (:mod:`.job`), on Ray (:mod:`.ray`),
split over a launcher's ranks (:mod:`.ranks`)."""

from .config import PrecomputeConfig
from .job import precompute, repair_store
from .plan import PrecomputePlan, plan_precompute
from .ray import precompute_on_ray  # imports ray only when called

__all__ = ["PrecomputeConfig", "PrecomputePlan", "plan_precompute", "precompute", "precompute_on_ray", "repair_store"]
