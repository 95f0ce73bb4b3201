"""The C allocator under MLX on Linux: a thread-caching malloc (tcmalloc, jemalloc) where one is installed.

MLX's CPU stream thread frees what the main thread allocated (every graph node's buffers and records), the
pattern glibc's malloc serves worst: each free of another thread's block takes that thread's arena lock, and
the main thread's own mallocs then miss its per-thread cache. A thread-caching allocator makes a decode step's
graph nodes cheaper (BENCHMARKS.md, "The C allocator"); vLLM's and IPEX's CPU guides preload one for the same
reason. An allocator can only be chosen before the process starts, so the server executes itself again with
the library in LD_PRELOAD (same process id, arguments and environment otherwise).
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from dataclasses import dataclass

# set in the re-executed process: the library asked for, and LD_PRELOAD as it was before (for child processes)
PRELOADED = "_DTYPE_SERVE_PRELOADED_ALLOCATOR"
PREVIOUS_PRELOAD = "_DTYPE_SERVE_PREVIOUS_LD_PRELOAD"
# Debian/Ubuntu packages libtcmalloc-minimal4, libjemalloc2; Fedora's gperftools-libs, jemalloc
CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
_FOLDERS = ("/usr/lib/{arch}-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


@dataclass(frozen=True)
class AllocatorInfo:
    """The allocator in force: `library` the preloaded file's path, or "glibc"."""

    library: str
    choice: str
    note: str = ""

    def as_dict(self, paths: bool = False) -> dict:
        """JSON-ready; file names only unless `paths` (a path tells clients about the host)."""
        shown = (lambda p: p) if paths else (lambda p: os.path.basename(p) if os.path.isabs(p) else p)
        return {"library": shown(self.library), "choice": shown(self.choice), "note": self.note}


def installed_allocators() -> list[str]:
    """The CANDIDATES installed in the usual library folders, as paths, the preferred first."""
    arch = platform.machine()
    found = {}
    for name in CANDIDATES:
        for folder in _FOLDERS:
            path = os.path.join(folder.format(arch=arch), name)
            if os.path.isfile(path):
                found.setdefault(name, path)
    return list(found.values())


def find_allocator() -> str | None:
    """The preferred installed allocator: a path, or a file name the loader finds elsewhere."""
    installed = installed_allocators()
    if installed:
        return installed[0]
    for name in ("tcmalloc_minimal", "tcmalloc", "jemalloc"):
        found = ctypes.util.find_library(name)  # a bare file name: LD_PRELOAD searches like the loader
        if found:
            return found
    return None


def _preloaded_by_environment(env: dict[str, str]) -> list[str]:
    return env.get("LD_PRELOAD", "").replace(":", " ").split()


def _is_allocator(library: str) -> bool:
    return any(os.path.basename(library).startswith(name) for name in CANDIDATES)


def preload_env(choice: str, env: dict[str, str]) -> dict[str, str] | None:
    """The environment to execute this process again with, or None where nothing is to preload (not Linux,
    `system`, no allocator installed, or already done: by this module, or by the environment's LD_PRELOAD)."""
    if not sys.platform.startswith("linux") or choice == "system" or PRELOADED in env:
        return None
    library = find_allocator() if choice == "auto" else choice
    preloaded = _preloaded_by_environment(env)
    if library is None or (choice == "auto" and any(map(_is_allocator, preloaded))) \
            or os.path.basename(library) in map(os.path.basename, preloaded):
        return None
    previous = env.get("LD_PRELOAD", "")
    # tcmalloc writes a warning for every allocation of 1 GiB or more by default (a large model's tensors)
    return {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50), **env, PRELOADED: library,
            PREVIOUS_PRELOAD: previous, "LD_PRELOAD": f"{library} {previous}".strip()}


def reexec_with_allocator(choice: str) -> None:
    """Execute this process again with the allocator preloaded where `preload_env` says so; else return."""
    env = preload_env(choice, dict(os.environ))
    if env is not None and sys.executable:  # an embedded interpreter has no executable to run again
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _mapped(library: str) -> bool:
    # the maps name the file a link leads to (libtcmalloc_minimal.so.4 -> libtcmalloc_minimal.so.4.5.10)
    wanted = os.path.basename(os.path.realpath(library) if os.sep in library else library)
    try:
        with open("/proc/self/maps") as maps:
            return any(os.path.basename(line.rstrip()).startswith(wanted) for line in maps)
    except OSError:
        return False


_state: AllocatorInfo | None = None


def allocator_info(choice: str = "auto") -> AllocatorInfo:
    """What this process runs on: the library this module or the environment's LD_PRELOAD preloaded, if the
    loader really did; else glibc's. A re-executed process gives its children (compilers, peers) LD_PRELOAD as
    it was before. The first call's answer is kept."""
    global _state
    if _state is None:
        _state = _current(choice)
    return _state


def _current(choice: str) -> AllocatorInfo:
    on_linux = sys.platform.startswith("linux")
    library = os.environ.pop(PRELOADED, None)
    if library is not None:
        previous = os.environ.pop(PREVIOUS_PRELOAD, "")
        if previous:
            os.environ["LD_PRELOAD"] = previous
        else:
            os.environ.pop("LD_PRELOAD", None)
        if _mapped(library):
            return AllocatorInfo(library, choice)
        return AllocatorInfo("glibc", choice, f"the loader could not preload {os.path.basename(library)}")
    wanted = (lambda lib: os.path.basename(lib) == os.path.basename(choice)) if choice not in ("auto", "system") \
        else _is_allocator
    inherited = [lib for lib in _preloaded_by_environment(dict(os.environ)) if wanted(lib) and _mapped(lib)]
    if inherited and on_linux:
        return AllocatorInfo(inherited[0], choice, "preloaded by the environment's LD_PRELOAD")
    note = "" if choice == "system" or not on_linux else \
        "no thread-caching allocator installed (libtcmalloc-minimal4 or libjemalloc2)"
    return AllocatorInfo("glibc" if on_linux else "system", choice, note)


def main(argv: list[str] | None = None) -> int:
    """`python -m models.platform.allocator COMMAND...`: run COMMAND with the allocator the server would
    preload (DTYPE_SERVE_ALLOCATOR, default auto) in LD_PRELOAD: `make test` runs the tests on it."""
    command = sys.argv[1:] if argv is None else argv
    if not command:
        print("usage: python -m models.platform.allocator COMMAND...", file=sys.stderr)
        return 2
    choice = os.environ.get("DTYPE_SERVE_ALLOCATOR", "auto")
    if choice not in ("auto", "system") and not os.path.isfile(choice):
        choice = "system"  # the server refuses it with a clear message; here it only preloads nothing
    env = preload_env(choice, dict(os.environ))
    if env is not None:  # only LD_PRELOAD: servers the command starts still choose their own
        env = {k: v for k, v in env.items() if k not in (PRELOADED, PREVIOUS_PRELOAD)}
    os.execvpe(command[0], command, env if env is not None else dict(os.environ))
    return 127


if __name__ == "__main__":
    sys.exit(main())
