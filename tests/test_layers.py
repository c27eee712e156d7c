"""The package's dependencies point one way: each part imports only parts of lower layers, and
benchmarks import nothing from tests/."""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mrcnn_jax"

# Bottom to top. A part (a subpackage or a top-level module of mrcnn_jax) may import parts of
# lower layers only.
LAYERS = (
    {"config_base", "paths", "sharding", "distributed", "ops", "cpu"},
    {"modeling", "transforms", "data"},
    {"checkpoints"},
    {"evaluation"},
    {"predictor", "export", "train_lib", "ablations", "testing"},
    {"batch_prediction"},
    {"demo"},
)


def _part(module: str) -> str:
    """"mrcnn_jax.modeling.rpn" -> "modeling"; "mrcnn_jax.paths" -> "paths"."""
    return module.split(".")[1]


def _imported_modules(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mrcnn_jax":
                found |= {f"mrcnn_jax.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_every_part_imports_only_lower_layers():
    level = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue
        part = relative.parts[0].removesuffix(".py")
        assert part in level, f"mrcnn_jax/{relative}: add {part!r} to LAYERS"
        for module in _imported_modules(path):
            if not module.startswith("mrcnn_jax.") or _part(module) == part:
                continue
            target = _part(module)
            assert target in level, f"mrcnn_jax/{relative} imports {module}: add it to LAYERS"
            if level[target] >= level[part]:
                upward.append(f"mrcnn_jax/{relative} ({part}) imports {module}")
    assert not upward, "\n".join(upward)


def test_benchmarks_import_nothing_from_tests():
    offenders = [f"{path.name} imports {module}"
                 for path in sorted((REPO / "benchmarks").glob("*.py"))
                 for module in _imported_modules(path)
                 if module == "tests" or module.startswith("tests.")]
    assert not offenders, offenders
