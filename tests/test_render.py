import warnings

from conftest import build

import layerscope as ls

# The reference's layout; the counts are the tiny llama's (36,992 parameters per block).
LLAMA_STATUS = """\
================================================
LAYER STATUS
================================================
Layer 0-1: FROZEN  (74.0K params)
Layer 2:   PARTIAL (37.0K params)
Layer 3:   ACTIVE  (37.0K params)
------------------------------------------------
Embeddings:  FROZEN
LM Head:     ACTIVE
================================================"""


def test_layer_status_groups_runs(capsys):
    model = build("llama", "meta")
    ls.freeze_first_n_layers(model, 2)
    ls.freeze_embeddings(model)
    ls.freeze_by_name(model, r"layers\.2\.mlp")
    assert ls.layer_status(model) == LLAMA_STATUS
    ls.print_layer_status(model)
    assert capsys.readouterr().out == LLAMA_STATUS + "\n"
    lines = ls.layer_status(model, show_all=True).splitlines()
    assert lines[3:7] == [
        "Layer 0: FROZEN  (37.0K params)", "Layer 1: FROZEN  (37.0K params)",
        "Layer 2: PARTIAL (37.0K params)", "Layer 3: ACTIVE  (37.0K params)",
    ]


def test_layer_status_marks_a_tied_head():
    text = ls.layer_status(build("gpt2", "meta"))
    assert "LM Head:     ACTIVE (tied to the embeddings)" in text


def test_model_summary_box(capsys):
    model = build("gpt2", "meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ls.freeze_first_n_layers(model, 1)
        ls.freeze_by_name(model, r"h\.1\.attn")
    text = ls.model_summary(model)
    lines = text.splitlines()
    total = 4 * 49_984 + 6_400 + 2_048 + 128
    assert f"Total Parameters: {total:,}" in text
    frozen = 49_984 + (64 * 192 + 192 + 64 * 64 + 64)
    assert f"Frozen: {frozen:,} ({100 * frozen / total:.1f}%)" in text
    assert f"Memory: ~{total * 4 / 1024:.1f} KiB (parameters)" in text  # fp32
    rows = [line for line in lines if "│" in line][1:]
    assert [r.split("│")[0].strip("║ ") for r in rows] == [
        "transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
        "transformer.h.2", "transformer.h.3", "transformer.ln_f", "lm_head",
    ]
    assert "✗" in rows[2] and "◐ partial" in rows[3] and "✓" in rows[4]
    assert "(tied: transformer.wte)" in rows[-1]
    widths = {len(line) for line in lines[3:]}  # every row of the box has the same width
    assert len(widths) == 1
    ls.print_model_summary(model, max_depth=1)
    shallow = capsys.readouterr().out
    assert "transformer.h.0" not in shallow and "transformer " in shallow


def test_model_summary_rejects_bad_depth():
    import pytest

    with pytest.raises(ValueError, match="max_depth must be an int >= 0, got -1"):
        ls.model_summary(build("gpt2", "meta"), max_depth=-1)
