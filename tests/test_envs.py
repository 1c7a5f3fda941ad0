"""The MII_* environment switches: declared once in mii.envs, read nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mii
from mii import envs

SRC = Path(mii.__file__).parent


def test_every_switch_is_in_the_docstring_table():
    names = [s.name for s in envs.SWITCHES]
    assert len(set(names)) == len(names)
    table_rows = [line for line in envs.__doc__.splitlines() if line.startswith("| ``MII_")]
    assert [row.split("``")[1] for row in table_rows] == names


@pytest.mark.parametrize(
    ("switch", "value", "message"),
    [
        (envs.FUSED, "cuda", "MII_FUSED must be 'auto', 'triton' or 'torch', not 'cuda'"),
        (envs.PDL, "yes", "MII_PDL must be 'auto' or 'off', not 'yes'"),
        (envs.ATTENTION, "cuda", "MII_ATTENTION must be 'triton', 'torch' or 'auto', not 'cuda'"),
        (envs.TP_FAIL_AT_PASS, "1", "MII_TP_FAIL_AT_PASS must be 'RANK:N'"),
        (envs.PASS_DELAY_S, "-1", "MII_PASS_DELAY_S must be a number of seconds >= 0"),
        (envs.PASS_DELAY_S, "nan", "MII_PASS_DELAY_S must be a number of seconds >= 0"),
        (envs.PASS_DELAY_S, "soon", "MII_PASS_DELAY_S must be a number of seconds >= 0"),
    ],
)
def test_a_bad_value_names_the_variable_and_its_values(monkeypatch, switch, value, message):
    monkeypatch.setenv(switch.name, value)
    with pytest.raises(ValueError) as caught:
        switch.get()
    assert str(caught.value).startswith(message)


def test_switches_are_read_at_each_use(monkeypatch):
    monkeypatch.delenv("MII_GEMV", raising=False)
    assert envs.GEMV.get() == "auto"
    monkeypatch.setenv("MII_GEMV", "torch")
    assert envs.GEMV.get() == "torch"
    monkeypatch.setenv("MII_TP_FAIL_AT_PASS", "1:3")
    assert envs.TP_FAIL_AT_PASS.get() == (1, 3)
    monkeypatch.setenv("MII_PASS_DELAY_S", "0.25")
    assert envs.PASS_DELAY_S.get() == 0.25
    monkeypatch.setenv("MII_CACHE_DIR", "")  # empty counts as unset
    assert envs.CACHE_DIR.get() == Path.home() / ".cache" / "mii"


def _environment_reads(tree: ast.AST) -> list[str]:
    """Names a module reads with os.environ.get(...), os.getenv(...) or os.environ[...]."""
    keys = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            if ast.unparse(node.func) in ("os.environ.get", "os.getenv"):
                keys.append(node.args[0])
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            keys.append(node.slice)
    # A computed name (a variable, a constant from elsewhere) is reported as <its code>.
    return [k.value if isinstance(k, ast.Constant) else f"<{ast.unparse(k)}>" for k in keys]


def test_the_reader_check_finds_each_form():
    code = 'os.environ.get("MII_A", "x"); os.getenv("MII_B"); os.environ["MII_C"]; os.getenv(v)'
    assert _environment_reads(ast.parse(code)) == ["MII_A", "MII_B", "MII_C", "<v>"]


def test_no_module_but_envs_reads_an_mii_switch():
    readers = {}
    for path in SRC.rglob("*.py"):
        if path.name == "envs.py" or path.name.endswith("_pb2.py"):
            continue
        names = _environment_reads(ast.parse(path.read_text()))
        # Names must be literal, so that the check can tell a switch from RANK or WORLD_SIZE.
        mii_names = [n for n in names if n.startswith(("MII_", "<"))]
        if mii_names:
            readers[str(path.relative_to(SRC))] = mii_names
    assert readers == {}


def test_an_empty_kernel_choice_counts_as_unset(monkeypatch):
    monkeypatch.setenv("MII_GEMV", "")
    assert envs.GEMV.get() == "auto"
    monkeypatch.setenv("MII_ATTENTION", "")
    assert envs.ATTENTION.get() == "triton"


@pytest.mark.parametrize("switch", [envs.MOE, envs.FUSED, envs.GEMV], ids=lambda s: s.name)
def test_forcing_triton_on_the_cpu_without_the_interpreter_says_what_to_do(monkeypatch, switch):
    """Without TRITON_INTERPRET=1 there is no Triton backend on a CPU: a forced kernel
    would fail deep inside Triton ("0 active drivers") in the first forward pass."""
    import torch

    from mii.ops import dispatch

    monkeypatch.setenv(switch.name, "triton")
    cpu = torch.device("cpu")
    assert dispatch.triton_chosen(switch, cpu)  # the interpreter (conftest) runs it
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    with pytest.raises(ValueError, match=rf"{switch.name}=triton .*TRITON_INTERPRET=1"):
        dispatch.triton_chosen(switch, cpu)
    monkeypatch.setenv(switch.name, "auto")
    assert not dispatch.triton_chosen(switch, cpu)
