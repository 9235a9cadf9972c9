"""Token log-probs: the tile kernel (:mod:`.kernel`), the fused head (:mod:`.head`), HF models (:mod:`.model`)."""
