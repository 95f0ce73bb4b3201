"""Dockerfile.macos installs exactly as the README's serve command does, and starts the server."""

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^\s*(make \w+)\s*$", text, flags=re.M)


def test_readme_has_the_two_commands():
    commands = readme_commands()
    assert "make serve" in commands and "make test" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_dockerfile_installs_like_the_serve_command():
    docker = (ROOT / "Dockerfile.macos").read_text()
    makefile = (ROOT / "Makefile").read_text()
    # `make serve` depends on the install target, which runs scripts/install.sh; the image runs `make install`
    assert re.search(r"^serve: \$\(VENV\)/\.installed$", makefile, flags=re.M)
    assert re.search(r"^\$\(VENV\)/\.installed: .*\n\t.*sh scripts/install\.sh$", makefile, flags=re.M)
    assert re.search(r"^RUN make install$", docker, flags=re.M)
    assert re.search(r'^CMD \["make", "serve"\]$', docker, flags=re.M)
    # nothing else is pip-installed in the image behind the Makefile's back
    assert "pip install" not in docker
    # every file the install needs is copied in
    for needed in ("pyproject.toml", "Makefile", "scripts", "models", "server"):
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", docker, flags=re.M), needed


def test_install_script_puts_an_optimized_blas_in_place():
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "libopenblas0-pthread" in script
