"""The architecture rules: the pure core does no I/O and reads no clock, and the shell
talks to it through one entry point.

``ring``, ``store.wire`` and ``store.core`` must not import trio, trio-websocket, socket,
asyncio, selectors or time, directly or through anything they import.  Two checks:

* import-linter's forbidden contract (pyproject.toml) walks the static import graph,
  transitive imports included;
* a fresh interpreter imports every module of the core (found by listing the files, so a new
  module is checked the day it is added) and must not have loaded any forbidden module that
  a bare interpreter does not load anyway (CPython's own start-up loads ``time`` for
  ``zipimport``, so for ``time`` the static check is the one that counts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("trio", "trio_websocket", "socket", "time", "asyncio", "selectors")
PURE_PACKAGES = ("ring", "store/wire", "store/core")


def pure_modules() -> tuple[str, ...]:
    """Every module of the pure packages, by listing their files (packages included)."""
    names = []
    for package in PURE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return tuple(names)


CORE = pure_modules()


def loaded_after(imports: tuple[str, ...]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(imports)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return set(json.loads(out.stdout))


def test_the_core_modules_are_found_by_listing_their_files() -> None:
    for module in ("ring.ownership", "store.wire.messages", "store.core.object_layer"):
        assert module in CORE
    assert len(CORE) == len(set(CORE)) and "store.core" in CORE


def test_importing_the_core_loads_no_io_module() -> None:
    baseline = loaded_after(())
    added = loaded_after(CORE) - baseline
    assert set(CORE) <= loaded_after(CORE)
    bad = sorted(m for m in added if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"importing the pure core loaded {bad}"


def test_import_linter_contract_is_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout and "BROKEN" not in result.stdout


# -- the shell talks to the core through one entry point -------------------------------------

#: What code outside ``store/core`` may use of a node's core (``Router``), and of its fast
#: paths (``Router.fast``): the one entry point, the checks, the figures, and the named
#: fast paths of the object layer.
CORE_API = {"handle", "validate", "statistics", "fast"}
FAST_PATHS = {
    "take",
    "let_go",
    "held",
    "in_order",
    "located",
    "call_now",
    "read_stale",
    "update_replica",
    "ship_untethered",
    "create_here",
    "remove_here",
    "absent_here",
}
#: The names outside code may import from the core's layer modules: types and the marker
#: the fast paths answer with, no function or state.
LAYER_IMPORTS = {"SLOW", "Held", "KeyRecord", "KeyState"}


def _shell_sources() -> list[Path]:
    store = ROOT / "store"
    return [p for p in store.rglob("*.py") if "core" not in p.relative_to(store).parts[:1]]


def test_outside_the_core_only_handle_validate_statistics_and_fast_paths_are_used() -> None:
    import ast

    from store.core.router import FastPaths

    assert set(FastPaths._fields) == FAST_PATHS
    bad: list[str] = []
    for path in _shell_sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                owner = node.value.attr
                if owner == "core" and node.attr not in CORE_API:
                    bad.append(f"{path.name}:{node.lineno}: .core.{node.attr}")
                if owner == "fast" and node.attr not in FAST_PATHS:
                    bad.append(f"{path.name}:{node.lineno}: .fast.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in (
                "store.core.key_layer",
                "store.core.object_layer",
                "store.core.scale_in",
                "store.core.held",
                "store.core.outbox",
            ):
                for alias in node.names:
                    if alias.name not in LAYER_IMPORTS:
                        bad.append(f"{path.name}:{node.lineno}: imports {alias.name}")
    assert not bad, "the shell reaches into the core: " + ", ".join(bad)


def test_the_two_layers_do_not_import_each_other() -> None:
    object_side = ("object_layer", "scale_in", "held")
    pairs = [("key_layer", m) for m in object_side] + [(m, "key_layer") for m in object_side]
    for module, other in pairs:
        text = (ROOT / "store" / "core" / f"{module}.py").read_text()
        assert f"store.core.{other}" not in text, f"{module} imports {other}"
