"""Imports go one way: a lower layer never imports a higher one, not even inside a function.

Layers, bottom to top (docs/development.md):

    errors
    resources | provenance | io
    text
    data
    metrics
    ops
    models
    train | eval | inference
    serve | export | demo
    cli

A unit is a subpackage of ``volumevlm`` (``volumevlm/io/``) or a top-level module
(``volumevlm/cli.py``). A unit may import itself and any unit of a LOWER layer; units of the
same layer (the ``|`` above) do not import each other, so train, eval and inference stay
independent. The CLI is the top: its command table names every verb, the demo's too. Where
the team's order names two units as one layer ("errors/io",
"data/text"), the one the other already used sits lower: text below data (the cohort
writes phecodes and sections), metrics between them and ops (training and evaluation share
it; it needs the label table and the findings labeler).

What counts as an import of a unit, found in the AST of every module (so imports inside
functions count):
* ``import volumevlm.x...`` and ``from volumevlm.x... import ...``, relative ones resolved;
* a string naming a module path, ``"volumevlm.x.y"`` or ``"volumevlm.x.y:attr"`` (what
  ``importlib.import_module`` tables such as the CLI's command list hold);
* the package root's lazy public names (``volumevlm.load`` resolves to
  ``volumevlm.inference.checkpoint``): ``from volumevlm import load`` or ``volumevlm.load``
  after ``import volumevlm``. Its plain constants (``__version__``, ``NOT_FOR_CLINICAL_USE``)
  are defined in ``volumevlm/__init__.py`` itself and count as the bottom layer.

``volumevlm/__init__.py`` is the public facade: it may name any layer in its lazy table
(resolved on first attribute access) but imports no volumevlm module itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "volumevlm"

LAYERS: list[set[str]] = [
    {"errors"},
    {"resources", "provenance", "io"},
    {"text"},
    {"data"},
    {"metrics"},
    {"ops"},
    {"models"},
    {"train", "eval", "inference"},
    {"serve", "export", "demo"},
    {"cli"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
MODULE_STRING = re.compile(r"^volumevlm(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?$")


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _unit(module: str) -> str | None:
    """The unit of a dotted volumevlm module name; None for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _lazy_table() -> dict[str, str]:
    """The package root's lazy names -> the module each resolves to."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return {name: module for name, (module, _) in ast.literal_eval(node.value).items()}
    raise AssertionError("volumevlm/__init__.py: no _LAZY table")


LAZY = _lazy_table()


def imports_of(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, imported volumevlm module) for every import-like reference in ``path`` (whose
    source is ``text`` when given)."""
    module, is_package = _module_name(path)
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    found: list[tuple[int, str]] = []
    root_bound = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "volumevlm" or alias.name.startswith("volumevlm."):
                    found.append((node.lineno, alias.name))
                    root_bound = root_bound or alias.asname is None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "volumevlm":
                for alias in node.names:
                    if alias.name in LAZY:
                        found.append((node.lineno, LAZY[alias.name]))
                    elif (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file():
                        found.append((node.lineno, f"volumevlm.{alias.name}"))
            elif target.startswith("volumevlm."):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.append((node.lineno, node.value.split(":")[0]))
    if root_bound:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "volumevlm"
                    and node.attr in LAZY):
                found.append((node.lineno, LAZY[node.attr]))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def violations() -> list[str]:
    out = []
    for path in _modules():
        module, _ = _module_name(path)
        source = _unit(module)
        if source is None:
            continue  # the facade, checked below
        if source not in RANK:
            out.append(f"{path.relative_to(PACKAGE.parent)}: unit {source!r} has no layer; add it to LAYERS")
            continue
        for line, target in imports_of(path):
            dest = _unit(target)
            if dest is None or dest == source:
                continue
            if dest not in RANK:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}, whose unit {dest!r} has no layer")
            elif RANK[dest] >= RANK[source]:
                kind = "a unit of the same layer" if RANK[dest] == RANK[source] else "a higher layer"
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {target} ({kind})")
    return out


def test_imports_go_one_way():
    found = violations()
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_the_facade_imports_no_volumevlm_module():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = [node.lineno for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any(name.startswith("volumevlm") for name in
                     ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]))]
    assert not eager, f"volumevlm/__init__.py imports volumevlm modules at lines {eager}"
    for name, module in LAZY.items():
        assert _unit(module) in RANK, f"volumevlm.{name} points at {module}, outside every layer"


def test_every_unit_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    units |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("source, imported, bad", [
    # function-local, upward
    ("def f():\n    from volumevlm.inference.pipeline import embed\n", "models", True),
    # a peer of the same layer
    ("from volumevlm.train.module import report_sections\n", "eval", True),
    # through the package root's lazy name
    ("import volumevlm\n\ndef f(d):\n    return volumevlm.load(d)\n", "models", True),
    ("from volumevlm import load\n", "models", True),
    # an importlib table entry
    ("TASKS = {'x': 'volumevlm.serve.app:create_app'}\n", "inference", True),
    # downward, the root's constants, and the unit itself are fine
    ("from volumevlm.text.sections import split_report\nfrom volumevlm import NOT_FOR_CLINICAL_USE\n", "models", False),
    ("from volumevlm.models.vlm import VolumeVLM\n", "models", False),
])
def test_the_check_catches_what_it_should(source, imported, bad):
    """The checker on small modules placed in a unit: an upward, peer, lazy-name or string
    import is caught; a downward one is not."""
    probe = PACKAGE / imported / "layer_probe.py"  # never written: its source is given
    source_unit = _unit(_module_name(probe)[0])
    hits = [(line, target) for line, target in imports_of(probe, source)
            if _unit(target) not in (None, source_unit) and RANK[_unit(target)] >= RANK[source_unit]]
    assert bool(hits) is bad, hits
