"""Configuration precedence: CLI > environment > config file > defaults."""

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.settings import Settings, _cli_parser, load_settings
from tests.conftest import BUNDLED, ROOT


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "dtype-serve.toml"
    path.write_text('dtype = "float16"\nport = 9100\nhost = "127.0.0.2"\nmax_batch_size = 3\n')
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("DTYPE_SERVE_DTYPE", "DTYPE_SERVE_PORT", "DTYPE_SERVE_HOST", "DTYPE_SERVE_CONFIG",
                "DTYPE_SERVE_MODEL", "DTYPE_SERVE_MAX_BATCH_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_defaults_serve_the_bundled_model_at_auto_on_loopback():
    s = load_settings([])
    assert (s.model, s.dtype, s.host, s.port) == (str(BUNDLED), "auto", "127.0.0.1", 8000)


def test_file_over_defaults(config_file):
    s = load_settings(["--config", str(config_file)])
    assert (s.dtype, s.port, s.host, s.max_batch_size) == ("float16", 9100, "127.0.0.2", 3)


def test_env_over_file_and_cli_over_env(config_file, monkeypatch):
    monkeypatch.setenv("DTYPE_SERVE_DTYPE", "bfloat16")
    monkeypatch.setenv("DTYPE_SERVE_PORT", "9200")
    s = load_settings(["--config", str(config_file)])
    assert (s.dtype, s.port, s.host) == ("bfloat16", 9200, "127.0.0.2")
    s = load_settings(["--config", str(config_file), "--dtype", "fp32", "--port", "9300"])
    assert (s.dtype, s.port, s.host) == ("float32", 9300, "127.0.0.2")


def test_config_file_from_environment(config_file, monkeypatch):
    monkeypatch.setenv("DTYPE_SERVE_CONFIG", str(config_file))
    assert load_settings([]).dtype == "float16"


def test_settings_are_frozen_and_validated():
    s = load_settings([])
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="valid: auto, float32, float16, bfloat16"):
        load_settings(["--dtype", "float8"])


def test_help_explains_each_setting():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for flag in ("--model", "--dtype", "--host", "--port", "--config", "--max-tokens-limit", "--blas"):
        assert flag in out
    assert "DTYPE_SERVE_" in out


def test_help_shows_each_settings_default():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    text = " ".join(out.split())  # argparse wraps lines
    for expected in ("--port PORT port to bind (default: 8000)", "(default: auto)", "(default: 16)",
                     "(default: on)", "(default: 4194304)",
                     "--nonfinite-policy NONFINITE_POLICY when a dtype yields non-finite logits: warn in "
                     "the response, or refuse that dtype (default: warn)"):
        assert expected in text
    parser = _cli_parser()
    helps = {a.dest: a.help for a in parser._actions}
    assert all("default" in helps[name] for name in Settings.model_fields)


def test_cli_rejects_bad_dtype_with_a_clear_message():
    proc = subprocess.run([sys.executable, "-m", "server", "--dtype", "float8"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "unknown dtype 'float8'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,env,words", [
    (["--memory-budget", "abc"], {}, "memory_budget: 'abc' is not a size"),
    (["--memory-budget", "1e400"], {}, "memory_budget: '1e400' is not a finite size"),
    (["--prompt-cache-bytes", "-1"], {}, "prompt_cache_bytes: '-1' must be positive"),
    (["--log-level", "loud"], {}, "log_level:"),
    (["--model-dirs", "/no/such/folder"], {}, "model_dirs: '/no/such/folder' is not a folder"),
    (["--blas", "/no/such/libblas.so"], {}, "blas: must be auto, none or the path"),
    ([], {"DTYPE_SERVE_ALLOCATOR": "/no/such/libtcmalloc.so"}, "allocator: must be auto, system or the path"),
    (["--config", "/no/such/file.toml"], {}, "config file '/no/such/file.toml' is not a file"),
    (["--config", "BAD_TOML"], {}, "is not valid TOML"),
    ([], {"DTYPE_SERVE_MODEL_DIRS": "/no/such/folder"}, "model_dirs: '/no/such/folder' is not a folder"),
    (["--model", "/no/such/model"], {}, "is neither a folder nor a Hugging Face id"),
])
def test_every_bad_setting_is_one_line_and_exit_code_2(tmp_path, args, env, words):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("port = \n")
    args = [str(bad_toml) if a == "BAD_TOML" else a for a in args]
    # --port 0: should a bad value slip through, the server starts on a free port and the timeout ends it
    proc = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--no-warmup", "--log-level", "warning",
                           *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dtype-serve: ") and words in lines[0], proc.stderr[-2000:]


def test_model_dirs_from_the_environment_are_path_separated(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("DTYPE_SERVE_MODEL_DIRS", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert load_settings([]).model_dirs == (tmp_path / "a", tmp_path / "b")


def test_precisions_and_the_fit_order_are_settings(monkeypatch):
    s = load_settings(["--dtype", "int4:bf16", "--fit-order", "bf16, q8 ,4bit"])
    assert s.dtype == "q4:bfloat16" and s.fit_order == ("bfloat16", "q8", "q4")
    assert load_settings(["--dtype", "fit"]).fit_order == ("auto", "bfloat16", "q8", "q6", "q5", "q4")
    monkeypatch.setenv("DTYPE_SERVE_FIT_ORDER", "q6,q4")
    assert load_settings([]).fit_order == ("q6", "q4")


@pytest.mark.parametrize("args", [["--dtype", "q7"], ["--fit-order", "q8,fit"], ["--fit-order", "q8,int3"],
                                  ["--fit-order", ""]])
def test_bad_precisions_are_refused_at_start(args):
    with pytest.raises((ValidationError, SystemExit)):
        load_settings(args)
