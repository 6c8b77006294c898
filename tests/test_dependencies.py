"""The main job needs only the declared dependencies (issue 10: the README's first command
failed on a fresh install because LoRA alternatives needed peft, then an optional extra)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from layerscope.preflight import CHANGE_KINDS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


REQUIRED = {_dist(r) for r in PROJECT["dependencies"]}
OPTIONAL = {_dist(r) for extra in PROJECT.get("optional-dependencies", {}).values()
            for r in extra} - REQUIRED


def _third_party_imports() -> set[str]:
    """Top-level module names imported anywhere in the package, stdlib excluded."""
    names = set()
    for path in (ROOT / "layerscope").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"layerscope"}


def test_every_import_is_a_declared_dependency() -> None:
    owners = importlib.metadata.packages_distributions()
    for module in sorted(_third_party_imports()):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        assert dists & REQUIRED, (
            f"layerscope imports {module!r} (distribution {sorted(dists) or 'not installed'}), "
            f"which is not in [project].dependencies {sorted(REQUIRED)}"
        )


BLOCKER = """
import sys
for name in sys.argv[1].split(","):  # None in sys.modules: not installed, to every importer
    sys.modules[name] = None
"""

ALTERNATIVES = """
import dataclasses, json
from layerscope import empty_model
from layerscope.estimate.hardware import get_gpu
from layerscope.plan import FreezePlan
from layerscope.preflight import Context, suggestions
from layerscope.setup import TrainingSetup
model = empty_model({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 8, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 128})
tiny = dataclasses.replace(get_gpu("l4"), memory_bytes=2**20)  # nothing fits
setup = TrainingSetup(model, FreezePlan.none(), batch_size=4, seq_len=64)
found = suggestions(Context("tiny"), setup, tiny)
print(json.dumps(sorted({a.kind for a in found})))
"""


def test_every_alternative_builds_without_the_optional_extras() -> None:
    """In a process where the optional extras (and any optional runtime package) cannot be
    imported, every kind of alternative the CLI suggests is estimated."""
    owners = importlib.metadata.packages_distributions()
    blocked = {m for m, dists in owners.items()
               if {d.lower().replace("_", "-") for d in dists} & OPTIONAL}
    blocked |= {"bitsandbytes", "deepspeed", "flash_attn"}  # never needed to estimate
    code = BLOCKER + ALTERNATIVES
    done = subprocess.run([sys.executable, "-c", code, ",".join(sorted(blocked))],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = set(json.loads(done.stdout.strip().splitlines()[-1]))
    singles = {"checkpointing", "batch", "optimizer", "freeze", "lora"}
    assert singles <= kinds
    assert {part for k in kinds for part in k.split("+")} <= set(CHANGE_KINDS)
    assert {f"checkpointing+{k}" for k in ("optimizer", "freeze", "lora")} <= kinds
