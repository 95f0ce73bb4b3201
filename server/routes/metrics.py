"""GET /metrics: Prometheus text format: the engine's state read at scrape time, and the request metrics
the app keeps (server/serving_metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.deps import ReadyEngine, memory_report

router = APIRouter(tags=["metrics"])


class _Snapshot:
    """A collector over one /memory report, so every metric comes from the same instant."""

    def __init__(self, report: dict, open_requests: int) -> None:
        self.report = report
        self.open_requests = open_requests

    def collect(self):
        labels = ["model", "dtype"]
        param_bytes = GaugeMetricFamily("dtype_serve_variant_bytes", "Exact bytes of a resident variant's "
                                        "parameters, by parameter dtype", labels=[*labels, "param_dtype"])
        in_flight = GaugeMetricFamily("dtype_serve_variant_in_flight", "Requests decoding on a variant", labels=labels)
        served = CounterMetricFamily("dtype_serve_variant_requests", "Requests a variant served to the end",
                                     labels=labels)
        tokens = CounterMetricFamily("dtype_serve_variant_generated_tokens", "Tokens a variant generated",
                                     labels=labels)
        prompt_cache = GaugeMetricFamily("dtype_serve_prompt_cache_bytes", "KV cache a variant keeps to reuse "
                                         "shared prompt prefixes", labels=labels)
        cached_tokens = CounterMetricFamily("dtype_serve_prompt_cache_hit_tokens", "Prompt tokens served from "
                                            "the prefix cache instead of prefilled", labels=labels)
        kv_bytes = GaugeMetricFamily("dtype_serve_kv_cache_bytes", "Bytes of the live KV caches of a variant's "
                                     "running sequences (lone and batched), from the cache arrays", labels=labels)
        kv_reserved = GaugeMetricFamily("dtype_serve_kv_cache_reserved_bytes", "Bytes the budget keeps for the "
                                        "growth of a variant's running sequences' KV caches (each to prompt + "
                                        "max_tokens tokens), beside their live bytes", labels=labels)
        kv_waiting = GaugeMetricFamily("dtype_serve_kv_waiting_requests", "Requests for a variant waiting for "
                                       "KV room in the memory budget", labels=labels)
        kv_tokens = GaugeMetricFamily("dtype_serve_kv_cache_tokens", "Tokens the live KV caches of a variant's "
                                      "running sequences hold", labels=labels)
        kv_sequences = GaugeMetricFamily("dtype_serve_kv_cache_sequences", "Sequences of a variant holding a "
                                         "KV cache", labels=labels)
        kv_per_token = GaugeMetricFamily("dtype_serve_kv_cache_bytes_per_token", "KV cache bytes one token of "
                                         "one sequence costs at the variant's KV precision", labels=labels)
        for v in self.report["variants"]:
            key = [v["model"], v["dtype"]]
            kv = v["kv_cache"]
            kv_bytes.add_metric(key, kv["live_bytes"])
            kv_reserved.add_metric(key, kv["reserved_bytes"])
            kv_waiting.add_metric(key, v["waiting_for_kv"])
            kv_tokens.add_metric(key, kv["tokens"])
            kv_sequences.add_metric(key, len(kv["sequences"]))
            kv_per_token.add_metric(key, kv["bytes_per_token"])
            for param_dtype, n in v["bytes_by_dtype"].items():
                param_bytes.add_metric([*key, param_dtype], n)
            in_flight.add_metric(key, v["in_flight"])
            served.add_metric(key, v["requests_served"])
            tokens.add_metric(key, v["tokens_generated"])
            prompt_cache.add_metric(key, v["prompt_cache"]["bytes"])
            cached_tokens.add_metric(key, v["prompt_cache"]["cached_tokens"])
        load_seconds = GaugeMetricFamily("dtype_serve_variant_load_seconds", "How long a resident variant's "
                                         "load took (read, cast, quantize; warm-up not included)", labels=labels)
        total_bytes = GaugeMetricFamily("dtype_serve_variant_total_bytes", "Exact bytes of a resident variant's "
                                        "parameters, all dtypes", labels=labels)
        load_peak = GaugeMetricFamily("dtype_serve_variant_load_peak_bytes", "Peak bytes MLX held while the "
                                      "variant loaded", labels=labels)
        for v in self.report["variants"]:
            key = [v["model"], v["dtype"]]
            load_seconds.add_metric(key, v["load_seconds"])
            total_bytes.add_metric(key, v["total_bytes"])
            load_peak.add_metric(key, v["load_peak_bytes"])
        yield from (param_bytes, in_flight, served, tokens, prompt_cache, cached_tokens, kv_bytes, kv_reserved,
                    kv_waiting, kv_tokens, kv_sequences, kv_per_token, load_seconds, total_bytes, load_peak)
        yield from _loading(self.report["budget"].get("loading"))
        worker = self.report.get("worker")
        if worker:
            seconds = CounterMetricFamily("dtype_serve_worker_seconds", "Time of the MLX worker thread by phase: "
                                          "idle, admit, decode (device steps), emit, flush, report",
                                          labels=["phase"])
            for phase, value in worker["seconds"].items():
                seconds.add_metric([phase], value)
            yield seconds
            yield CounterMetricFamily("dtype_serve_decode_steps", "Decode steps run (one per batch)",
                                      value=worker["decode_steps"])
            yield CounterMetricFamily("dtype_serve_unmasked_decode_steps", "Batch decode steps whose attention "
                                      "ran without a mask (no row padded)", value=worker["unmasked_steps"])
            yield CounterMetricFamily("dtype_serve_gather_waits", "Times a request that found the worker idle "
                                      "waited for others arriving with it (--gather-ms)", value=worker["gather_waits"])
            yield CounterMetricFamily("dtype_serve_bursts_gathered", "Waits that brought in at least one more "
                                      "request, prefilled together", value=worker["bursts_gathered"])
            yield CounterMetricFamily("dtype_serve_handoffs", "Lone streams moved into the batch when others "
                                      "arrived during their decode", value=worker["handoffs"])
        process, budget = self.report["process"], self.report["budget"]
        for name, value, text in (
            ("dtype_serve_mlx_active_bytes", process["active_bytes"], "MLX active memory"),
            ("dtype_serve_mlx_peak_bytes", process["peak_bytes"], "MLX peak memory"),
            ("dtype_serve_mlx_cache_bytes", process["cache_bytes"], "MLX buffer cache"),
            ("dtype_serve_budget_bytes", budget["budget_bytes"], "Memory budget for resident variants"),
            ("dtype_serve_budget_used_bytes", budget["used_bytes"], "Bytes variants, prompt caches and live KV "
             "caches hold"),
            ("dtype_serve_budget_kv_reserved_bytes", budget["kv_cache_reserved_bytes"], "Bytes the budget keeps for "
             "the growth of running sequences' KV caches"),
            ("dtype_serve_budget_free_bytes", budget["free_bytes"], "Budget less what is held and reserved"),
            ("dtype_serve_open_requests", self.open_requests, "Requests admitted and not finished"),
        ):
            yield GaugeMetricFamily(name, text, value=value)


def _loading(loading: dict | None):
    """The load in progress, if any: tensors and source bytes done and in all."""
    if not loading:
        return
    key = [loading["model"], loading["dtype"]]
    for field, text in (("tensors_done", "Tensors of the load in progress done"),
                        ("tensors", "Tensors of the load in progress in all"),
                        ("bytes_done", "Bytes of the variant the load in progress has built"),
                        ("bytes", "Bytes of the variant the load in progress builds, in all")):
        family = GaugeMetricFamily(f"dtype_serve_loading_{field}", text, labels=["model", "dtype"])
        family.add_metric(key, loading.get(field, 0))
        yield family


class _Kept:
    """A collector over a long-lived registry, so one scrape reads it and the snapshot together."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request, engine: ReadyEngine) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await memory_report(engine), getattr(engine, "open_requests", 0)))
    registry.register(_Kept(request.app.state.serving_metrics.registry))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
