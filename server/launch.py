"""`dtype-serve launch`: start the ranks of a distributed server with MLX's own launcher (mlx.launch).

    dtype-serve launch -n 2 --backend ring -- --model M --dtype bfloat16
    dtype-serve launch --hostfile hosts.json -- --model M

runs `mlx.launch ... -- -m server M... --distributed tensor` with this Python: rank 0 serves HTTP, the
others follow it (docs/distributed.md). Nothing here imports MLX; mlx.launch does the rest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtype-serve launch", description="Start a tensor-parallel dtype-serve group with mlx.launch; the "
        "arguments after -- go to every rank's dtype-serve.")
    parser.add_argument("-n", "--ranks", type=int, default=None,
                        help="ranks on this machine (mlx.launch -n); or give --hosts/--hostfile")
    parser.add_argument("--backend", default=None, choices=("ring", "nccl", "jaccl", "mpi"),
                        help="MLX distributed backend (default: mlx.launch's choice: nccl on CUDA, else ring)")
    parser.add_argument("--hosts", default=None, help="comma-separated hosts (mlx.launch --hosts)")
    parser.add_argument("--hostfile", default=None, help="mlx.launch hosts file (docs/distributed.md)")
    parser.add_argument("--python", default=sys.executable, help="Python on every host (default: this one)")
    parser.add_argument("--launcher-arg", action="append", default=[],
                        help="one more argument for mlx.launch (repeat), e.g. --launcher-arg=--verbose")
    return parser


def launch_command(argv: list[str]) -> list[str]:
    """The mlx.launch command line for `dtype-serve launch` ARGV."""
    if "--" in argv:
        split = argv.index("--")
        ours, serve_args = argv[:split], argv[split + 1:]
    else:
        ours, serve_args = argv, []
    args = _parser().parse_args(ours)
    command = [_mlx_launch()]
    if args.backend:
        command += ["--backend", args.backend]
    if args.ranks:
        command += ["-n", str(args.ranks)]
    if args.hosts:
        command += ["--hosts", args.hosts]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    command += [*args.launcher_arg, "--python", args.python, "--", "-m", "server", *serve_args,
                "--distributed", "tensor"]
    if args.backend and "--distributed-backend" not in serve_args:
        command += ["--distributed-backend", args.backend]
    return command


def _mlx_launch() -> str:
    """mlx.launch beside this Python (the same environment), else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise SystemExit("dtype-serve launch: mlx.launch not found (it comes with the mlx package)")
    return found


def main(argv: list[str]) -> int:
    """Run mlx.launch in a process group of its own. SIGTERM or SIGINT here goes to its children (the local
    ranks, or the ssh sessions of remote ones): rank 0 drains and stops the others (which ignore SIGTERM and
    leave when rank 0 tells them, or is gone), and mlx.launch, left running, passes on their last output."""
    command = launch_command(argv)
    print("dtype-serve launch:", " ".join(command), file=sys.stderr)
    # stdin a pipe we never write: mlx.launch forwards its stdin to the ranks, and polls it (an EOF: busily)
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in children or [None]:
            try:
                if pid is None:
                    os.killpg(proc.pid, signal.SIGTERM)  # no pgrep answer: the whole group, launcher included
                else:
                    os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()
