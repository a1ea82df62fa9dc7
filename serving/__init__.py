"""rayft.serving: the base model and registered adapters over an OpenAI-compatible HTTP API on Ray Serve,
merged exports, and the evaluation job that scores adapters through such an endpoint.

Imported as ``rayft.serving`` (see ``rayft/__init__.py``); heavy imports (torch, transformers, PEFT, vLLM,
the OpenAI client) stay inside the functions that need them.
"""
