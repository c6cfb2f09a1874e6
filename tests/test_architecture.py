"""The architecture rule of DESIGN.md: the pure core does no I/O and reads no clock.

``ring`` and ``store.core`` must not import trio, trio-websocket, socket, asyncio, selectors
or time, directly or through anything they import.  Two checks:

* import-linter's forbidden contract (pyproject.toml) walks the static import graph,
  transitive imports included;
* a fresh interpreter imports the core and must not have loaded any forbidden module that a
  bare interpreter does not load anyway (CPython's own start-up loads ``time`` for
  ``zipimport``, so for ``time`` the static check is the one that counts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("trio", "trio_websocket", "socket", "time", "asyncio", "selectors")
CORE = ("ring", "ring.hashring", "ring.ownership", "store.core")


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
