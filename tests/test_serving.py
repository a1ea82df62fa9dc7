"""Serving's pure pieces, without Ray: request validation and the error contract, limits, stop strings,
registry -> served models (compatibility checks, model cards), the config, the app builder and the job's CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayft import artifacts
from rayft.config import ConfigError, load_config
from rayft.serving.catalog import BaseInfo, Catalog, IncompatibleAdapter, check_adapter
from rayft.serving.config import HTTPSection, LimitsSection, ServeConfig, ingress_env
from rayft.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_limits,
    from_validation_error,
    parse_json,
)
from rayft.serving.text import StopTracker, find_stop, safe_prefix_len

ROOT = Path(__file__).resolve().parents[1]


def parse(model_cls, body: dict):
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


# ---------------------------------------------------------------------------------- requests, errors


def test_a_valid_chat_request():
    req = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                        "stop": "\n", "max_completion_tokens": 7, "temperature": 0})
    assert req.stop_list() == ["\n"] and req.wanted_tokens(64) == 7 and req.chat() == [
        {"role": "user", "content": "hi"}]
    parts = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert parts.chat() == [{"role": "system", "content": "ab"}]


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, "presence_penalty"),
])
def test_bad_chat_parameters_are_400_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        parse(ChatCompletionRequest, body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["message"].startswith(param) and e.value.body()["error"]["type"] == \
        "invalid_request_error"


def test_completion_prompts_in_every_shape():
    assert parse(CompletionRequest, {"model": "m", "prompt": "ab"}).prompts() == ["ab"]
    assert parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert parse(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse(CompletionRequest, {"model": "m", "prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    for bad in ([], [[]], [1.5], {"a": 1}):
        with pytest.raises(APIError) as e:
            parse(CompletionRequest, {"model": "m", "prompt": bad})
        assert e.value.status == 400 and e.value.param.startswith("prompt")


def test_limits():
    limits = LimitsSection(max_tokens=32, default_max_tokens=16, max_n=2, max_logprobs=3, max_stop=1, max_prompts=2)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    def refused(req, n_prompts=1):
        with pytest.raises(APIError) as e:
            check_limits(req, limits, n_prompts)
        assert e.value.status == 400
        return e.value.param

    check_limits(parse(ChatCompletionRequest, {**chat, "max_tokens": 32}), limits)
    assert refused(parse(ChatCompletionRequest, {**chat, "max_tokens": 33})) == "max_tokens"
    assert refused(parse(ChatCompletionRequest, {**chat, "max_completion_tokens": 99})) == "max_completion_tokens"
    assert refused(parse(ChatCompletionRequest, {**chat, "n": 3})) == "n"
    assert refused(parse(ChatCompletionRequest, {**chat, "stop": ["a", "b"]})) == "stop"
    assert refused(parse(ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": 4})) == "top_logprobs"
    assert refused(parse(ChatCompletionRequest, {**chat, "top_logprobs": 2})) == "top_logprobs"
    assert refused(parse(CompletionRequest, {"model": "m", "prompt": "a", "max_tokens": 0})) == "max_tokens"
    check_limits(parse(CompletionRequest, {"model": "m", "prompt": "a", "max_tokens": 0, "echo": True,
                                           "logprobs": 3}), limits)
    assert refused(parse(CompletionRequest, {"model": "m", "prompt": "a", "logprobs": 4})) == "logprobs"
    assert refused(parse(CompletionRequest, {"model": "m", "prompt": ["a"] * 3}), n_prompts=3) == "prompt"


def test_json_body_errors():
    assert parse_json(b'{"a": 1}', 1024) == {"a": 1}
    for raw in (b"{bad", b"\xff\xfe", b"[1, 2]"):
        with pytest.raises(APIError) as e:
            parse_json(raw, 1024)
        assert e.value.status == 400 and e.value.code == "invalid_json"
    with pytest.raises(APIError) as e:
        parse_json(b"x" * 2000, 1024)
    assert e.value.status == 413


def test_api_errors_survive_pickling():
    """Errors raised in an engine replica reach the ingress through Ray (pickled)."""
    import pickle

    err = pickle.loads(pickle.dumps(APIError(503, "busy", code="overloaded", headers={"Retry-After": "2"})))
    assert (err.status, err.message, err.code, err.headers) == (503, "busy", "overloaded", {"Retry-After": "2"})


# --------------------------------------------------------------------------------------- stop strings


def test_stop_strings():
    assert find_stop("a=1\nb", ["\n", "b"]) == 3 and find_stop("abc", ["z"]) is None
    assert safe_prefix_len("answer #", ["##"]) == 7 and safe_prefix_len("ab\ufffd", []) == 2


def test_streaming_holds_back_what_may_become_a_stop_string():
    t = StopTracker(["###"])
    sent = [t.feed(s) for s in ("4", "4 #", "4 ##", "4 ##x", "4 ##x###tail")]
    assert sent == ["4", " ", "", "##x", ""] and t.stopped and t.text == "4 ##x"
    assert "".join(sent) == t.text and t.finish("4 ##x###tail") == ""
    free = StopTracker([])
    assert free.feed("ab") == "ab" and free.finish("abc") == "c" and not free.stopped


# ---------------------------------------------------------------------------------------- the catalog


def fake_adapter(tmp: Path, name: str, base: str, r: int = 4, targets=("q_proj", "v_proj"),
                 kind: str = "adapter") -> Path:
    src = tmp / f"src-{name}"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "target_modules": list(targets)}))
    (src / "config.json").write_text("{}")
    registry = tmp / "registry"
    artifacts.register(src, registry, artifacts.Manifest(
        name=name, kind=kind, base_model=base, lora_rank=r, source={"run_name": f"run-{name}", "job": "sft"},
        metrics={"eval_loss": 1.25}))
    return registry


BASE_MODULES = frozenset({"model", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                          "model.layers.0.mlp.up_proj", "lm_head"})


def test_registry_to_served_models(tmp_path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    for name, kw in (("good", {}), ("other-base", {"base": "org/other"}), ("wide", {"r": 128}),
                     ("alien", {"targets": ("c_attn",)}), ("merged", {"kind": "full_model"})):
        registry = fake_adapter(tmp_path, name, **{"base": str(base_dir), **kw})
    base = BaseInfo(id="base", name_or_path=str(base_dir), module_names=BASE_MODULES, max_lora_rank=64)
    cat = Catalog(base, str(registry))
    assert sorted(cat.models) == ["base", "good"]
    card = cat.get("good").card()
    assert card["base_model"] == str(base_dir) and card["rank"] == 4 and card["source_run"] == "run-good"
    assert card["metrics"] == {"eval_loss": 1.25} and card["parent"] == "base" and card["object"] == "model"
    assert cat.get("good").load_id == f"good@{card['version']}"
    assert cat.get("base").card()["kind"] == "base"
    reasons = {n: cat.refused[n] for n in ("other-base", "wide", "alien", "merged")}
    assert "trained on 'org/other'" in reasons["other-base"] and "base_aliases" in reasons["other-base"]
    assert "rank 128" in reasons["wide"] and "max_lora_rank=64" in reasons["wide"]
    assert "c_attn" in reasons["alien"] and "full_model" in reasons["merged"]
    with pytest.raises(APIError) as e:
        cat.get("wide")
    assert e.value.status == 400 and "max_lora_rank" in e.value.message
    with pytest.raises(APIError) as e:
        cat.get("../good")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    # registered later: found at its first request, without waiting for the periodic re-read
    fake_adapter(tmp_path, "late", str(base_dir))
    assert cat.get("late").id == "late"
    # only the names the config lists
    assert sorted(Catalog(base, str(registry), names=["good"]).models) == ["base", "good"]
    # an alias of the base (e.g. its Hub id) is the same model
    aliased = BaseInfo(id="base", name_or_path=str(base_dir), aliases=("org/other",), module_names=BASE_MODULES)
    assert "other-base" in Catalog(aliased, str(registry)).models


def test_check_adapter_rules():
    base = BaseInfo(id="b", name_or_path="org/base", module_names=BASE_MODULES, max_lora_rank=16)
    m = artifacts.Manifest(name="x", kind="adapter", base_model="org/base", lora_rank=8)
    check_adapter(m, {"r": 8, "target_modules": ["q_proj"]}, base)
    check_adapter(m, {"r": 8, "target_modules": r".*\.(q_proj|v_proj)"}, base)
    with pytest.raises(IncompatibleAdapter, match="rank 32"):
        check_adapter(m, {"r": 8, "rank_pattern": {"q_proj": 32}, "target_modules": ["q_proj"]}, base)
    with pytest.raises(IncompatibleAdapter, match="PEFT type"):
        check_adapter(m, {"peft_type": "IA3", "target_modules": ["q_proj"]}, base)


# ----------------------------------------------------------------------------------- config, builder


@pytest.mark.parametrize("name", ["serve_tiny.yaml", "serve_qwen05b.yaml", "serve_qwen05b_vllm.yaml"])
def test_shipped_serve_configs_validate(name):
    cfg = load_config(ServeConfig, ROOT / "configs" / name)
    assert cfg.deployment.max_adapters_per_replica >= 1 and cfg.limits.max_tokens >= cfg.limits.default_max_tokens


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="deployment.num_replica"):
        load_config(ServeConfig, data={"model": {"name_or_path": "m"}, "deployment": {"num_replica": 2}})
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(ServeConfig, data={"model": {"name_or_path": "m"},
                                       "deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    cfg = load_config(ServeConfig, data={"model": {"name_or_path": "m"}, "api_key_env": "RAYFT_TEST_UNSET_KEY"})
    with pytest.raises(ConfigError, match="RAYFT_TEST_UNSET_KEY"):
        cfg.resolved_api_key()


def test_app_builder_from_a_config_dict_and_file():
    from ray.serve import Application

    from rayft.serving.app import build_app, deployment_options

    app = build_app({"model": {"name_or_path": "assets/tiny-model"}, "deployment": {"num_replicas": 2}})
    assert isinstance(app, Application)
    assert isinstance(build_app({"config": str(ROOT / "configs" / "serve_tiny.yaml"), "http.port": "8123"}),
                      Application)
    auto = ServeConfig.model_validate({"model": {"name_or_path": "m"},
                                       "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    opts = deployment_options(auto)
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    with pytest.raises(ConfigError, match="limits.max_tokens"):
        build_app({"model": {"name_or_path": "m"}, "limits": {"max_tokens": 0}})
    # the key is read where the app is built (replicas do not have the builder's environment)
    with pytest.raises(ConfigError, match="RAYFT_TEST_UNSET_KEY"):
        build_app({"model": {"name_or_path": "m"}, "api_key_env": "RAYFT_TEST_UNSET_KEY"})


def test_serve_job_refuses_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\nhttp: {prot: 1}\n")
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--config", str(bad)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "http.prot" in p.stderr and "Traceback" not in p.stderr


def test_ingress_modes_name_ray_serves_variables_and_direct_pins_the_port():
    assert ingress_env(HTTPSection()) == {}
    assert ingress_env(HTTPSection(ingress="haproxy")) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                                                           "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    direct = ingress_env(HTTPSection(ingress="direct", port=8123))
    assert direct["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == direct["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (direct["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], direct["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("8123", "8124")  # the range is [min, max): the configured port alone
    with pytest.raises(ConfigError, match="http.port"):
        load_config(ServeConfig, data={"model": {"name_or_path": "m"}, "http": {"ingress": "direct", "port": 0}})
    with pytest.raises(ConfigError, match="http.ingress"):
        load_config(ServeConfig, data={"model": {"name_or_path": "m"}, "http": {"ingress": "fast"}})


def test_serve_job_refuses_direct_ingress_on_a_running_cluster_with_exit_2():
    """Serve reads the variables when the cluster starts: on a running one the job cannot set them, and says so
    before connecting (the address below has no cluster behind it)."""
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--config", "configs/serve_tiny.yaml",
                        "--set", "http.ingress=direct"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "http.ingress: direct needs Ray started with RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in p.stderr


def test_the_serve_deploy_file_carries_the_configs_http_section(tmp_path, monkeypatch):
    """Serve's CLI starts its proxy from the deploy file's http_options, never from the application: the file
    jobs/serve.py --deploy-config writes takes them from the config's http section (and the shipped one is it)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rayft.serving.config import deploy_file

    monkeypatch.chdir(ROOT)
    shipped = yaml.safe_load((ROOT / "configs" / "serve_tiny_deploy.yaml").read_text())
    assert shipped == deploy_file("configs/serve_tiny.yaml")
    out = tmp_path / "deploy.yaml"
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "serve.py"), "--config", "configs/serve_tiny.yaml",
                        "--set", "http.port=8123", "--set", "http.host=0.0.0.0", "--set", "app_name=other",
                        "--deploy-config", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8123)
    (app,) = schema.applications
    assert app.name == "other" and app.import_path == "rayft.serving.app:build_app"
    assert app.args == {"config": "configs/serve_tiny.yaml", "http.port": "8123", "http.host": "0.0.0.0",
                        "app_name": "other"}
    with pytest.raises(ConfigError, match="http.port"):
        deploy_file("configs/serve_tiny.yaml", ["http.port=99999"])
    with pytest.raises(ConfigError, match="http.ingress: direct cannot go in a deploy file"):
        deploy_file("configs/serve_tiny.yaml", ["http.ingress=direct"])


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig.model_validate({"model": {"name_or_path": "m"}, "registry": "adapters"}).with_absolute_paths()
    assert cfg.model.name_or_path == str(tmp_path / "m") and cfg.registry == str(tmp_path / "adapters")
    assert ServeConfig.model_validate({"model": {"name_or_path": "org/hub-id"}}).with_absolute_paths().model.name_or_path \
        == "org/hub-id"


