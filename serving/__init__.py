"""Serving: the base model and every registered adapter behind one OpenAI-compatible HTTP API on Ray Serve.

Imported as ``rayft.serving`` (see rayft/__init__.py). Layout:

* :mod:`~rayft.serving.config`   the typed job config (``jobs/serve.py --config``), validated at load.
* :mod:`~rayft.serving.protocol` OpenAI request models, the error contract (status + JSON body).
* :mod:`~rayft.serving.text`     stop strings (whole and streamed).
* :mod:`~rayft.serving.catalog`  registry -> served models: compatibility checks, chat templates, model list.
* :mod:`~rayft.serving.engine`   the CPU engine: rl's ``TransformersEngine`` with several adapters resident and
  a request queue that batches requests for different adapters into one decode (PEFT mixed-adapter batches).
* :mod:`~rayft.serving.app`      the Ray Serve application: FastAPI ingress + multiplexed engine replicas.
* :mod:`~rayft.serving.export`   merged export: a registered adapter folded into its full-precision base.
* :mod:`~rayft.serving.vllm_config`, :mod:`~rayft.serving.vllm_engine`   the GPU engine (vLLM, imported lazily).
* :mod:`~rayft.serving.eval_config`, :mod:`~rayft.serving.evaluation`   the evaluation job: models scored
  through any OpenAI-compatible endpoint.
"""
