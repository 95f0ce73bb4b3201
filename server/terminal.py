"""`dtype-serve ps` and `dtype-serve models`: the resident variants and the servable models of a running
server, read through its public HTTP API (standard library only, like any other client)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

DEFAULT_URL = "http://127.0.0.1:8000"


class ServerError(Exception):
    """The server could not be reached, or answered with an error (its message, as the API gave it)."""


def fetch_json(base: str, path: str, key: str | None, timeout: float = 30) -> dict:
    """GET `path` on the server at `base` and parse the JSON body; raises ServerError with a readable message."""
    request = urllib.request.Request(base.rstrip("/") + path, headers={"Accept": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise ServerError(f"{base}{path}: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServerError(f"cannot reach {base}: {getattr(e, 'reason', e)}") from None


def human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def ago(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, now - timestamp)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    lines = [header, *rows]
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines)


def budget_line(budget: dict) -> str:
    return (f"budget: {human_bytes(budget['used_bytes'])} used of {human_bytes(budget['budget_bytes'])}, "
            f"{human_bytes(budget['free_bytes'])} free")


def loading_line(loading: dict) -> str:
    """The load in progress, as /memory's budget reports it: tensors and bytes done."""
    share = f"{100 * loading['bytes_done'] / loading['bytes']:.0f}%" if loading.get("bytes") else "starting"
    return (f"loading {loading['model']}/{loading['dtype']}: {share} ({loading['tensors_done']} of "
            f"{loading['tensors']} tensors, {human_bytes(loading.get('bytes_done', 0))} of "
            f"{human_bytes(loading.get('bytes', 0))})")


def ps_view(memory: dict, now: float) -> str:
    """The resident variants: bytes by parameter dtype, prompt cache, requests, last use; then the budget."""
    pinned = {(p["model"], p["dtype"]) for p in memory["budget"].get("pinned", ())}
    rows = [(v["model"], v["dtype"], human_bytes(v["total_bytes"]),
             ", ".join(f"{d} {human_bytes(n)}" for d, n in v["bytes_by_dtype"].items()),
             human_bytes(v["prompt_cache"]["bytes"]), str(v["in_flight"]), str(v["requests_served"]),
             ago(v.get("last_used"), now) + (" (pinned)" if (v["model"], v["dtype"]) in pinned else ""))
            for v in memory["variants"]]
    header = ("MODEL", "DTYPE", "SIZE", "WEIGHTS", "PROMPT CACHE", "RUNNING", "SERVED", "LAST USED")
    loading = memory["budget"].get("loading")
    return f"{table(header, rows)}\n{budget_line(memory['budget'])}" + (f"\n{loading_line(loading)}" if loading else "")


def models_view(models: dict, estimates: dict[str, list[dict]]) -> str:
    """Each servable model with the bytes each dtype would take (from the headers) and which are resident."""
    resident = {(r["model"], r["dtype"]) for r in models["resident"]}
    default = (models["default"]["model"], models["default"]["dtype"])
    rows = []
    for name in models["models"]:
        for i, e in enumerate(estimates[name]):
            mark = "yes" if (name, e["dtype"]) in resident else ""
            rows.append((name if i == 0 else "", e["dtype"], human_bytes(e["total_bytes"]),
                         f"{e['parameter_count']:,}" if i == 0 else "", mark))
    header = ("MODEL", "DTYPE", "ESTIMATE", "PARAMETERS", "RESIDENT")
    return (f"{table(header, rows)}\ndefault: {default[0]} at {default[1]}; dtypes a request may name: "
            f"{', '.join(models['dtypes'])}\n{budget_line(models['budget'])}")


def main(argv: list[str]) -> int:
    """`dtype-serve ps|models [--url URL] [--api-key KEY] [--json]`; exit 1 with the server's message on error."""
    parser = argparse.ArgumentParser(prog=f"dtype-serve {argv[0]}", description=__doc__)
    parser.add_argument("--url", default=os.environ.get("DTYPE_SERVE_URL", DEFAULT_URL),
                        help=f"the server (env DTYPE_SERVE_URL; default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=(os.environ.get("DTYPE_SERVE_API_KEY") or "").split(",")[0].strip(),
                        help="key for a server started with --api-key (env DTYPE_SERVE_API_KEY, its first key)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    args = parser.parse_args(argv[1:])
    key = args.api_key or None
    try:
        if argv[0] == "ps":
            memory = fetch_json(args.url, "/memory", key)
            print(json.dumps(memory, indent=2) if args.json else ps_view(memory, time.time()))
        else:
            models = fetch_json(args.url, "/models", key)
            query = "/memory/estimate?include_quantized=true&model="
            estimates = {name: fetch_json(args.url, query + urllib.parse.quote(name), key)["estimates"]
                         for name in models["models"]}
            print(json.dumps({"models": models, "estimates": estimates}, indent=2) if args.json
                  else models_view(models, estimates))
    except ServerError as e:
        print(f"dtype-serve: {e}", file=sys.stderr)
        return 1
    return 0
