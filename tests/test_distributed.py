"""Two ranks on 127.0.0.1 (MLX's ring backend) serve as one process does: the same greedy tokens, alone and
batched, for the bundled model and a generated llama at two dtypes; each rank holds its shard only; what
cannot be replayed on every rank is refused; a rank that dies turns rank 0's /health to 503."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from models.testing.synthetic import llama_config, make_llama_checkpoint
from models.weights.estimate import estimate_variant
from tests.conftest import BUNDLED, ROOT, free_port, free_ports_from

LLAMA = "tiny-llama"
DTYPES = ("float32", "bfloat16")
PROMPTS = ("17+25=", "3+4=", "The cat", "12+30=")
STEP_TIMEOUT_S = 15
COMMON = ("--no-warmup", "--log-level", "warning", "--max-batch-size", "8")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed-models")
    make_llama_checkpoint(folder / LLAMA, llama_config(64, 2, 100, intermediate=128, heads=2), dtype="float32")
    return folder


def _wait_ready(base: str, procs: list[subprocess.Popen], timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    output = "".join(p.communicate(timeout=5)[0][-3000:] for p in procs if p.poll() is not None)
    raise RuntimeError(f"the group did not become ready: {output}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `dtype-serve launch` passes it to its ranks
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # each rank leads its own process group
                proc.wait()


def _start_ranks(hostfile, port: int, *args: str) -> list[subprocess.Popen]:
    """Two ranks as mlx.launch starts them on this machine (MLX_RANK, MLX_HOSTFILE), without the launcher
    (which would stop rank 0 when rank 1 dies: the last test kills rank 1)."""
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    return [subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port), "--distributed", "tensor", "--distributed-backend",
         "ring", *args], cwd=ROOT, text=True, start_new_session=True,
        env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    """(the 2-rank group's URL, its processes, one process's URL), started side by side."""
    # a step's bound above a step that builds kernels on a cold cache, below the default of 10 waits
    args = ("--model-dirs", str(model_dirs), "--distributed-timeout-s", "3", "--distributed-step-timeout-s",
            str(STEP_TIMEOUT_S), *COMMON)
    group_port, single_port = free_port(), free_port()
    ranks = _start_ranks(tmp_path_factory.mktemp("ring") / "hosts.json", group_port, *args)
    single_proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(single_port), *args], cwd=ROOT,
                                   text=True, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    group, single = f"http://127.0.0.1:{group_port}", f"http://127.0.0.1:{single_port}"
    try:
        _wait_ready(group, ranks)
        _wait_ready(single, [single_proc])
        yield group, ranks, single
    finally:
        _stop([*ranks, single_proc])


@pytest.fixture(scope="module")
def group(servers):
    return servers[0]


@pytest.fixture(scope="module")
def single(servers):
    return servers[2]


def _generate(base: str, model: str, dtype: str, prompt: str, **extra) -> httpx.Response:
    body = {"prompt": prompt, "model": model, "dtype": dtype, "max_tokens": 10, "ignore_eos": True, **extra}
    return httpx.post(f"{base}/generate", json=body, timeout=120)


def _texts(base: str, model: str, dtype: str, together: bool) -> list[str]:
    """Each prompt's completion, one request after another or all at once (one batch)."""
    def one(prompt: str) -> str:
        response = _generate(base, model, dtype, prompt)
        assert response.status_code == 200, response.text
        return response.json()["text"]

    if not together:
        return [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["tiny-arith", LLAMA])
def test_two_ranks_decode_the_tokens_one_process_does(group, single, model, dtype):
    expected = _texts(single, model, dtype, together=False)
    assert _texts(group, model, dtype, together=False) == expected
    assert _texts(group, model, dtype, together=True) == expected


