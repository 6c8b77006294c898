"""Every public callable, fed bad values: only a LayerscopeError comes out, naming the value.

The walk covers every callable name in ``layerscope.__all__``: each parameter in turn gets each
bad value while the others are valid (and each setting of the estimators, which take them as
keyword arguments). Result records (frozen dataclasses layerscope builds and returns, such as
``MemoryEstimate``) are constructed by layerscope itself and are not walked.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
from conftest import LLAMA, build
from torch import nn

import layerscope
from layerscope import LayerscopeError
from layerscope.setup import SETTINGS

RECORDS = {"BlockStack", "MemoryEstimate", "MemorySavings", "ModelScan", "ParamInfo",
           "Resolution", "RunConfig", "ScheduleEstimate", "StepTime"}
"""Results layerscope builds and returns; constructing them is not an input path."""

BAD: list[Any] = [-1, 0, 10**400, math.nan, math.inf, "", "a" * 5000, object(), [object()],
                  {"x": 1}, b"bytes", 2.5, True]


def _model() -> nn.Module:
    return build("llama", "meta")


VALID: dict[str, Callable[[], Any]] = {
    "model": _model, "source": lambda: {**LLAMA, "model_type": "llama"}, "name": lambda: "h100",
    "gpu": lambda: "h100", "plan": lambda: None, "s": lambda: None, "n": lambda: 1,
    "patterns": lambda: "mlp", "case_sensitive": lambda: True, "total_epochs": lambda: 3,
    "num_samples": lambda: 10, "batch_size": lambda: 1, "num_epochs": lambda: 1,
    "ms_per_step": lambda: 500.0, "num_layers": lambda: 4, "rules": lambda: (),
    "freeze_ratio": lambda: 0.5, "freeze_embed": lambda: True, "max_depth": lambda: 1,
    "include_params": lambda: False, "show_all": lambda: False, "dtype": lambda: None,
    "trust_remote_code": lambda: False, "limit": lambda: 4, "context_bytes": lambda: 0,
"strict": lambda: True, "num_gpus": lambda: 1,
    "price_per_hour": lambda: None, "unfreeze_embeddings_at": lambda: None,
    "freeze_embeddings": lambda: True, "verbose": lambda: False,
    "full_name": lambda: "My GPU", "memory_bytes": lambda: 2**34,
    "peak_flops": lambda: {"bf16": 1e15}, "memory_bandwidth": lambda: 2e12, "sm_count": lambda: 100,
    "unfreezer": lambda: layerscope.GradualUnfreezer(_model(), 3, verbose=False),
    "config": lambda: {"zero_optimization": {"stage": 2}},
    "method": lambda: "nf4",
}
FLAGS = {"case_sensitive", "freeze_embed", "include_params", "show_all", "trust_remote_code",
         "strict", "freeze_embeddings", "verbose", "gradient_checkpointing", "inference"}

CALLABLES = sorted(
    name for name in layerscope.__all__
    if callable(getattr(layerscope, name)) and name not in RECORDS
    and not (isinstance(getattr(layerscope, name), type)
             and issubclass(getattr(layerscope, name), (BaseException, Warning)))
)


def _calls(name: str) -> list[tuple[str, dict[str, Any]]]:
    """``(label, keyword arguments)``: one bad value at a time, everything else valid."""
    func = getattr(layerscope, name)
    params = [p for p in inspect.signature(func).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    settings = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())
    required = {p.name for p in params if p.default is p.empty}
    names = [p.name for p in params] + ([s for s in SETTINGS if s not in {p.name for p in params}]
                                        if settings else [])
    out = []
    for target in names:
        for i, bad in enumerate(BAD):
            if target in FLAGS and isinstance(bad, bool):
                continue  # a valid value
            if target in {"price_per_hour", "ms_per_step", "headroom", "freeze_ratio"} and bad in (0, 2.5):
                continue  # valid numbers there (0.5 < 2.5 is not a ratio: kept for freeze_ratio)
            if target in {"num_samples", "num_epochs", "context_bytes", "max_depth"} and bad == 0:
                continue
            kwargs = {p: VALID[p]() for p in required if p != target}
            kwargs[target] = bad
            out.append((f"{name}({target}={str(bad)[:20]!r}) #{i}", kwargs))
    return out


CASES = [(name, label, kwargs) for name in CALLABLES for label, kwargs in _calls(name)]


@pytest.mark.parametrize("name", CALLABLES)
def test_every_public_callable_refuses_bad_values_with_a_layerscope_error(name, capsys):
    func = getattr(layerscope, name)
    raw = []
    for label, kwargs in _calls(name):
        try:
            func(**kwargs)
        except LayerscopeError as exc:
            message = str(exc)
            assert message and len(message) < 2000, (label, message[:300])
        except Exception as exc:  # noqa: BLE001 - what this test is looking for
            raw.append(f"{label}: {type(exc).__name__}: {str(exc)[:150]}")
    capsys.readouterr()
    assert not raw, "\n".join(raw)


def test_scan_of_a_lazy_module_says_what_to_do():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(layerscope.StructureError, match=r"not initialised yet.*'0.weight'.*forward first"):
        layerscope.scan(model)
    with pytest.raises(layerscope.StructureError):
        layerscope.get_num_layers(model)
    model(__import__("torch").ones(2, 3))
    assert layerscope.scan(model).total_params == 3 * 4 + 4


@pytest.mark.parametrize("call", [
    lambda m: layerscope.GradualUnfreezer(m, 3, verbose="no"),
    lambda m: layerscope.layer_status(m, show_all="no"),
    lambda m: layerscope.get_layer_names(m, include_params=1),
    lambda m: layerscope.empty_model({**LLAMA, "model_type": "llama"}, trust_remote_code="no"),
    lambda m: layerscope.estimate_memory(m, gradient_checkpointing="no"),
    lambda m: layerscope.estimate_memory(m, inference=0),
    lambda m: layerscope.setup_lp_lora_style(m, freeze_embed="yes"),
])
def test_non_bool_values_for_flags_are_refused(call):
    with pytest.raises(LayerscopeError, match="True or False|must be a bool"):
        call(_model())


def test_a_long_value_is_named_in_a_short_message():
    with pytest.raises(layerscope.ConfigError) as info:
        layerscope.empty_model("a" * 5000)
    assert str(info.value).startswith("'aaaa") and len(str(info.value)) <= 1300
