"""rayft.rl: GRPO and PPO as a loop of Ray actors (rollout, learner, reward) around the training engine.

Imported as ``rayft.rl`` (see ``rayft/__init__.py``); the modules keep heavy imports (torch, vLLM) inside the
functions that need them, so the records and the math load quickly on the driver.
"""