def test_each_rank_holds_its_shard_and_memory_reports_every_rank(group, single, model_dirs):
    for base in (single, group):
        assert _generate(base, LLAMA, "bfloat16", "1+1=").status_code == 200
    # a quantized variant: each rank quantizes its own shard while loading, and answers as one process does
    answers = [_generate(base, "tiny-arith", "q4", "17+25=", max_tokens=3, ignore_eos=False) for base in (single,
                                                                                                     group)]
    assert answers[0].json()["text"] == answers[1].json()["text"] == "42"
    whole = {(v["model"], v["dtype"]): v["total_bytes"] for v in httpx.get(f"{single}/memory").json()["variants"]}
    report = httpx.get(f"{group}/memory").json()["distributed"]
    assert report["size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    shares = [{(v["model"], v["dtype"]): v["weights_bytes"] for v in r["variants"]} for r in report["ranks"]]
    assert {(LLAMA, "bfloat16"), ("tiny-arith", "q4")} <= set(shares[0])
    folders = {"tiny-arith": BUNDLED, LLAMA: model_dirs / LLAMA}
    for key in set(shares[0]) & set(whole):
        per_rank = [shares[0][key], shares[1][key]]
        # the split projections (rank_share) are halved, the rest (embeddings, norms, head) whole on each rank
        assert per_rank == [estimate_variant(folders[key[0]], key[1], ranks=2)["per_rank_bytes"]] * 2, key
        assert 0.45 * whole[key] < per_rank[0] < 0.6 * whole[key], key
    assert report["weights_bytes_sum"] == sum(r["weights_bytes"] for r in report["ranks"])
    estimate = httpx.get(f"{group}/memory/estimate", params={"model": LLAMA, "dtype": "bfloat16"}).json()
    assert estimate["estimates"][0]["ranks"] == 2


def test_what_cannot_be_replayed_is_refused_with_a_clear_error(group):
    r = httpx.post(f"{group}/v1/completions", json={"prompt": "1+1=", "max_tokens": 2, "echo": True,
                                                    "logprobs": 1}, timeout=60)
    assert r.status_code == 400 and "distributed" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{group}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "distributed" in r.json()["error"]["message"], r.text
    r = httpx.get(f"{group}/v1/dtypes/report", timeout=60)
    assert r.status_code == 400 and "distributed" in r.json()["error"]["message"], r.text
    # a sampled request gets one seed for every rank: it completes, as a greedy one does after it
    r = _generate(group, "tiny-arith", "float32", "17+25=", temperature=0.8)
    assert r.status_code == 200, r.text
    assert _generate(group, "tiny-arith", "float32", "17+25=", max_tokens=2, ignore_eos=False).json()["text"] == "42"


def test_a_client_that_leaves_is_removed_on_every_rank(group):
    """A stream cut short mid-batch is removed on rank 0 and replayed as a removal on rank 1: the ranks stay
    in step, and the requests decoding beside it and after it get their answers."""
    body = {"prompt": "1+1=", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with ThreadPoolExecutor(2) as pool:
        beside = pool.submit(_generate, group, "tiny-arith", "float32", "17+25=", max_tokens=30)
        with httpx.stream("POST", f"{group}/generate", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        assert beside.result().status_code == 200
    after = _generate(group, "tiny-arith", "float32", "17+25=", max_tokens=3, ignore_eos=False)
    assert after.json()["text"] == "42"


def test_launch_builds_the_mlx_launch_command():
    from server.launch import launch_command

    command = launch_command(["-n", "2", "--backend", "nccl", "--", "--model", "M", "--dtype", "bf16"])
    assert command[0].endswith("mlx.launch")
    assert command[1:] == ["--backend", "nccl", "-n", "2", "--python", sys.executable, "--", "-m", "server",
                           "--model", "M", "--dtype", "bf16", "--distributed", "tensor", "--distributed-backend",
                           "nccl"]


def test_dtype_serve_launch_serves_and_stops_cleanly_on_sigterm():
    """Through mlx.launch itself: the group answers, and SIGTERM drains rank 0, which stops the other rank;
    every process exits 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "launch", "-n", "2", "--backend", "ring",
         f"--launcher-arg=--starting-port={free_ports_from(4)}", "--", "--port", str(port), *COMMON],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, [proc])
        answer = httpx.post(f"{base}/generate", json={"prompt": "17+25=", "max_tokens": 3}, timeout=60).json()
        assert answer["text"] == "42"
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output[-2000:]
        assert "exited with code" not in output  # mlx.launch warns of a rank that did not exit 0
    finally:
        _stop([proc])


def test_a_rank_that_dies_turns_rank_0_unhealthy_and_fails_its_requests(servers):
    """Last: it ends the group."""
    base, procs, _ = servers
    assert httpx.get(f"{base}/health").status_code == 200
    outcome: dict = {"events": []}
    decoding = threading.Event()

    def long_request() -> None:
        body = {"prompt": "1+1=", "max_tokens": 200, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{base}/generate", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith(("event: ", "data: ")):
                        outcome["events"].append(line)
                        decoding.set()
        except httpx.HTTPError as e:  # a stream cut short is a clean failure too
            outcome["error"] = e
        decoding.set()

    request = threading.Thread(target=long_request)
    request.start()
    assert decoding.wait(30)  # killed while it decodes (200 tokens of this model take well under a second)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # within the watchdog's bound (docs/distributed.md): a command's wait of 3 s, or, when the kill lands inside
    # a decoder step whose collectives never complete, the step's bound
    bound = STEP_TIMEOUT_S + 5
    while httpx.get(f"{base}/health", timeout=5).status_code != 503:
        assert time.monotonic() - killed_at < bound, "rank 0 still reports healthy"
        time.sleep(0.2)
    health = httpx.get(f"{base}/health", timeout=5).json()
    assert health["status"] == "failed" and "distributed group lost" in health["error"]
    request.join(timeout=15)
    assert not request.is_alive(), "the in-flight request hangs"
    # the stream ends with an error event, or is cut: it never finishes its 200 tokens as if all were well
    events = outcome["events"]
    assert "error" in outcome or "event: error" in events, events[-3:]
    assert not any('"finish_reason"' in line for line in events)
    assert httpx.post(f"{base}/generate", json={"prompt": "1+1=", "max_tokens": 2}, timeout=10).status_code == 503


class _TwoRanks:
    """A stand-in for an mx.distributed.Group of 2 (the budget arithmetic reads only its size)."""

    def size(self) -> int:
        return 2


def test_the_budget_is_per_rank():
    """A variant whose shard fits a rank's budget is admitted though the whole model would not fit it."""
    from models.errors import MemoryBudgetError
    from models.weights.catalog import ModelCatalog
    from models.weights.registry import VariantRegistry

    whole = estimate_variant(BUNDLED, "bfloat16")["total_bytes"]
    share = estimate_variant(BUNDLED, "bfloat16", ranks=2)["per_rank_bytes"]
    catalog = ModelCatalog({"tiny-arith": BUNDLED}, ())
    registry = VariantRegistry(catalog, "bfloat16", (share + whole) // 2, kv_sequences=0, fit_order=("bfloat16",))
    with pytest.raises(MemoryBudgetError):
        registry.fit("tiny-arith")
    registry = VariantRegistry(catalog, "bfloat16", (share + whole) // 2, kv_sequences=0, fit_order=("bfloat16",))
    registry.shard_group = _TwoRanks()
    assert registry.fit("tiny-arith")["chosen"] == "bfloat16"


def _watched(timeout_s: float, step_timeout_s: float | None) -> tuple:
    """A channel of a group of one, its watchdog polling every 20 ms, and the reasons it reports."""
    import mlx.core as mx

    from models.distributed.channel import Channel
    from models.distributed.watchdog import Watchdog

    channel, reasons, lost = Channel(mx.distributed.init()), [], threading.Event()
    Watchdog(channel, timeout_s, lambda reason: (reasons.append(reason), lost.set()), poll_s=0.02,
             step_timeout_s=step_timeout_s).start()
    return channel, reasons, lost


def test_a_decoder_step_longer_than_its_own_bound_loses_the_group():
    channel, reasons, lost = _watched(60, 0.2)
    with channel.stepping():
        assert lost.wait(10)
    assert "decoder step" in reasons[0] and "0.2s" in reasons[0] and channel.lost == reasons[0]


def test_without_a_bound_of_its_own_a_step_may_take_ten_waits():
    from models.distributed.watchdog import STEP_TIMEOUTS

    channel, reasons, lost = _watched(0.05, None)
    with channel.stepping():
        time.sleep(0.05 * STEP_TIMEOUTS / 2)  # longer than a wait's bound, shorter than a step's
    assert not lost.is_set()
    with channel.stepping():
        assert lost.wait(10)
    assert "decoder step" in reasons[0] and f"{0.05 * STEP_TIMEOUTS:g}s" in reasons[0]
