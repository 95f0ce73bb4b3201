"""The JSON the service emits keeps its shape: every key recorded in tests/snapshots/ must still be there
with the same type (`/memory`, `/health`, a finished `/v1/dtypes/report`; `/metrics` by sample names and
label sets). New keys are allowed. Values that depend on the machine are not recorded, only their types.
Re-record after an intended change with `DTYPE_SERVE_RECORD_SNAPSHOTS=1 python -m pytest tests/test_json_snapshots.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_registry import app_client, close

SNAPSHOTS = Path(__file__).parent / "snapshots"
RECORD = os.environ.get("DTYPE_SERVE_RECORD_SNAPSHOTS") == "1"


def shape(value):
    """The JSON value's structure: dicts by key, a list by the union of its items' shapes, scalars by
    type ("number" for int and float alike: 0 and 0.5 are the same field)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        merged: dict | str | None = None
        for item in value:
            merged = _union(merged, shape(item))
        return [merged] if merged is not None else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _union(a, b):
    if a is None:
        return b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _union(a.get(k), b.get(k)) for k in sorted({*a, *b})}
    if isinstance(a, list) and isinstance(b, list):
        return [_union(a[0] if a else None, b[0] if b else None)] if a or b else []
    return a if a == b or b == "null" else b if a == "null" else f"{a}|{b}"


def differences(recorded, current, path: str = "$") -> list[str]:
    """Where `current` lost a recorded key or changed its type ("null" in the record accepts any value)."""
    if recorded == "null":
        return []
    if isinstance(recorded, dict):
        if not isinstance(current, dict):
            return [f"{path}: was an object, now {current!r}"]
        return [d for key, sub in recorded.items()
                for d in ([f"{path}.{key}: missing"] if key not in current else differences(sub, current[key],
                                                                                           f"{path}.{key}"))]
    if isinstance(recorded, list):
        if not isinstance(current, list):
            return [f"{path}: was a list, now {current!r}"]
        if recorded and recorded[0] is not None and current and current[0] is not None:
            return differences(recorded[0], current[0], f"{path}[]")
        return []
    accepted = set(recorded.split("|"))
    if current not in accepted and not (current == "null" and "null" in accepted):
        return [f"{path}: was {recorded}, now {current}"]
    return []


def label_differences(recorded: dict[str, list[str]], current: dict[str, list[str]]) -> list[str]:
    """Recorded metric samples that are gone or whose label set changed."""
    return [f"{name}: labels were {labels}, now {current.get(name, 'missing')}"
            for name, labels in recorded.items() if current.get(name) != labels]


def check(name: str, value, compare=differences) -> None:
    path = SNAPSHOTS / f"{name}.json"
    if RECORD:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(path.read_text())
    assert compare(recorded, value) == [], f"{name} changed shape (see {path})"


def metric_labels(text: str) -> dict[str, list[str]]:
    """Each sample name of a Prometheus text and the names of its labels."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: sorted(names) for name, names in sorted(labels.items())}


@pytest.fixture(scope="module")
async def served():
    """A fresh app (only its default variant resident) that has served one request and one report."""
    app, ctx, client = await app_client()
    try:
        r = await client.post("/generate", json={"prompt": "17+25=", "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = {"dtypes": ["bfloat16", "float16"], "prompts": ["17+25=", "The cat"]}  # its shape, not its numbers
        for _ in range(1200):
            report = await client.post("/v1/dtypes/report", json=body)
            if report.status_code != 202:
                break
            await asyncio.sleep(0.05)
        assert report.status_code == 200, report.text
        yield client, report.json()
    finally:
        await close(ctx, client)


async def test_memory_keeps_its_keys_and_types(served):
    client, _ = served
    check("memory", shape((await client.get("/memory")).json()))


async def test_health_keeps_its_keys_and_types(served):
    client, _ = served
    check("health", shape((await client.get("/health")).json()))


async def test_metrics_keep_their_names_and_labels(served):
    client, _ = served
    check("metrics", metric_labels((await client.get("/metrics")).text), label_differences)


async def test_a_finished_report_keeps_its_keys_and_types(served):
    _, report = served
    assert report["state"] == "done"
    check("report", shape(report))


def test_a_lost_key_or_a_changed_type_is_a_difference():
    recorded = shape({"a": 1, "b": {"c": "x"}, "d": [{"e": True}], "f": None})
    assert differences(recorded, shape({"a": 2.5, "b": {"c": "y", "new": 1}, "d": [{"e": False}], "f": 3})) == []
    assert differences(recorded, shape({"a": "1", "b": {}, "d": [{"e": 1}], "f": None})) == [
        "$.a: was number, now str", "$.b.c: missing", "$.d[].e: was bool, now number"]


def test_metric_label_sets_must_match_exactly():
    recorded = {"dtype_serve_variant_bytes": ["dtype", "model", "param_dtype"]}
    assert label_differences(recorded, {**recorded, "dtype_serve_new": []}) == []
    assert label_differences(recorded, {"dtype_serve_variant_bytes": ["dtype", "model"]}) != []
    assert label_differences(recorded, {"dtype_serve_variant_bytes": [*recorded["dtype_serve_variant_bytes"], "x"]})
    assert label_differences(recorded, {}) != []