def test_min_tokens_holds_back_stop_strings_and_is_bounded_by_max_tokens():
    """A stop string counts only once the completion has min_tokens tokens, and only where it ends after the
    text of those first tokens (vLLM checks only the text added after them)."""
    t = StopTracker(["x"], min_tokens=3)
    assert not t.check("ax", 2) and not t.check("axb", 3) and t.check("axbx", 4) and t.text == "axb"
    t = StopTracker(["xy"], min_tokens=2)
    assert not t.check("ax", 1) and t.check("axy", 2) and t.text == "a"  # straddles the first tokens' end
    assert parse(CompletionRequest, {"model": "m", "prompt": "a", "min_tokens": 4, "max_tokens": 4}).min_tokens == 4
    for body in ({"prompt": "a", "max_tokens": 4}, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}):
        cls = CompletionRequest if "prompt" in body else ChatCompletionRequest
        with pytest.raises(APIError) as e:
            check_limits(parse(cls, {"model": "m", **body, "min_tokens": 5}), LimitsSection())
        assert e.value.status == 400 and e.value.param == "min_tokens" and "max_tokens (4)" in e.value.message
    with pytest.raises(APIError) as e:
        parse(CompletionRequest, {"model": "m", "prompt": "a", "min_tokens": -1})
    assert e.value.param == "min_tokens"
