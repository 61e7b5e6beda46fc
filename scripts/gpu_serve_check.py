"""Python side of scripts/gpu_serve_check.sh (the shell script drives; this file plans, runs
the engine alone and judges). No tritonclient and no requests: the shell sends every HTTP
request with curl and this file only reads and writes files in the work directory.

Subcommands (all take ``--work DIR``, the check's scratch directory):
- ``plan --config deploy.yaml --max-tokens N``: prompts.json and one body_<i>.json per prompt
  (a greedy ``llm`` generate request), plus probe.json (a context_only request to ``prefill``,
  whose KV handle names the transport).
- ``reference --config deploy.yaml``: the engine alone, built exactly as the workers build theirs
  (the decode worker's EngineSpec of the same deployment: preset, device, dtype, blocks), one
  prompt at a time, greedy; ref.json with token ids and text (the server's tokenizer decodes).
- ``find-triton``: which tritonserver ``triton-pd serve`` will use (JSON on stdout).
- ``ports``: three free loopback ports.
- ``shm-regions --pgid N [--merge FILE]``: the python_backend shm regions of group N's stubs
  (JSON list; --merge adds them to the list in FILE).
- ``shm-cleanup --pgid N``: unlinks group N's leftovers in /dev/shm (stub regions, kvbridge
  pools); call only once no process of group N is left.
- ``gpu-users --pgid N``: group N's processes, the model each stub serves and whether it holds
  /dev/nvidia* (JSON list).
- ``compare --out FILE``: serve.json from the work directory: each request's text equal to the
  engine alone, every output token there, KV bytes moved per request, the handle's transport,
  the workers holding the GPU, failures in the server log; prints a summary; exit 0 only on PASS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Distinct first blocks (block_size 16): no prompt is a cached prefix of another, so each one is
# prefilled on the prefill worker and its KV handed to decode. Lengths in byte-level tokens:
# 2 (< 1 block), 24 (1 block + 8), 32 (2 blocks exactly), 51 (3 blocks + 3), ~300 (many blocks).
PROMPTS = (
    ("short", "Hi"),
    ("one_block_plus", "The capital of France is"),
    ("two_blocks_exact", "Exactly thirty-two tokens: 0123."),
    ("three_blocks_plus", "Disaggregated prefill hands its KV cache to decode."),
    ("long", "A long prompt for the GPU hand-off check, many KV blocks: "
             + " ".join(f"item{i:03d}" for i in range(30))),
)
PROBE_PROMPT = "Probe: which transport carries this prefill's KV handle to a decode worker?"
METRIC_BYTES = "pd_kv_transfer_bytes_total"
LOG_FAILURES = re.compile(r"KV pull of .* failed|KV import of .* failed|recomputing there|"
                          r"prefill .* failed|handed off without a KV handle|request failed|"
                          r"engine step failed|Traceback", re.IGNORECASE)


def _worker_specs(config: Path) -> dict[str, Any]:
    from backends.launch.deploy import load_deployment, model_specs

    dep = load_deployment(config)
    return {spec.name: engine for spec, engine in model_specs(dep) if engine is not None}


def _load_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def cmd_plan(args: argparse.Namespace) -> int:
    from backends.launch.deploy import load_deployment
    from backends.serving.tokenizers import load_tokenizer

    dep = load_deployment(args.config)
    tok = load_tokenizer(dep.model)
    work = Path(args.work)
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    prompts = []
    for i, (name, text) in enumerate(PROMPTS):
        ids = tok.encode(text)
        if len(ids) + args.max_tokens > dep.engine.max_model_len:
            raise SystemExit(f"prompt {name}: {len(ids)} + {args.max_tokens} tokens exceed max_model_len")
        body = {"text_input": text, "sampling_parameters": json.dumps(sampling),
                "exclude_input_in_output": True, "return_num_output_tokens": True}
        (work / f"body_{i}.json").write_text(json.dumps(body))
        prompts.append({"index": i, "name": name, "prompt": text, "num_prompt_tokens": len(ids)})
    (work / "prompts.json").write_text(json.dumps({"max_tokens": args.max_tokens, "prompts": prompts}, indent=1))
    probe = {"input_ids": tok.encode(PROBE_PROMPT), "request_output_len": 16, "ignore_eos": True,
             "parameters": {"request_type": "context_only", "pd_request_id": "gpu-serve-check-probe"}}
    (work / "probe.json").write_text(json.dumps(probe))
    print(f"plan: {len(prompts)} prompts, tokens {[p['num_prompt_tokens'] for p in prompts]}")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    import torch

    from backends.engine.sampling_params import SamplingParams
    from backends.launch.deploy import load_deployment
    from backends.serving.engine_factory import build_engine
    from backends.serving.tokenizers import load_tokenizer

    start = time.monotonic()
    work = Path(args.work)
    plan = json.loads((work / "prompts.json").read_text())
    dep = load_deployment(args.config)
    specs = _worker_specs(args.config)
    decode = [s for n, s in specs.items() if n.startswith(f"{dep.prefix}decode")] or list(specs.values())
    spec = decode[0] if args.device is None else replace(decode[0], device=args.device)
    tok = load_tokenizer(dep.model)
    engine = build_engine(spec)
    params = SamplingParams(max_tokens=plan["max_tokens"], temperature=0.0, ignore_eos=True)
    results = {}
    try:
        for p in plan["prompts"]:
            [res] = engine.generate([tok.encode(p["prompt"])], params)
            ids = [int(t) for t in res.output_token_ids]
            results[p["name"]] = {"token_ids": ids, "text": tok.decode(ids)}
        layout = engine.kv_layout
        kv_bytes_per_token = layout.num_layers * layout.bytes_per_token_per_layer
        kv_block_size = layout.block_size
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    out = {"engine_spec": {f.name: getattr(spec, f.name) for f in fields(spec)},
           "torch": torch.__version__,
           "cuda_device": torch.cuda.get_device_name(0) if spec.device.startswith("cuda") else None,
           "kv_bytes_per_token": kv_bytes_per_token, "kv_block_size": kv_block_size, "seconds": round(time.monotonic() - start, 2),
           "results": results}
    (work / "ref.json").write_text(json.dumps(out, indent=1))
    print(f"reference: {len(results)} prompts on {spec.device} ({spec.dtype}) in {out['seconds']}s")
    return 0


def cmd_find_triton(args: argparse.Namespace) -> int:
    from backends.launch.install import find_triton, python_version_tag

    try:
        install = find_triton()
    except (RuntimeError, ValueError) as exc:
        print(json.dumps({"found": False, "error": str(exc), "python": python_version_tag()}))
        return 1
    print(json.dumps({"found": True, "origin": install.origin, "server_bin": str(install.server_bin),
                      "stub": str(install.stub), "lib_dirs": [str(d) for d in install.lib_dirs],
                      "python": python_version_tag()}))
    return 0


def cmd_ports(args: argparse.Namespace) -> int:
    from backends.launch.launcher import free_ports

    print(" ".join(str(p) for p in free_ports(3)))
    return 0


def cmd_shm_regions(args: argparse.Namespace) -> int:
    from backends.launch.shm_cleanup import stub_regions

    regions = stub_regions(args.pgid)
    if args.merge is not None:  # keep every region ever seen: stubs may have restarted
        regions = sorted(set(regions) | set(_load_json(args.merge, [])))
        args.merge.write_text(json.dumps(regions))
    print(json.dumps(regions))
    return 0


def cmd_shm_cleanup(args: argparse.Namespace) -> int:
    from backends.launch.shm_cleanup import unlink_leftovers

    regions = _load_json(Path(args.work) / "shm_regions.json", [])
    removed = unlink_leftovers(args.pgid, list(regions))
    print(json.dumps({"pgid": args.pgid, "removed": [str(p) for p in removed]}))
    return 0


def metric_value(text: str, name: str, model: str) -> float | None:
    """The value of ``name{model="<model>"}`` in a Prometheus text page, None when absent."""
    found = re.findall(rf'^{name}\{{model="{re.escape(model)}"\}} ([0-9.eE+-]+)$', text, re.MULTILINE)
    return float(found[0]) if found else None


def labelled_value(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of ``name`` with exactly ``labels`` (any order) in a Prometheus page; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") and "}" in line and \
                dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")])) == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _probe(work: Path) -> dict[str, Any]:
    """The context_only probe's KV handle: transport, pool, and the pull path decode would take."""
    code = _read(work / "probe.code").strip()
    body = _load_json(work / "probe_resp.json")
    info: dict[str, Any] = {"http_code": code}
    if not isinstance(body, dict) or "context_phase_params" not in body:
        info["error"] = (_read(work / "probe_resp.json")[:500] or "no response")
        return info
    try:
        from kvbridge.handle import KVHandle

        handle = KVHandle.from_bytes(bytes(int(b) & 0xFF for b in body["context_phase_params"]))
    except (ValueError, TypeError) as exc:
        info["error"] = f"undecodable handle: {exc}"
        return info
    info.update(transport=handle.transport, tier=handle.tier, source_node=handle.source_node,
                source_endpoint=handle.source_endpoint, pool_name=handle.pool_name,
                num_tokens=handle.num_tokens, num_blocks=len(handle.block_slots),
                layout_dtype=handle.layout.dtype, kv_transfer_bytes=body.get("kv_transfer_bytes"),
                pool_in_dev_shm=bool(handle.pool_name) and Path("/dev/shm", handle.pool_name).exists())
    try:
        from kvbridge.pull import pull_transport

        info["decode_pull"] = pull_transport(handle)
    except ImportError as exc:  # the serving layer changed: report the handle alone
        info["decode_pull"] = f"unknown ({exc})"
    return info


