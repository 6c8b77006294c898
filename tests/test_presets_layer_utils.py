"""Every Layer Utils function and scan on every built-in preset skeleton, the largest included."""

import warnings

import pytest

import layerscope as ls
from layerscope import FreezePlan, LayerscopeWarning, empty_model, presets, scan


@pytest.mark.parametrize("name", presets())
def test_layer_utils_on_preset_skeleton(name):
    model = empty_model(name)
    s = scan(model)
    n = s.num_layers
    assert n > 0 and s.total_params > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        frozen = ls.setup_lp_lora_style(model)
        assert frozen == FreezePlan.lp_lora().resolve(s).frozen_params
        assert ls.get_frozen_percentage(model) == pytest.approx(100 * frozen / s.total_params)
        ls.freeze_except_last_n(model, min(4, n))
        ls.freeze_last_n_layers(model, 1)
        ls.freeze_first_n_layers(model, n)
        ls.freeze_embeddings(model)
        assert ls.get_trainable_params(model) == scan(model).trainable_params
        ls.unfreeze_model(model)
        ls.GradualUnfreezer(model, 3, verbose=False).step(1)
    assert ls.get_num_layers(model) == n
    assert "LAYER STATUS" in ls.layer_status(model)
    assert "MODEL SUMMARY" in ls.model_summary(model, max_depth=2)
    savings = ls.get_memory_savings_estimate(model, seq_len=256)  # runs the memory estimator
    assert savings["frozen_params"] == scan(model).frozen_params
    if savings["peak_saved_bytes"] is None:
        assert savings["estimate_note"]
    else:
        assert savings["planned_peak_bytes"] > 0
    assert ls.get_layer_names(model)
