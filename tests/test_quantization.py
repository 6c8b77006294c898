"""The quantized-base setting (layerscope/quantization.py): names and BitsAndBytesConfig fields
validated, and which modules transformers quantizes, checked against transformers' own rule."""

from __future__ import annotations

import pytest
import torch
from conftest import build

from layerscope.errors import EstimateError
from layerscope.quantization import Quantization, default_skip_modules, quantized_modules


@pytest.fixture(scope="module")
def tiny_llama_meta():
    return build("llama", "meta")


@pytest.fixture(scope="module")
def tiny_gpt2_meta():
    return build("gpt2", "meta")


def test_which_modules_transformers_quantizes(tiny_llama_meta, tiny_gpt2_meta):
    # Llama: every Linear of the blocks; lm_head (the output embedding, last parameter) kept
    names = {m.name for m in quantized_modules(tiny_llama_meta, Quantization("nf4"))}
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert default_skip_modules(tiny_llama_meta) == ["lm_head"]
    # GPT-2: Conv1D projections are quantized (transposed shapes), the tied head is kept
    gpt = quantized_modules(tiny_gpt2_meta, Quantization("nf4"))
    assert len(gpt) == 4 * 4 and gpt[0].name == "transformer.h.0.attn.c_attn"
    assert (gpt[0].n_out, gpt[0].n_in) == (3 * 64, 64)
    assert {"lm_head", "transformer.wte"} <= set(default_skip_modules(tiny_gpt2_meta))
    # llm_int8_skip_modules replaces the defaults: the head is then quantized too. Patterns
    # are regexes from the start of the name (to a module boundary) or suffixes, so "mlp"
    # alone skips nothing here, ".*mlp" skips every MLP projection, "o_proj" every o_proj
    def quantized(*skip):
        return {m.name for m in quantized_modules(tiny_llama_meta, Quantization("nf4", skip_modules=skip))}

    assert len(quantized("mlp")) == 4 * 7 + 1
    names = quantized(".*mlp", "o_proj")
    assert "lm_head" in names and len(names) == 4 * 3 + 1
    assert not any(".mlp." in n or n.endswith("o_proj") for n in names)


@pytest.mark.parametrize("patterns", [["mlp"], [".*mlp"], ["o_proj"], ["model.layers.1"],
                                      ["model.layers.1.self"], ["lm_head"], ["layers.*q_proj"]])
def test_skip_rule_is_transformers_rule(tiny_llama_meta, patterns):
    utils = pytest.importorskip("transformers.quantizers.quantizers_utils")
    should_convert = getattr(utils, "should_convert_module", None)
    if should_convert is None:
        pytest.skip("transformers without should_convert_module (before 5.x)")
    from torch import nn

    linears = [n for n, m in tiny_llama_meta.named_modules() if type(m) is nn.Linear]
    q = Quantization("nf4", skip_modules=tuple(patterns))
    ours = {m.name for m in quantized_modules(tiny_llama_meta, q)}
    assert ours == {n for n in linears if should_convert(n, patterns)}


def test_bits_and_bytes_config_is_honoured():
    from transformers import BitsAndBytesConfig

    q = Quantization.of(BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=["lm_head", "router"]))
    assert q == Quantization("nf4", True, torch.bfloat16, torch.bfloat16, ("lm_head", "router"))
    # a config without a compute dtype computes in fp32, as transformers defaults it
    assert Quantization.of(BitsAndBytesConfig(load_in_4bit=True)).compute_dtype == torch.float32
    assert Quantization.of(BitsAndBytesConfig(load_in_4bit=True)).method == "fp4"
    assert Quantization.of(BitsAndBytesConfig(load_in_8bit=True)).method == "int8"
    assert Quantization.of("NF4") == Quantization("nf4") and Quantization.of(None) is None


@pytest.mark.parametrize(("value", "message"), [
    ("nf5", "unknown quantization 'nf5'; allowed: nf4, fp4, int8"),
    (4, "quantization must be one of nf4, fp4, int8"),
])
def test_bad_quantization_names(value, message):
    with pytest.raises(EstimateError, match=message):
        Quantization.of(value)


def test_bad_bits_and_bytes_fields():
    from transformers import BitsAndBytesConfig

    with pytest.raises(EstimateError, match="bnb_4bit_quant_type must be 'nf4' or 'fp4', got 'nf5'"):
        Quantization.of(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf5"))
    with pytest.raises(EstimateError, match="exactly one of load_in_4bit and load_in_8bit"):
        Quantization.of(BitsAndBytesConfig())
    with pytest.raises(EstimateError, match="bnb_4bit_compute_dtype must be one of float32"):
        Quantization.of(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.int8))
    bad = BitsAndBytesConfig(load_in_4bit=True)
    bad.llm_int8_skip_modules = "lm_head"  # a str, not a list (set after construction)
    with pytest.raises(EstimateError, match="llm_int8_skip_modules must be a list"):
        Quantization.of(bad)
    with pytest.raises(EstimateError, match="llm_int8_has_fp16_weight=True"):
        Quantization.of(BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True))
