"""The install recipes agree: conda's environment.yml pins what constraints.txt pins and asks
for extras that pyproject.toml defines."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pins(text: str) -> dict[str, str]:
    return {m[1].lower(): m[2] for m in re.finditer(r"^\s*(?:-\s*)?([A-Za-z0-9_.-]+)==([^\s,#]+)", text, re.M)}


def test_environment_yml_matches_the_constraints_and_the_extras():
    environment = (ROOT / "environment.yml").read_text()
    constraints = _pins((ROOT / "constraints.txt").read_text())
    pinned = _pins(environment)
    assert {"torch", "torchvision"} <= set(pinned)
    for name, version in pinned.items():
        assert constraints.get(name) == version, (
            f"environment.yml pins {name}=={version}, constraints.txt {constraints.get(name)}"
        )
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (asked,) = re.findall(r"-e \.\[([a-z,]+)\]", environment)
    assert set(asked.split(",")) <= set(extras) and "cpu" not in asked.split(",")  # conda brings faiss-gpu
    assert any(dep.startswith("faiss-gpu") for dep in extras["gpu"]) and "faiss-gpu" in environment
