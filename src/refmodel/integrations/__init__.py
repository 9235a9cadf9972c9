"""Integrations with training frameworks (``refmodel.integrations.trl``: TRL's DPO, KTO and GRPO trainers).

Each integration imports its framework only when it is imported itself; ``import refmodel`` never does.
"""
