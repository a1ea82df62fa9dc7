"""Reward functions for the RL tests, imported by path (``rl_test_rewards:hang``) in the reward actors:
tests/ is on the test session's Ray workers' PYTHONPATH (conftest.py)."""

import time


def hang(prompts, completions, **columns):
    """A reward that never answers (a stuck remote service, a deadlocked grader)."""
    time.sleep(3600)
    return [0.0] * len(completions)


def digit_share(prompts, completions, **columns):
    """A dense reward (the share of digits in the completion): every group has variance, so every step
    trains, which the resume and fault tests need (the tiny SFT policy is rarely right, and a sparse reward
    would leave most of their steps without an update)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
