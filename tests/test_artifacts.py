"""The registry contract (rayft/artifacts.py): versioned entries behind a pointer written last, garbage
collection, the manifest's schema, kind, training hash and base-model source. Unit tier: no Ray."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayft import artifacts

ROOT = Path(__file__).resolve().parents[1]


def _fake_adapter(d: Path, tag: int = 0) -> Path:
    """An adapter directory whose files all carry ``tag``, so a reader can tell whether the files it loaded
    come from one registration."""
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"tag": tag, "r": 8}))
    save_file({"w": torch.full((64, 64), float(tag))}, str(d / "adapter_model.safetensors"))
    return d


def _manifest(name: str = "a", tag: int = 0, **kw) -> artifacts.Manifest:
    return artifacts.Manifest(name=name, kind="adapter", base_model="org/base", source={"tag": tag}, **kw)


def _load_tag(path: Path, m: artifacts.Manifest) -> int:
    cfg_tag = json.loads((path / "adapter_config.json").read_text())["tag"]
    weights = load_file(str(path / "adapter_model.safetensors"))["w"]
    assert cfg_tag == m.source["tag"] and bool((weights == float(cfg_tag)).all()), "files of two registrations"
    return cfg_tag


def test_register_resolve_round_trip(tmp_path):
    src = _fake_adapter(tmp_path / "src", tag=7)
    reg = tmp_path / "reg"
    path = artifacts.register(src, reg, _manifest("math-r16", 7, lora_rank=16, config={"train": {"lr": 1e-3}}))
    got_path, got = artifacts.resolve(reg, "math-r16")
    assert got_path == path == reg / "math-r16" / got.version
    assert (reg / "math-r16" / artifacts.POINTER).read_text() == got.version + "\n"
    assert artifacts.VERSION_RE.match(got.version) and got.schema_version == artifacts.SCHEMA_VERSION
    assert got.kind == "adapter" and got.lora_rank == 16 and got.created_at and got.code_version
    assert got.training_hash == artifacts.training_hash({"train": {"lr": 1e-3}})
    assert _load_tag(got_path, got) == 7
    again = artifacts.register(src, reg, _manifest("math-r16", 7))
    assert again != path and artifacts.resolve(reg, "math-r16") == (again, artifacts.read_manifest(again))
    assert [e.name for e in artifacts.list_entries(reg)] == ["math-r16"]
    assert not [p for p in (reg / "math-r16").iterdir() if p.name.startswith(".")]  # no temp pointer left


def test_reader_never_sees_a_missing_or_partial_entry(tmp_path):
    """A reader looping resolve + load while the same name is re-registered over and over. The rename-based
    swap this replaced fails here within a few registrations (KeyError: for a moment there was no entry).

    The writer starts a registration only once the reader has finished a read since the previous one began,
    so a read never spans KEEP_VERSIONS registrations (the documented limit); all other interleavings of
    reads and registrations stay possible, and a 1 us thread switch interval makes them frequent."""
    srcs = [_fake_adapter(tmp_path / f"src{i}", tag=i) for i in range(2)]
    reg = tmp_path / "reg"
    artifacts.register(srcs[0], reg, _manifest(tag=0))
    stop, errors, reads, seen = threading.Event(), [], [0], set()

    def reader():
        while not stop.is_set():
            try:
                path, m = artifacts.resolve(reg, "a")
                seen.add(_load_tag(path, m))
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure of a reader is what this test looks for
                errors.append(repr(e))
                stop.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=reader)
    registrations = 0
    try:
        thread.start()
        while not stop.is_set() and registrations < 60:
            before = reads[0]
            artifacts.register(srcs[registrations % 2], reg, _manifest(tag=registrations % 2))
            registrations += 1
            while reads[0] == before and not stop.is_set():
                time.sleep(0)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert errors == []
    assert registrations == 60 and reads[0] >= registrations and seen == {0, 1}
    assert len(artifacts.list_versions(reg, "a")) == artifacts.KEEP_VERSIONS


def test_registration_that_dies_before_the_pointer_leaves_the_previous_version_served(tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    first = artifacts.register(_fake_adapter(tmp_path / "v1", tag=1), reg, _manifest(tag=1))

    def die(entry, version):  # the process dies after the copy, before the pointer is replaced
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "_write_pointer", die)
    with pytest.raises(KeyboardInterrupt):
        artifacts.register(_fake_adapter(tmp_path / "v2", tag=2), reg, _manifest(tag=2))
    monkeypatch.undo()
    path, m = artifacts.resolve(reg, "a")
    assert path == first and _load_tag(path, m) == 1
    orphan = [v for v in artifacts.list_versions(reg, "a") if v != first.name]
    assert len(orphan) == 1 and (reg / "a" / orphan[0] / artifacts.MANIFEST).exists()  # complete, never served

    third = artifacts.register(_fake_adapter(tmp_path / "v3", tag=3), reg, _manifest(tag=3))
    assert artifacts.resolve(reg, "a")[0] == third


def test_copy_that_fails_midway_leaves_no_partial_version(tmp_path):
    reg = tmp_path / "reg"
    first = artifacts.register(_fake_adapter(tmp_path / "v1", tag=1), reg, _manifest(tag=1))
    broken = _fake_adapter(tmp_path / "v2", tag=2)
    (broken / "tokenizer.json").symlink_to(tmp_path / "missing")  # copytree fails on it after the other files
    with pytest.raises(shutil.Error, match="tokenizer.json"):
        artifacts.register(broken, reg, _manifest(tag=2))
    assert artifacts.resolve(reg, "a")[0] == first
    assert artifacts.list_versions(reg, "a") == [first.name]


def test_old_versions_collected_never_the_current_nor_a_newer_one(tmp_path):
    reg = tmp_path / "reg"
    src = _fake_adapter(tmp_path / "src")
    made = [artifacts.register(src, reg, _manifest()).name for _ in range(5)]
    assert made == sorted(made) and len(set(made)) == 5  # version ids sort by registration time
    assert artifacts.list_versions(reg, "a") == made[-artifacts.KEEP_VERSIONS:]
    assert artifacts.current_version(reg, "a") == made[-1]

    in_flight = "29990101T000000.000000Z-abcdef"  # a registration still copying (id newer than the pointer's)
    (reg / "a" / in_flight).mkdir()
    (reg / "a" / artifacts.POINTER).write_text(made[-2] + "\n")  # pointer rolled back to an older version
    assert artifacts.collect_garbage(reg, "a", keep=1) == [made[-3]]
    assert artifacts.list_versions(reg, "a") == [made[-2], made[-1], in_flight]
    assert artifacts.resolve(reg, "a")[0].name == made[-2]


def test_training_hash_ignores_run_paths_and_intervals_but_not_lr(tmp_path):
    from rayft.config import SFTConfig, dump_config, load_config

    def cfg(*overrides):
        return dump_config(load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", list(overrides)))

    here = cfg("model.name_or_path=/home/ana/rayft/assets/tiny-model", "data.train=/home/ana/d/arith-train.jsonl",
               "data.eval=/home/ana/d/arith-eval.jsonl", "run.name=first", "run.storage_path=/home/ana/runs")
    there = cfg("model.name_or_path=/mnt/shared/models/tiny-model/", "data.train=/data/arith-train.jsonl",
                "data.eval=/data/arith-eval.jsonl", "run.name=second", "run.registry=/mnt/reg",
                "train.logging_steps=1", "train.eval_steps=7", "train.save_steps=9", "train.keep_checkpoints=5",
                "train.max_failures=0", "run.progress=false")
    assert here != there and artifacts.training_hash(here) == artifacts.training_hash(there)

    for change in ("train.lr=1e-3", "model.name_or_path=/home/ana/rayft/assets/other-model",
                   "data.train=/home/ana/d/other.jsonl", "finetune.lora.r=8", "train.max_steps=61"):
        assert artifacts.training_hash(cfg(*_same(here), change)) != artifacts.training_hash(here), change

    hub_a, hub_b = cfg("model.name_or_path=Qwen/Qwen2.5-0.5B"), cfg("model.name_or_path=Other/Qwen2.5-0.5B")
    assert artifacts.training_hash(hub_a) != artifacts.training_hash(hub_b)  # a Hub id is hashed whole


def test_training_hash_path_fields_take_wildcards(monkeypatch):
    """``*`` in PATH_FIELDS reaches every item (for configs that list several datasets)."""
    monkeypatch.setattr(artifacts, "PATH_FIELDS", ("data.mix.*.path",))

    def mix(*paths):
        return artifacts.training_hash({"data": {"mix": [{"path": p, "weight": 1} for p in paths]}})

    assert mix("/a/x.jsonl", "/a/y.jsonl") == mix("/b/x.jsonl", "./y.jsonl") != mix("/a/x.jsonl", "/a/z.jsonl")


def _same(dump: dict) -> list[str]:
    return [f"model.name_or_path={dump['model']['name_or_path']}", f"data.train={dump['data']['train']}",
            f"data.eval={dump['data']['eval']}"]


def test_hub_id_kept_and_local_dir_recorded_as_local(tmp_path, monkeypatch):
    reg, src = tmp_path / "reg", _fake_adapter(tmp_path / "src")
    hub = artifacts.Manifest(name="hub", kind="adapter", base_model="Qwen/Qwen2.5-0.5B-Instruct")
    got = artifacts.read_manifest(artifacts.register(src, reg, hub))
    assert (got.base_model, got.base_model_source) == ("Qwen/Qwen2.5-0.5B-Instruct", "hub")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)  # a relative local dir shaped like a Hub id
    for name, base in (("rel", "models/tiny"), ("abs", str(tmp_path / "models" / "tiny"))):
        path = artifacts.register(src, reg, artifacts.Manifest(name=name, kind="adapter", base_model=base))
        got = artifacts.read_manifest(path)
        assert (got.base_model, got.base_model_source) == (base, "local")


def test_kind_must_match_the_directory(tmp_path):
    src = _fake_adapter(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="not a full_model directory"):
        artifacts.register(src, tmp_path / "reg", artifacts.Manifest(name="a", kind="full_model", base_model="b"))
    with pytest.raises(ValueError, match="kind"):
        artifacts.Manifest(name="a", kind="lora", base_model="b")


@pytest.mark.parametrize("schema", [artifacts.SCHEMA_VERSION + 1, None])
def test_unknown_schema_version_refused(tmp_path, schema):
    path = artifacts.register(_fake_adapter(tmp_path / "src"), tmp_path / "reg", _manifest())
    raw = json.loads((path / artifacts.MANIFEST).read_text())
    raw["schema_version"] = schema
    (path / artifacts.MANIFEST).write_text(json.dumps(raw))
    hint = "upgrade it" if schema else "re-register"
    with pytest.raises(artifacts.ManifestError, match=f"schema_version {schema}.*{hint}"):
        artifacts.resolve(tmp_path / "reg", "a")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "", ".hidden", "x..y", "a/../../b"])
def test_names_are_never_paths(tmp_path, name):
    with pytest.raises(ValueError, match="invalid adapter name"):
        artifacts.resolve(tmp_path, name)
    with pytest.raises(ValueError, match="invalid adapter name"):
        artifacts.register(_fake_adapter(tmp_path / "src"), tmp_path / "reg", _manifest(name))


def test_pointer_naming_a_path_refused(tmp_path):
    artifacts.register(_fake_adapter(tmp_path / "src"), tmp_path / "reg", _manifest())
    (tmp_path / "reg" / "a" / artifacts.POINTER).write_text("../../etc\n")
    with pytest.raises(artifacts.ManifestError, match="not a version id"):
        artifacts.resolve(tmp_path / "reg", "a")


def test_unknown_name(tmp_path):
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        artifacts.resolve(tmp_path, "nope")
    assert artifacts.list_entries(tmp_path / "absent") == []


def test_resolved_directory_loads_with_plain_peft(tmp_path):
    """The contract serving relies on: the path resolve() returns is a PEFT adapter directory as it is."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.tiny import build_tiny_model

    base_dir = tmp_path / "base"
    build_tiny_model(vocab_size=64, hidden_size=32, layers=1).save_pretrained(base_dir)

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "trained")
    artifacts.register(tmp_path / "trained", tmp_path / "reg",
                       artifacts.Manifest(name="tiny", kind="adapter", base_model=str(base_dir), lora_rank=4))
    path, m = artifacts.resolve(tmp_path / "reg", "tiny")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m.base_model), str(path)).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert m.base_model_source == "local"
