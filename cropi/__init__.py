"""CROPI: curriculum RL with off-policy influence guidance (arXiv 2510.26491).

Offline, CPU-first implementation: GRPO on verifiable math tasks (``cropi.tasks``,
``cropi.rewards``) with a small locally built policy (``cropi.tiny_model``) and
influence-guided prompt selection.
"""
