"""Token log-probs: the tile kernel (:mod:`.kernel`, helpers in :mod:`.tiles`), the fused head
(:mod:`.head`), the logit transform (:mod:`.transform`), the LM head (:mod:`.lm_head`) and Hugging Face
models (:mod:`.model`)."""

from .head import TokenLogprobs, naive_token_logprobs, token_logprobs
from .lm_head import LMHead
from .model import head_logprobs, model_logprobs
from .transform import LogitTransform, apply_logit_transform, full_log_softmax

__all__ = ["LMHead", "LogitTransform", "TokenLogprobs", "apply_logit_transform", "full_log_softmax",
           "head_logprobs", "model_logprobs", "naive_token_logprobs", "token_logprobs"]
