"""The C allocator: which library the server executes itself again with (pure logic), and what a process
reports once started. A real server preloading a library is in tests/test_real_server.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models.platform import allocator
from models.platform.allocator import PRELOADED, PREVIOUS_PRELOAD, allocator_info, preload_env
from tests.conftest import ROOT

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc: Linux")


@pytest.fixture
def on_linux(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "linux")


def test_a_path_is_preloaded_before_what_the_environment_preloads(on_linux):
    env = preload_env("/opt/libtcmalloc.so", {"LD_PRELOAD": "/x/libmine.so", "HOME": "/h"})
    assert env.pop("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD") == str(1 << 50)  # no warning per large tensor
    assert env == {"HOME": "/h", "LD_PRELOAD": "/opt/libtcmalloc.so /x/libmine.so", PRELOADED: "/opt/libtcmalloc.so",
                   PREVIOUS_PRELOAD: "/x/libmine.so"}
    assert preload_env("/opt/libtcmalloc.so", {})["LD_PRELOAD"] == "/opt/libtcmalloc.so"


def test_auto_takes_the_installed_one_and_does_nothing_without_one(on_linux, monkeypatch):
    monkeypatch.setattr(allocator, "find_allocator", lambda: "/usr/lib/libjemalloc.so.2")
    assert preload_env("auto", {})["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2"
    monkeypatch.setattr(allocator, "find_allocator", lambda: None)
    assert preload_env("auto", {}) is None


def test_nothing_is_executed_again_where_the_environment_preloads_it_already(on_linux, monkeypatch):
    monkeypatch.setattr(allocator, "find_allocator", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    assert preload_env("auto", {"LD_PRELOAD": "/elsewhere/libjemalloc.so.2"}) is None  # any allocator will do
    assert preload_env("/opt/libmine.so", {"LD_PRELOAD": "/x/libmine.so:/y/libz.so"}) is None
    assert preload_env("/opt/libmine.so", {"LD_PRELOAD": "/x/libz.so"})["LD_PRELOAD"] == "/opt/libmine.so /x/libz.so"


def test_nothing_is_executed_again_for_system_off_linux_or_a_second_time(on_linux, monkeypatch):
    assert preload_env("system", {}) is None
    assert preload_env("/opt/libtcmalloc.so", {PRELOADED: "/opt/libtcmalloc.so"}) is None  # the re-executed one
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert preload_env("/opt/libtcmalloc.so", {}) is None


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(allocator, "_state", None)
    for name in (PRELOADED, PREVIOUS_PRELOAD, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)


@linux_only
def test_a_process_started_with_the_library_reports_it_and_gives_children_the_old_preload(fresh_state, monkeypatch):
    mapped = next(line.split()[-1] for line in open("/proc/self/maps") if "/libc.so" in line or "/libc-" in line)
    monkeypatch.setenv(PRELOADED, mapped)
    monkeypatch.setenv(PREVIOUS_PRELOAD, "/x/libmine.so")
    monkeypatch.setenv("LD_PRELOAD", f"{mapped} /x/libmine.so")
    info = allocator_info("auto")
    assert (info.library, info.note) == (mapped, "")
    assert os.environ["LD_PRELOAD"] == "/x/libmine.so" and PRELOADED not in os.environ
    assert info.as_dict() == {"library": os.path.basename(mapped), "choice": "auto", "note": ""}
    assert allocator_info("system") is info  # the first answer is kept


@linux_only
def test_a_library_the_loader_refused_is_reported_as_not_in_force(fresh_state, monkeypatch, tmp_path):
    refused = tmp_path / "libnot-an-elf.so"
    refused.write_text("not a library")
    monkeypatch.setenv(PRELOADED, str(refused))
    monkeypatch.setenv(PREVIOUS_PRELOAD, "")
    monkeypatch.setenv("LD_PRELOAD", str(refused))
    info = allocator_info(str(refused))
    assert info.library == "glibc" and "could not preload libnot-an-elf.so" in info.note
    assert "LD_PRELOAD" not in os.environ


@linux_only
def test_a_library_the_environment_preloaded_is_reported_as_such(fresh_state, monkeypatch):
    mapped = next(line.split()[-1] for line in open("/proc/self/maps") if "/libc.so" in line or "/libc-" in line)
    monkeypatch.setenv("LD_PRELOAD", f"/x/libmine.so:{mapped}")
    info = allocator_info(mapped)
    assert (info.library, info.note) == (mapped, "preloaded by the environment's LD_PRELOAD")
    assert os.environ["LD_PRELOAD"] == f"/x/libmine.so:{mapped}"  # the environment's own: left as it is


@linux_only
def test_the_launcher_runs_a_command_on_the_allocator_the_server_would_preload(tmp_path):
    library = build_marker_library(tmp_path)
    show = [sys.executable, "-m", "models.platform.allocator", sys.executable, "-c",
            "import os; print(os.environ.get('LD_PRELOAD', '-'), os.environ.get('_DTYPE_SERVE_PRELOADED_ALLOCATOR'))"]
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    shown = subprocess.run(show, env={**base, "DTYPE_SERVE_ALLOCATOR": library}, capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout.split()
    assert shown == [library, "None"]  # servers it starts still choose their own
    shown = subprocess.run(show, env={**base, "DTYPE_SERVE_ALLOCATOR": "system"}, capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout.split()
    assert shown == ["-", "None"]


@linux_only
def test_the_loader_really_preloads_what_the_new_environment_names(tmp_path):
    """The environment `preload_env` builds, given to a real child: the library is in its memory map."""
    library = build_marker_library(tmp_path)
    env = preload_env(library, dict(os.environ))
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert library in maps


def build_marker_library(folder) -> str:
    """A shared library that defines one function: preloading it changes nothing but the memory map."""
    source = folder / "marker.c"
    source.write_text("int dtype_serve_marker(void) { return 42; }\n")
    library = folder / "libdtype-serve-marker.so"
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)
