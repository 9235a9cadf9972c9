"""RL with a reference: rollouts, old/reference log-probs once per rollout batch, ``forward_backward``.

``policy_loss_fn`` (= :func:`refmodel.losses.policy_loss`) and ``group_advantages`` are re-exported for the loop.
"""

from ..losses.advantages import group_advantages
from ..losses.policy import policy_loss as policy_loss_fn
from .forward_backward import ForwardBackwardOutput, configure_reference_service, forward_backward, kl_monitor
from .rollout import Rollouts, SamplingConfig, generate_rollouts, tokenize_prompts
from .scoring import (
    ScoredRollouts,
    exact_kl,
    needs_old_logprobs,
    policy_logprobs,
    reference_drift,
    reference_logprobs,
    score_rollouts,
)

__all__ = ["ForwardBackwardOutput", "configure_reference_service", "forward_backward", "kl_monitor", "Rollouts", "SamplingConfig", "ScoredRollouts", "exact_kl", "generate_rollouts", "group_advantages",
           "needs_old_logprobs", "policy_logprobs", "policy_loss_fn", "reference_drift", "reference_logprobs",
           "score_rollouts", "tokenize_prompts"]

_MOVED = {"needs_old_logps": "refmodel.rl.scoring.needs_old_logprobs",
          "policy_logps": "refmodel.rl.scoring.policy_logprobs",
          "reference_logps": "refmodel.rl.scoring.reference_logprobs"}


def __getattr__(name: str):
    # the names before the vocabulary's "...logprobs" (CONTRIBUTING): they work for one release, with a warning
    from .._deprecation import moved_attribute

    return moved_attribute(__name__, name, _MOVED)
