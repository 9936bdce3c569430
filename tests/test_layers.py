"""The package's modules import downward only (docs/architecture.md, layers)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdbayes"

# docs/architecture.md's table, bottom first. A module may import its own layer and those
# below at module level; the command line imports what it runs inside each command.
LAYERS = (
    ("model", "files", "prompts", "schemas", "cache"),
    ("fluid", "tails", "simulator", "points", "examples"),
    ("traces", "importers", "sweep", "fleet", "results"),
    ("observation",),
    ("likelihood",),
    ("predictive",),
    ("inference", "posterior"),
    ("planning", "tuning", "report"),
    ("cli", "__main__", "__init__"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_level_imports(path: Path) -> set[str]:
    """The sdbayes modules ``path`` imports outside any function or class."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdbayes"):
            found |= ({alias.name for alias in node.names} if node.module == "sdbayes"
                      else {node.module.split(".")[1]})
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sdbayes.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LAYER), ("place new modules in LAYERS and docs/architecture.md",
                                   modules ^ set(LAYER))


def test_modules_import_their_own_layer_or_below():
    upward = [f"{path.stem} imports {target}" for path in sorted(PACKAGE.glob("*.py"))
              for target in sorted(module_level_imports(path))
              if LAYER[target] > LAYER[path.stem]]
    assert not upward, upward


def test_the_probabilistic_model_needs_arrays_not_tables():
    assert "traces" not in module_level_imports(PACKAGE / "likelihood.py")
    assert "traces" not in module_level_imports(PACKAGE / "observation.py")


def test_a_renamed_module_is_reachable_under_its_old_name_with_a_warning():
    import warnings

    import sdbayes as sb
    from sdbayes import likelihood

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sb.calibrate is likelihood
    assert any(issubclass(w.category, DeprecationWarning) and "sdbayes.likelihood" in
               str(w.message) for w in caught)
