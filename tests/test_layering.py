"""The dependency direction: the coordinator never needs TensorFlow; devices never need the server.

Every module of ``server/`` (``fedcoreml.server``, the gateway included) must import with
TensorFlow and everything else only the extras install blocked, since the base install
(``pip install .``, the coordinator image) does not have them, and ``fedcoreml.client_sim`` too.
Every module of ``ios_bridge/`` (what a device needs) must import with those blocked and
``fedcoreml.server`` as well; ``client_sim/`` never imports ``fedcoreml.server``.

Each package is imported in one fresh interpreter whose ``sys.meta_path`` starts with a finder
that refuses the blocked names and records who asked: a module that fails to import, or a line
of ours that even tries (inside ``try``/``except``), fails the test with the file and line.
Imports inside functions are checked on the source as well, as importing a module does not run
them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"][
    "setuptools"
]["package-dir"]
FOLDERS = {package: REPO / folder for package, folder in PACKAGE_DIRS.items()}

# What only the extras install: the `devices` extra's TensorFlow (with Keras) and flwr-datasets
# (with Hugging Face datasets), `simulation`'s Ray, `dev`'s grpcio-tools.
EXTRAS_ONLY = ("tensorflow", "keras", "tf_keras", "flwr_datasets", "datasets", "ray", "grpc_tools")
BLOCKED = {
    "fedcoreml.server": (*EXTRAS_ONLY, "fedcoreml.client_sim"),
    "fedcoreml.ios_bridge": (*EXTRAS_ONLY, "fedcoreml.server", "fedcoreml.client_sim"),
}
# The simulated devices need the extras, so they are only checked on the source: they talk to
# the coordinator over the wire, never through its modules.
SOURCE_ONLY = {"fedcoreml.client_sim": ("fedcoreml.server",)}

# Run as `python -c PROBE CONFIG_JSON`; prints one JSON object.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, json, os, sys, traceback

    config = json.loads(sys.argv[1])
    blocked, ours = tuple(config["blocked"]), tuple(config["ours"])
    attempts = []


    def is_blocked(name):
        return any(name == prefix or name.startswith(prefix + ".") for prefix in blocked)


    def is_ours(filename):
        return os.path.realpath(filename).startswith(ours)


    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if not is_blocked(fullname):
                return None
            frame = sys._getframe(1)
            while frame is not None and (
                frame.f_code.co_filename.startswith("<frozen")
                or os.path.dirname(frame.f_code.co_filename) == os.path.dirname(importlib.__file__)
            ):
                frame = frame.f_back
            where = "?" if frame is None else frame.f_code.co_filename
            line = 0 if frame is None else frame.f_lineno
            attempts.append({"name": fullname, "file": where, "line": line, "ours": is_ours(where)})
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)


    already = sorted(name for name in sys.modules if is_blocked(name))
    sys.meta_path.insert(0, Refuse())
    failures = {}
    for module in config["modules"]:
        try:
            importlib.import_module(module)
        except BaseException as error:
            frames = [f for f in traceback.extract_tb(error.__traceback__) if is_ours(f.filename)]
            at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            failures[module] = f"{type(error).__name__}: {error}{at}"
    loaded = sorted(name for name in sys.modules if is_blocked(name) and sys.modules[name])
    print(json.dumps({"already": already, "failures": failures, "attempts": attempts,
                      "loaded": loaded}))
    """
)


def modules_in(package: str, folder: Path) -> list[str]:
    """Every module under ``folder`` (subpackages included), named as installed."""
    names = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((package, *parts)))
    return names


def probe(
    modules: list[str], blocked: tuple[str, ...], ours: list[Path], path: Path | None = None
) -> dict:
    """Import ``modules`` in a fresh interpreter with ``blocked`` refused; what happened.

    ``ours``: folders whose files must not even try a blocked import; ``path``: a folder put
    first on ``sys.path`` (for a package a test makes).
    """
    config = {
        "modules": modules,
        "blocked": list(blocked),
        "ours": [str(folder.resolve()) + "/" for folder in ours],
    }
    script = PROBE if path is None else f"import sys; sys.path.insert(0, {str(path)!r})\n{PROBE}"
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(config)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def problems(report: dict) -> list[str]:
    """One line per violation in a ``probe`` report; empty when the layer is clean."""
    lines = [f"{name} was imported before the probe started" for name in report["already"]]
    lines += [f"{module} does not import: {why}" for module, why in report["failures"].items()]
    lines += [
        f"{a['file']}:{a['line']} imports {a['name']}" for a in report["attempts"] if a["ours"]
    ]
    lines += [f"{name} got loaded despite the block" for name in report["loaded"]]
    return lines


def forbidden_import_statements(folder: Path, blocked: tuple[str, ...]) -> list[str]:
    """``import``/``from`` statements anywhere in ``folder``'s files (functions too) naming a
    blocked module, as ``file:line name``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if any(name == p or name.startswith(p + ".") for p in blocked):
                    found.append(f"{path.relative_to(folder.parent)}:{node.lineno} {name}")
                    break
    return found


@pytest.mark.parametrize("package", sorted(BLOCKED))
def test_every_module_imports_with_the_layers_below_it_blocked(package: str) -> None:
    modules = modules_in(package, FOLDERS[package])
    assert len(modules) > 5, f"found only {modules} under {FOLDERS[package]}"
    report = probe(modules, BLOCKED[package], list(FOLDERS.values()))
    assert problems(report) == [], "\n".join(problems(report))


@pytest.mark.parametrize("package", sorted(BLOCKED | SOURCE_ONLY))
def test_no_function_imports_a_blocked_module_later(package: str) -> None:
    found = forbidden_import_statements(FOLDERS[package], (BLOCKED | SOURCE_ONLY)[package])
    assert found == [], "forbidden imports:\n" + "\n".join(found)


def test_the_probe_catches_forbidden_imports(tmp_path: Path) -> None:
    """The check itself: a module that reaches a blocked layer, directly, through another
    module, or inside try/except, is reported with its file and line; a clean one is not; an
    import inside a function is left to the source check, which finds it."""
    package = tmp_path / "canary"
    package.mkdir()
    sources = {
        "__init__": "",
        "clean": "import json\nfrom fedcoreml.ios_bridge import channel\n",
        "direct": "import json\nimport tensorflow as tf\n",
        "indirect": "from fedcoreml.server.gateway import tls\n",
        "swallowed": "try:\n    import keras\nexcept ImportError:\n    keras = None\n",
        "lazy": "def later():\n    import fedcoreml.client_sim.emulator\n",
    }
    for name, source in sources.items():
        (package / f"{name}.py").write_text(source)
    blocked = BLOCKED["fedcoreml.ios_bridge"]
    modules = [f"canary.{name}" for name in sources if name != "__init__"]

    found = problems(probe(modules, blocked, [*FOLDERS.values(), package], path=tmp_path))
    assert any(line.startswith("canary.direct does not import") for line in found), found
    assert any(line.endswith("direct.py:2 imports tensorflow") for line in found), found
    assert any(line.startswith("canary.indirect does not import") for line in found), found
    assert any(line.endswith("indirect.py:1 imports fedcoreml.server") for line in found), found
    assert any(line.endswith("swallowed.py:2 imports keras") for line in found), found
    assert not any("clean" in line or "lazy" in line for line in found), found

    assert forbidden_import_statements(package, blocked) == [
        "canary/direct.py:2 tensorflow",
        "canary/indirect.py:1 fedcoreml.server.gateway",
        "canary/lazy.py:2 fedcoreml.client_sim.emulator",
        "canary/swallowed.py:2 keras",
    ]
