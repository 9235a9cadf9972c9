"""The precompute job: plan, score and write reference log-probs into a store (:mod:`.job`), on Ray (:mod:`.ray`)."""
