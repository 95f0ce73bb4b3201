"""`dtype-serve compare`: the dtype report of a model on the command line (JSON, and a chart).

    python -m models.report.cli [--model PATH] [--dtypes float32 bfloat16 q8 q4 ...] [--prompts FILE]
                                [--out report.json] [--chart chart.png]

Without --dtypes it measures the report's default set: the float dtypes and the quantizations this device
runs (models.report.fidelity.default_report_dtypes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from models.platform.blas import blas_choice, configure_blas

if __name__ == "__main__":  # `python -m models.report.cli`: the BLAS must be chosen before mlx is imported
    configure_blas(blas_choice(sys.argv[1:]))

from models.errors import EngineError  # noqa: E402
from models.report.fidelity import (  # noqa: E402
    DEFAULT_KV_CONTEXTS,
    DEFAULT_TASK_PROMPTS,
    FidelityJob,
    Task,
    bundled_task,
    default_report_dtypes,
    is_bundled,
    run_report,
)
from models.report.probes import load_prompt_file, probe_set  # noqa: E402
from models.weights.catalog import default_model_ref  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtype-serve compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model_ref(), help="model folder (mlx-lm layout)")
    p.add_argument("--dtypes", nargs="+", help="precisions to measure (float32 always is); default: the float "
                   "dtypes and the quantizations this device runs; +kv8 / +kv4 adds a KV cache precision "
                   "(float32+kv8, q4+kv4)")
    p.add_argument("--prompts", help="extra probe prompts: one per line, or JSONL with {\"prompt\": ...}")
    p.add_argument("--no-bundled-prompts", action="store_true", help="probe with --prompts only")
    p.add_argument("--task-prompts", type=int, default=DEFAULT_TASK_PROMPTS,
                   help="held-out prompts for the bundled model's task accuracy (0: none)")
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--kv-contexts", type=int, nargs="+", default=list(DEFAULT_KV_CONTEXTS),
                   help="context lengths a quantized KV cache is scored at against the float one (one beyond "
                   "the model's context: at its longest)")
    p.add_argument("--kv-positions", type=int, default=32, help="positions scored after each KV context")
    p.add_argument("--out", help="write the JSON report here (default: stdout)")
    p.add_argument("--chart", help="write a chart here (.png or .svg)")
    p.add_argument("--blas", default="auto", help="auto | none | PATH (see dtype-serve --help)")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; 0 on success, 2 (with one line on stderr) for bad input."""
    args = parser().parse_args(argv)
    configure_blas(args.blas)  # a no-op when already chosen at import

    try:
        user = load_prompt_file(args.prompts) if args.prompts else None
        prompts = probe_set(user, include_bundled=not args.no_bundled_prompts)
        folder = Path(args.model)
        task: Task | str | None = "auto"
        if is_bundled(folder):
            task = bundled_task(args.task_prompts) if args.task_prompts > 0 else None
        dtypes = args.dtypes or default_report_dtypes(folder)

        shown = [""]

        def show(job: FidelityJob) -> None:
            if job.stage != shown[0]:  # a line per unit, not per model call
                shown[0] = job.stage
                print(f"\r{job.progress:6.1%} {job.stage:<40}", end="", file=sys.stderr, flush=True)

        result = run_report(folder, dtypes, prompts, task, greedy_tokens=args.greedy_tokens,
                            kv_contexts=args.kv_contexts, kv_positions=args.kv_positions,
                            trust_remote_code=args.trust_remote_code, on_progress=show)
    except (ValueError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.chart:
        from models.report.chart import render_chart

        render_chart(result, args.chart)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