def _pgid_of(pid_dir: Path) -> int | None:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    fields_ = stat[stat.rfind(")") + 2:].split()  # "pid (comm) state ppid pgrp ..."
    return int(fields_[2]) if len(fields_) > 2 else None


def cmd_gpu_users(args: argparse.Namespace) -> int:
    """Each process of group ``--pgid`` (the stubs): the model it serves (argv[1] is
    .../models/<model>/1/model.py), whether it holds the NVIDIA device files (/dev/nvidia*,
    which a process has open once it initialized CUDA) and maps libcuda (works inside
    containers, where nvidia-smi often lists no processes or host pids), and which numpy it
    loaded (its _multiarray_umath: under numpy/core/ for 1.x, numpy/_core/ for 2.x; the stubs
    need 1.x)."""
    users = []
    for pid_dir in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        if _pgid_of(pid_dir) != args.pgid:
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            fds = {str(Path(os.readlink(fd))) for fd in (pid_dir / "fd").iterdir()
                   if os.readlink(fd).startswith("/dev/nvidia")}
            maps = (pid_dir / "maps").read_text(errors="replace")
        except OSError:
            continue
        found = re.search(r"/models/([^/]+)/\d+/model\.py$", argv[1].decode(errors="replace")) \
            if len(argv) > 1 else None
        numpy = re.search(r"/\S*/numpy/_?core/_multiarray_umath\S*\.so", maps)
        users.append({"pid": int(pid_dir.name), "exe": os.path.basename(argv[0].decode(errors="replace")),
                      "model": found.group(1) if found else "", "nvidia_fds": sorted(fds),
                      "libcuda_mapped": "libcuda.so" in maps,
                      "numpy_so": numpy.group(0) if numpy else None})
    print(json.dumps(users))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    work = Path(args.work)
    plan = _load_json(work / "prompts.json", {"prompts": [], "max_tokens": 0})
    ref = _load_json(work / "ref.json", {})
    device = args.device
    requests = []
    for p in plan["prompts"]:
        i = p["index"]
        code = _read(work / f"resp_{i}.code").strip()
        body = _load_json(work / f"resp_{i}.json")
        expected = (ref.get("results") or {}).get(p["name"])
        text = body.get("text_output") if isinstance(body, dict) else None
        num_out = body.get("num_output_tokens") if isinstance(body, dict) else None
        if isinstance(num_out, list):
            num_out = num_out[0] if num_out else None
        before = metric_value(_read(work / f"metrics_{i}_before.txt"), METRIC_BYTES, "llm")
        after = metric_value(_read(work / f"metrics_{i}_after.txt"), METRIC_BYTES, "llm")
        moved = None if after is None else int(after - (before or 0.0))
        # the decode node pulls whole blocks (the ones it lacks: every one for a fresh prompt)
        bs = ref.get("kv_block_size") or 0
        want_bytes = (-(-p["num_prompt_tokens"] // bs) * bs * ref["kv_bytes_per_token"]
                      if bs and ref.get("kv_bytes_per_token") else None)
        entry = {
            "name": p["name"], "num_prompt_tokens": p["num_prompt_tokens"], "http_code": code,
            # the server holds back an incomplete UTF-8 tail at the max_tokens cut (no U+FFFD)
            "text_equal": expected is not None and text in (expected["text"], expected["text"].rstrip("\ufffd")),
            "num_output_tokens": num_out,
            "num_output_tokens_ok": expected is not None and num_out == len(expected["token_ids"]) == plan["max_tokens"],
            "kv_bytes_moved": moved, "kv_bytes_expected": want_bytes, "kv_bytes_exact": moved == want_bytes,
            "server_text": text, "engine_text": expected["text"] if expected else None,
            "engine_token_ids": expected["token_ids"] if expected else None,
        }
        if code != "200":
            entry["error"] = _read(work / f"resp_{i}.json")[:500]
        requests.append(entry)
    log = _read(work / "server.log")
    failures = [line for line in log.splitlines() if LOG_FAILURES.search(line)]
    users = _load_json(work / "gpu_users.json", [])
    on_gpu = sorted({u["model"] for u in users if u.get("model") and u.get("nvidia_fds")})
    smi = _read(work / "gpu_apps.csv").strip()
    probe = _probe(work)
    checks = {
        "server_ready": (work / "ready").exists(),
        "reference_ran": bool(ref.get("results")),
        "all_http_200": bool(requests) and all(r["http_code"] == "200" for r in requests),
        "greedy_equals_engine": bool(requests) and all(r["text_equal"] for r in requests),
        "all_tokens": bool(requests) and all(r["num_output_tokens_ok"] for r in requests),
        "kv_moved_every_request": bool(requests) and all((r["kv_bytes_moved"] or 0) > 0 for r in requests),
        "no_kv_failures_in_log": not failures,
    }
    final = _read(work / "metrics_final.txt")
    imports = {path: labelled_value(final, "pd_kv_imports_total", {"model": "decode", "path": path})
               for path in ("device", "host")}
    if device.startswith("cuda"):
        checks["workers_on_gpu"] = {"prefill", "decode"} <= set(on_gpu)
        # every hand-off read device to device (CUDA IPC), none over the host pool
        checks["kv_gpu_to_gpu"] = imports["device"] >= len(requests) > 0 and imports["host"] == 0
    verdict = "PASS" if all(checks.values()) else "FAIL"
    result = {
        "verdict": verdict, "device": device, "checks": checks,
        "kv_bytes_exact_every_request": bool(requests) and all(r["kv_bytes_exact"] for r in requests),
        "kv_transport": probe, "kv_imports": imports, "models_on_gpu": on_gpu, "server_processes": users,
        "nvidia_smi_apps": smi.splitlines() if smi else [],
        "reference": {k: v for k, v in ref.items() if k != "results"},
        "triton": _load_json(work / "triton.json"), "requests": requests,
        "log_failures": failures[-20:],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"verdict: {verdict} on {device}")
    for name, ok in checks.items():
        print(f"  {'ok ' if ok else 'BAD'} {name}")
    for r in requests:
        print(f"  {r['name']:18s} prompt {r['num_prompt_tokens']:3d} tok  http {r['http_code']:>3s}  "
              f"equal {r['text_equal']!s:5s}  out {r['num_output_tokens']}  kv bytes {r['kv_bytes_moved']} "
              f"(expected {r['kv_bytes_expected']})")
        if not r["text_equal"]:
            print(f"    server {r['server_text']!r}\n    engine {r['engine_text']!r}")
    print(f"  kv transport (probe handle): {json.dumps(probe)}; decode imports by path: {imports}")
    for u in users:
        if u.get("model"):
            print(f"  stub {u['model']:9s} pid {u['pid']}: /dev/nvidia* {len(u['nvidia_fds'])} fds, "
                  f"numpy {u.get('numpy_so')}")
    print(f"  models holding /dev/nvidia*: {on_gpu or 'none'}"
          + (f"; nvidia-smi: {'; '.join(smi.splitlines())}" if smi else ""))
    for line in failures[-10:]:
        print(f"  log: {line[:300]}")
    return 0 if verdict == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    plan.add_argument("--config", type=Path, required=True)
    plan.add_argument("--max-tokens", type=int, default=24)
    plan.set_defaults(func=cmd_plan)
    ref = sub.add_parser("reference")
    ref.add_argument("--config", type=Path, required=True)
    ref.add_argument("--device", default=None, help="override the workers' device")
    ref.set_defaults(func=cmd_reference)
    sub.add_parser("find-triton").set_defaults(func=cmd_find_triton)
    sub.add_parser("ports").set_defaults(func=cmd_ports)
    users = sub.add_parser("gpu-users")
    users.add_argument("--pgid", type=int, required=True)
    users.set_defaults(func=cmd_gpu_users)
    regions = sub.add_parser("shm-regions")
    regions.add_argument("--pgid", type=int, required=True)
    regions.add_argument("--merge", type=Path, default=None, help="JSON list file to add the regions to")
    regions.set_defaults(func=cmd_shm_regions)
    cleanup = sub.add_parser("shm-cleanup")
    cleanup.add_argument("--pgid", type=int, required=True)
    cleanup.set_defaults(func=cmd_shm_cleanup)
    compare = sub.add_parser("compare")
    compare.add_argument("--out", type=Path, required=True)
    compare.add_argument("--device", default="cpu")
    compare.set_defaults(func=cmd_compare)
    for p in sub.choices.values():
        p.add_argument("--work", default=".", help="the check's scratch directory")
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
