"""`dtype-serve` command line: settings -> app -> uvicorn."""

from __future__ import annotations

import logging
import signal
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None, reexec: bool = False) -> int:
    """The server (or a subcommand) on `argv`; with `reexec`, the process first executes itself again with a
    thread-caching allocator preloaded where --allocator finds one (the `dtype-serve` command does)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # `dtype-serve compare ...`: the fidelity report on the command line
        from models.platform.blas import blas_choice
        from models.platform.compat import prepare_mlx

        prepare_mlx(blas_choice(argv[1:]))
        from models.report.cli import main as compare

        return compare(argv[1:])
    if argv[:1] == ["launch"]:  # `dtype-serve launch -n 2 -- ARGS`: mlx.launch running `dtype-serve --distributed`
        from server.launch import main as launch

        return launch(argv[1:])
    if argv[:1] in (["ps"], ["models"]):  # `dtype-serve ps|models`: a running server's variants, as a table
        from server.terminal import main as terminal

        return terminal(argv)
    from server.settings import ConfigFileError, load_settings

    try:
        settings = load_settings(argv)
    except ValidationError as e:
        for err in e.errors():
            message = err["msg"].removeprefix("Value error, ")
            print(f"dtype-serve: {'.'.join(map(str, err['loc']))}: {message}", file=sys.stderr)
        return 2
    except ConfigFileError as e:
        print(f"dtype-serve: {e}", file=sys.stderr)
        return 2
    from models.platform.allocator import allocator_info, reexec_with_allocator

    if reexec:
        reexec_with_allocator(settings.allocator)
    allocator_info(settings.allocator)  # before any child process: they get LD_PRELOAD as it was
    from server.log_format import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    import uvicorn

    from models.errors import EngineError
    from server.app import create_app, follow_if_not_rank_0

    if settings.distributed != "off":
        try:
            code = follow_if_not_rank_0(settings)
        except EngineError as e:
            print(f"dtype-serve: {e}", file=sys.stderr)
            return 2
        if code is not None:
            return code
    from server.http_protocol import ConnectionLimits, LimitedH11Protocol

    try:
        app = create_app(settings)
    except EngineError as e:
        print(f"dtype-serve: {e}", file=sys.stderr)
        return 2
    from sse_starlette.sse import AppStatus

    # On SIGTERM let streams finish (bounded by the drain timeout) instead of cutting them at once.
    AppStatus.disable_automatic_graceful_drain()
    # uvicorn re-raises SIGTERM after its graceful shutdown; a drained shutdown is a clean exit (0).
    signal.signal(signal.SIGTERM, lambda *_: None)
    limits = ConnectionLimits(max_head_bytes=settings.max_header_bytes, max_headers=settings.max_headers,
                              head_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=settings.drain_timeout_s, http=LimitedH11Protocol.factory(limits),
                timeout_keep_alive=settings.keep_alive_s,
                # JSON lines: uvicorn's loggers go through the root's JSON handler instead of its own
                **({"log_config": None} if settings.log_format == "json" else {}))
    return 0


def _exit_now(code: int) -> None:
    """Leave without interpreter teardown: the server has drained and stopped its engine, and native
    libraries' static destructors at exit (MLX's threads) can abort a clean shutdown."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """The `dtype-serve` command."""
    _exit_now(main(reexec=True))


if __name__ == "__main__":
    run()
