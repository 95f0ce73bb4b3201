"""mlx-lm's private names stay behind one fence (models.mlx_lm_ext): the installed mlx-lm has every name
the contract lists, no module outside the fence imports a private mlx-lm name or reads the instance
attributes the contract lists, and a missing name is reported instead of failing."""

from __future__ import annotations

import ast
from pathlib import Path

import models.mlx_lm_ext.contract as contract
from models.mlx_lm_ext.contract import GENERATION_BATCH_ATTRIBUTES, OTHER_INSTANCE_ATTRIBUTES, check_contract
from tests.conftest import ROOT

FENCE = ROOT / "models" / "mlx_lm_ext"


def test_the_installed_mlx_lm_has_every_name_the_contract_lists():
    report = check_contract()
    assert report.missing == ()
    assert report.version == report.pinned


def test_a_missing_name_is_reported(monkeypatch):
    monkeypatch.setattr(contract, "NAMES", (*contract.NAMES, "mlx_lm.generate:BatchGenerator._gone",
                                            "mlx_lm.no_such_module:Thing"))
    assert check_contract().missing == ("mlx_lm.generate:BatchGenerator._gone", "mlx_lm.no_such_module:Thing")


def outside_the_fence() -> list[Path]:
    return [p for p in (ROOT / "models").rglob("*.py") if FENCE not in p.parents]


def test_no_module_outside_the_fence_imports_a_private_mlx_lm_name():
    offenders = []
    for path in outside_the_fence():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_lm"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_no_module_outside_the_fence_reads_the_private_attributes_the_contract_lists():
    private = {name for name in GENERATION_BATCH_ATTRIBUTES if name.startswith("_")}
    private |= {name.split(".")[1] for name in OTHER_INSTANCE_ATTRIBUTES}
    offenders = []
    for path in outside_the_fence():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in private:  # getattr(x, "_name")
                offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert offenders == []


async def test_memory_reports_the_mlx_lm_contract(client):
    mlx_lm = (await client.get("/memory")).json()["device"]["mlx_lm"]
    assert mlx_lm == {"version": contract.PINNED, "pinned": contract.PINNED, "missing": []}
