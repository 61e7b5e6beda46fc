"""Deployment YAML → model repository: errors name the key; N prefill / M decode; colocated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from backends.launch.deploy import (
    Deployment,
    Pool,
    load_deployment,
    model_specs,
    parse_deployment,
    write_repository,
)
from backends.launch.install import repo_root
from backends.serving.engine_spec import EngineSpec, load_engine_spec

ENGINE_KEYS = "['backend', 'block_size', 'dtype', 'max_model_len', 'max_num_batched_tokens', 'max_num_seqs', 'num_blocks', 'threads']"


def test_empty_file_is_the_default_deployment(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("")
    assert load_deployment(tmp_path / "d.yaml") == Deployment()


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(
        "model: tiny-mla\ndisaggregation: true\nprefill: {count: 2, devices: [cuda:0, cuda:1]}\n"
        "decode: {count: 3}\nengine: {block_size: 64, num_blocks: 100, max_model_len: 512, dtype: bfloat16}\n"
        "serving: {max_tokens: 256, prefix: pd_, decoupled: false}\n")
    assert load_deployment(tmp_path / "d.yaml") == Deployment(
        model="tiny-mla", disaggregation=True, prefill=Pool(2, ("cuda:0", "cuda:1")), decode=Pool(3, ("cpu",)),
        engine=EngineSpec(source="tiny-mla", block_size=64, num_blocks=100, max_model_len=512, dtype="bfloat16"),
        max_tokens=256, prefix="pd_", decoupled=False)


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "deployment: expected a mapping at the top level, got list"),
    ({"bogus": 1}, "bogus: unknown key (expected one of "
                   "['decode', 'disaggregation', 'engine', 'model', 'prefill', 'serving'])"),
    ({"model": None}, "model: missing value"),
    ({"model": 5}, "model: expected a string, got 5"),
    ({"model": "no-such-model"}, "model: 'no-such-model' is not one of smollm2-135m-instruct, "
                                 "tiny-llama, tiny-mla, a .gguf file or an HF checkpoint directory"),
    ({"model": "/no/such/model.gguf"}, "model: '/no/such/model.gguf': no such GGUF file"),
    ({"disaggregation": "yes"}, "disaggregation: expected true or false, got 'yes'"),
    ({"prefill": 3}, "prefill: expected a mapping, got 3"),
    ({"prefill": None}, "prefill: expected a mapping, got None"),
    ({"prefill": {"count": 0}}, "prefill.count: expected a positive integer, got 0"),
    ({"prefill": {"count": "2"}}, "prefill.count: expected a positive integer, got '2'"),
    ({"prefill": {"cnt": 1}}, "prefill.cnt: unknown key (expected one of ['count', 'devices'])"),
    ({"decode": {"count": None}}, "decode.count: missing value"),
    ({"decode": {"devices": []}}, "decode.devices: expected a non-empty list of device names, got []"),
    ({"decode": {"devices": "cpu"}}, "decode.devices: expected a non-empty list of device names, got 'cpu'"),
    ({"decode": {"devices": ["gpu0"]}}, "decode.devices: expected cpu, cuda or cuda:N, got 'gpu0'"),
    ({"engine": 5}, "engine: expected a mapping, got 5"),
    ({"engine": {"block_size": -1}}, "engine.block_size: expected a positive integer, got -1"),
    ({"engine": {"block_size": True}}, "engine.block_size: expected a positive integer, got True"),
    ({"engine": {"dtype": "int8"}}, "engine.dtype: expected float32, float16 or bfloat16, got 'int8'"),
    ({"engine": {"dtype": None}}, "engine.dtype: missing value"),
    ({"engine": {"backend": "vllm"}}, "engine.backend: expected one of ['tensorrt_llm', 'torch'], got 'vllm'"),
    ({"engine": {"backend": 5}}, "engine.backend: expected a string, got 5"),
    ({"engine": {"backend": None}}, "engine.backend: missing value"),
    ({"engine": {"foo": 1}}, f"engine.foo: unknown key (expected one of {ENGINE_KEYS})"),
    ({"engine": {"source": "x"}}, f"engine.source: unknown key (expected one of {ENGINE_KEYS})"),
    ({"engine": {"device": "cuda"}}, f"engine.device: unknown key (expected one of {ENGINE_KEYS})"),
    ({"serving": 5}, "serving: expected a mapping, got 5"),
    ({"serving": {"x": 1}}, "serving.x: unknown key (expected one of ['cluster_lookup_ms', 'decoupled', "
                                 "'max_tokens', 'prefix', 'stream_interval'])"),
    ({"serving": {"cluster_lookup_ms": 0}}, "serving.cluster_lookup_ms: expected a positive integer, got 0"),
    ({"serving": {"stream_interval": 0}}, "serving.stream_interval: expected a positive integer, got 0"),
    ({"serving": {"stream_interval": "4"}}, "serving.stream_interval: expected a positive integer, got '4'"),
    ({"serving": {"decoupled": "no"}}, "serving.decoupled: expected true or false, got 'no'"),
    ({"serving": {"decoupled": 0}}, "serving.decoupled: expected true or false, got 0"),
    ({"serving": {"decoupled": None}}, "serving.decoupled: missing value"),
    ({"serving": {"max_tokens": 0}}, "serving.max_tokens: expected a positive integer, got 0"),
    ({"serving": {"max_tokens": 2048}}, "serving.max_tokens: must be <= engine.max_model_len=1024, got 2048"),
    ({"serving": {"prefix": 5}}, "serving.prefix: expected a string, got 5"),
    ({"serving": {"prefix": "a/b"}}, "serving.prefix: expected letters, digits, '_' or '-', got 'a/b'"),
])
def test_bad_deployment_names_the_key(data: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_deployment(data)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("prefill: [unclosed\n")
    with pytest.raises(ValueError, match=rf"^{path}: not valid YAML \(") as info:
        load_deployment(path)
    assert "flow sequence" in str(info.value)


def _summary(dep: Deployment) -> list[tuple[str, str, int, dict[str, str], str | None]]:
    return [(s.name, s.backend, s.max_batch_size, dict(s.parameters), None if e is None else e.device)
            for s, e in model_specs(dep)]


def test_n_prefill_m_decode_models_and_parameters() -> None:
    dep = parse_deployment({"prefill": {"count": 2, "devices": ["cuda:0", "cuda:1"]},
                            "decode": {"count": 3, "devices": ["cuda:2", "cuda:3"]},
                            "serving": {"max_tokens": 100, "prefix": "x_"}})
    common = {"source": "smollm2-135m-instruct", "max_tokens": "100", "max_model_len": "1024",
              "cluster_lookup_ms": "100", "block_size": "16",
              "disaggregation": "on", "prefill_models": "x_prefill,x_prefill_1",
              "decode_models": "x_decode,x_decode_1,x_decode_2"}
    assert _summary(dep) == [
        ("x_llm", "pd_orchestrator", 0, {**common, "api": "llm"}, None),
        ("x_ensemble", "pd_orchestrator", 64, {**common, "api": "ensemble"}, None),
        ("x_prefill", "pd_worker", 0, {"role": "prefill", "stream_interval": "1"}, "cuda:0"),
        ("x_prefill_1", "pd_worker", 0, {"role": "prefill", "stream_interval": "1"}, "cuda:1"),
        ("x_decode", "pd_worker", 0, {"role": "decode", "stream_interval": "1"}, "cuda:2"),
        ("x_decode_1", "pd_worker", 0, {"role": "decode", "stream_interval": "1"}, "cuda:3"),
        ("x_decode_2", "pd_worker", 0, {"role": "decode", "stream_interval": "1"}, "cuda:2"),
    ]


def test_disaggregation_off_is_colocated_workers_with_role_both() -> None:
    """The decode pool sizes the colocated workers; the prefill pool is unused."""
    dep = parse_deployment({"disaggregation": False, "prefill": {"count": 4}, "decode": {"count": 2}})
    common = {"source": "smollm2-135m-instruct", "max_tokens": "1024", "max_model_len": "1024",
              "cluster_lookup_ms": "100", "block_size": "16",
              "disaggregation": "off", "prefill_models": "", "decode_models": "worker,worker_1"}
    assert _summary(dep) == [
        ("llm", "pd_orchestrator", 0, {**common, "api": "llm"}, None),
        ("ensemble", "pd_orchestrator", 64, {**common, "api": "ensemble"}, None),
        ("worker", "pd_worker", 0, {"role": "both", "stream_interval": "1"}, "cpu"),
        ("worker_1", "pd_worker", 0, {"role": "both", "stream_interval": "1"}, "cpu"),
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_repository_engine_yaml_round_trips(tmp_path: Path) -> None:
    dep = parse_deployment({"disaggregation": False, "engine": {"num_blocks": 64, "block_size": 32}})
    assert write_repository(dep, tmp_path) == ["llm", "ensemble", "worker"]
    assert sorted(_files(tmp_path)) == ["ensemble/1/.keep", "ensemble/config.pbtxt", "llm/1/.keep",
                                        "llm/config.pbtxt", "worker/1/engine.yaml", "worker/config.pbtxt"]
    assert load_engine_spec(tmp_path / "worker/1/engine.yaml") == EngineSpec(num_blocks=64, block_size=32)
    config = (tmp_path / "worker/config.pbtxt").read_text()
    assert config.startswith('name: "worker"\nbackend: "pd_worker"\nmax_batch_size: 0\n'
                             "model_transaction_policy {\n  decoupled: true\n}\n")
    assert config.endswith('parameters {\n  key: "role"\n  value: { string_value: "both" }\n}\n'
                           'parameters {\n  key: "stream_interval"\n  value: { string_value: "1" }\n}\n')


def _policy(config: str) -> str:
    start = config.index("model_transaction_policy")
    return config[start:config.index("input [")]


def test_decoupled_false_makes_only_the_public_models_non_decoupled(tmp_path: Path) -> None:
    """tensorrtllm_backend's decoupled_mode=false: infer-able public models; workers stay
    decoupled (BLS streams from them); the batched ensemble is dynamically batched."""
    dep = parse_deployment({"disaggregation": False, "serving": {"decoupled": False}})
    assert [(s.name, s.decoupled) for s, _ in model_specs(dep)] == \
        [("llm", False), ("ensemble", False), ("worker", True)]
    write_repository(dep, tmp_path)
    policies = {name: _policy((tmp_path / name / "config.pbtxt").read_text())
                for name in ("llm", "ensemble", "worker")}
    assert policies == {
        "llm": "model_transaction_policy {\n  decoupled: false\n}\n",
        "ensemble": "model_transaction_policy {\n  decoupled: false\n}\ndynamic_batching {\n}\n",
        "worker": "model_transaction_policy {\n  decoupled: true\n}\n"}


def test_committed_model_repository_is_the_default_deployment(tmp_path: Path) -> None:
    write_repository(Deployment(), tmp_path)
    assert _files(tmp_path) == _files(repo_root() / "model_repository")


def test_worker_thread_budget() -> None:
    """engine.threads: 0 shares the host's CPUs between the deployment's workers plus one
    share for tritonserver and the orchestrator; an explicit count wins; bad values are named."""
    from backends.serving.engine_factory import worker_threads

    dep = parse_deployment({"model": "tiny-llama", "prefill": {"count": 2}})
    engines = [e for _, e in model_specs(dep) if e is not None]
    assert [e.host_workers for e in engines] == [3, 3, 3]
    assert [worker_threads(e, cpus=16) for e in engines] == [4, 4, 4]
    assert worker_threads(engines[0], cpus=2) == 1
    explicit = parse_deployment({"model": "tiny-llama", "engine": {"threads": 3}})
    assert {worker_threads(e, cpus=2) for _, e in model_specs(explicit) if e is not None} == {3}
    for bad in (-1, "2", True):
        with pytest.raises(ValueError, match=r"^engine.threads: expected 0 \(automatic\) or a "
                                             rf"positive integer, got {bad!r}$"):
            parse_deployment({"model": "tiny-llama", "engine": {"threads": bad}})
    with pytest.raises(ValueError, match="engine.host_workers: unknown key"):
        parse_deployment({"model": "tiny-llama", "engine": {"host_workers": 4}})


def test_stream_interval_reaches_every_worker_and_no_orchestrator() -> None:
    dep = parse_deployment({"model": "tiny-llama", "serving": {"stream_interval": 4}})
    params = {spec.name: spec.parameters.get("stream_interval") for spec, _ in model_specs(dep)}
    assert params == {"llm": None, "ensemble": None, "prefill": "4", "decode": "4"}
    assert Deployment().stream_interval == 1


HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def test_engine_backend_defaults_to_torch_and_reaches_engine_yaml(tmp_path: Path) -> None:
    dep = parse_deployment({"model": "tiny-llama", "engine": {"backend": "torch"}})
    assert dep == parse_deployment({"model": "tiny-llama"})
    assert dep.engine.backend == "torch"
    write_repository(dep, tmp_path)
    assert "backend: torch\n" in (tmp_path / "prefill/1/engine.yaml").read_text()
    assert load_engine_spec(tmp_path / "prefill/1/engine.yaml").backend == "torch"


@pytest.mark.skipif(HAVE_TRTLLM, reason="tensorrt_llm is installed here")
def test_tensorrt_llm_backend_without_the_package_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        parse_deployment({"engine": {"backend": "tensorrt_llm"}})
    assert str(info.value) == "engine.backend: 'tensorrt_llm' needs the tensorrt_llm package, which is not installed"
    # the worker reading its engine.yaml says the same, naming the file
    path = tmp_path / "engine.yaml"
    path.write_text("backend: tensorrt_llm\n")
    with pytest.raises(ValueError) as info:
        load_engine_spec(path)
    assert str(info.value) == f"{path}: backend: 'tensorrt_llm' needs the tensorrt_llm package, which is not installed"


@pytest.mark.skipif(not HAVE_TRTLLM, reason="tensorrt_llm is not installed (optional 'gpu' extra)")
def test_tensorrt_llm_backend_needs_cuda_devices_and_a_checkpoint(tmp_path: Path) -> None:
    from backends.engine.loader import export_preset

    checkpoint = str(export_preset("tiny-llama", str(tmp_path)))
    cuda = {"devices": ["cuda:0"]}
    dep = parse_deployment({"model": checkpoint, "engine": {"backend": "tensorrt_llm"},
                            "prefill": cuda, "decode": cuda})
    assert {e.backend for _, e in model_specs(dep) if e is not None} == {"tensorrt_llm"}
    with pytest.raises(ValueError, match=r"^decode.devices: engine.backend 'tensorrt_llm' runs on CUDA "
                                         r"devices only, got 'cpu'$"):
        parse_deployment({"model": checkpoint, "engine": {"backend": "tensorrt_llm"}, "prefill": cuda})
    with pytest.raises(ValueError, match=r"^model: engine.backend 'tensorrt_llm' needs an HF checkpoint "
                                         r"directory, got the preset 'tiny-llama'$"):
        parse_deployment({"model": "tiny-llama", "engine": {"backend": "tensorrt_llm"},
                          "prefill": cuda, "decode": cuda})
