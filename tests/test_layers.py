"""The package's layers: diffusion < backbones < generator, fewstep, rewards < objectives < training < evaluation <
stages.

A module imports only from its own layer or a lower one, lazily inside a function included; the generic registries
and the score stage name no world (the toy world registers its rewards and features through didr/plugins.py)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "didr"
LAYERS = {
    "didr.diffusion": 0,
    "didr.backbones": 1,
    "didr.generator": 2,
    "didr.fewstep": 2,
    "didr.rewards": 2,
    "didr.objectives": 3,
    "didr.training": 4,
    "didr.evaluation": 5,
    "didr.export": 5,
    "didr.stages": 6,
}
# what the stages read beside the layers; the teacher stage trains the embedded world's teacher and rewards
APPLICATION = ("didr.config", "didr.grid", "didr.methods", "didr.plugins", "didr.toy")


def layer(module: str) -> int | None:
    return next((rank for name, rank in LAYERS.items() if module == name or module.startswith(name + ".")), None)


def imports(path: Path) -> set[str]:
    """Every didr module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("didr"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("didr")}
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if layer(name) is not None:
            yield name, path


@pytest.mark.parametrize(("name", "path"), list(modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_a_module_imports_no_higher_layer(name, path):
    rank = layer(name)
    for imported in imports(path):
        if layer(imported) is None:
            assert rank == LAYERS["didr.stages"] and imported.startswith(APPLICATION), f"{name} imports {imported}"
        else:
            assert layer(imported) <= rank, f"{name} imports {imported} from a higher layer"


@pytest.mark.parametrize("path", ["rewards/registry.py", "evaluation/features.py", "stages/score.py"])
def test_the_registries_and_the_score_stage_name_no_world(path):
    assert "toy" not in (PACKAGE / path).read_text(encoding="utf-8").replace("toy_alignment", "")


def test_importing_a_layer_loads_nothing_above_it():
    code = (
        "import sys, didr.backbones.base, didr.backbones.gaussian; assert 'didr.generator' not in sys.modules; "
        "import didr.rewards.registry, didr.evaluation.features, didr.stages.score; "
        "assert not [m for m in sys.modules if m.startswith('didr.toy')]; "
        "from didr.rewards.registry import known_rewards; assert 'toy_aesthetic' not in known_rewards(); "
        "from didr.plugins import load_plugins; load_plugins(); assert 'toy_aesthetic' in known_rewards()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_features_schema_names_the_registered_features():
    import yaml

    from didr.config import SCHEMA
    from didr.evaluation.features import known_features
    from didr.plugins import load_plugins

    load_plugins()
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    assert sorted(schema["properties"]["score"]["properties"]["features"]["enum"]) == known_features()
