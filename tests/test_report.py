"""The HTML report: self-contained, its content, agreement with ``--json``, and how a real
browser (headless Chromium) renders it."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import pytest

from layerscope import cli
from layerscope.render import svg
from layerscope.render.report import peak_segments

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("llama-3.2-1b", "--plan", "lp-lora", "--gpu", "l4", "--batch-size", "4")
WINDOW = (1280, 2400)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a run that does not fit, written by the CLI in a subprocess."""
    target = tmp_path_factory.mktemp("report") / "llama.html"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "layerscope", "report", *ARGS, "--samples", "20000",
         "--epochs", "2", "--html", str(target)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {target}" and done.stderr == ""
    return target


def embedded(html: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="layerscope-data">(.*?)</script>',
                      html, re.S)
    assert found, "the report embeds its data"
    return json.loads(found.group(1))


def svgs(html: str) -> list[ET.Element]:
    """Every inline SVG, parsed as XML (so each is well-formed)."""
    return [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", html, re.S)]


def test_report_is_self_contained(report):
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', html, re.I)
    assert not [r for r in refs if re.match(r"(https?:)?//", r)], refs
    assert "<script src" not in html.lower() and "<link" not in html.lower()
    assert "@import" not in html and not re.search(r"url\((?!#)", html)
    # the only script is the embedded JSON, which browsers do not run
    assert re.findall(r"<script[^>]*>", html) == [
        '<script type="application/json" id="layerscope-data">']


def test_report_content(report):
    html = report.read_text()
    doc = embedded(html)
    assert doc["command"] == "report" and doc["model"]["name"] == "llama-3.2-1b"
    assert "<title>layerscope: llama-3.2-1b</title>" in html
    assert "On l4 (22.49 GiB): DOES NOT FIT." in html and 'class="verdict nofit"' in html
    assert "What would make it fit" in html and "--batch-size 2 (x 2 accumulation)" in html
    # structure: embeddings frozen, blocks 0-7 frozen, 8-15 trainable; the head is tied
    parts = doc["structure"]
    assert [p["name"] for p in parts] == (["embeddings"]
                                          + [f"model.layers.{i}" for i in range(16)] + ["head"])
    assert [p["status"] for p in parts[1:17]] == ["frozen"] * 8 + ["trainable"] * 8
    assert sum(p["params"] for p in parts) == doc["model"]["total_params"]
    assert "model.layers.0 … model.layers.7" in html and "model.layers.8 … model.layers.15" in html
    strip, bars, chart = svgs(html)
    ns = "{http://www.w3.org/2000/svg}"
    legend = {p["status"] for p in parts}  # the head is partly frozen: its tied weight is
    assert parts[-1]["status"] == "partial" and legend == {"frozen", "trainable", "partial"}
    assert len(strip.findall(f"{ns}rect")) == len(parts) + len(legend)
    longest = max(doc["estimate"]["required_bytes"], doc["full_finetune"]["required_bytes"])
    above = min((c for c in doc["capacity_lines"] if c["memory_bytes"] > longest),
                key=lambda c: c["memory_bytes"])  # the first GPU line above the longest bar
    assert [t.text for t in bars.iter(f"{ns}text")][-1].startswith(above["gpu"])
    assert {"plan: lp-lora:0.5", "full fine-tuning"} <= {t.text for t in bars.iter(f"{ns}text")}
    lines = chart.findall(f".//{ns}polyline")
    assert len(lines) == 2
    sweep = doc["batch_sweep"]
    assert sweep["batch_sizes"] == [1, 2, 4, 8, 16, 32]
    assert all(len(line.get("points").split()) == 6 for line in lines)
    assert sweep["plan_required_bytes"][2] == doc["estimate"]["required_bytes"]  # batch 4
    assert sweep["plan_required_bytes"] == sorted(sweep["plan_required_bytes"])
    plan_t, full_t = doc["training"]["plan"], doc["training"]["full_finetune"]
    assert plan_t["samples"] == 20000 and plan_t["epochs"] == 2 and plan_t["gpu"] == "l4"
    assert plan_t["total_steps"] == 2 * 20000 // 4
    assert plan_t["step"]["seconds"] < full_t["step"]["seconds"]  # less backward to run
    assert "Time and cost" in html and "no price known" in html  # the L4 has no catalogue price


def test_report_agrees_with_estimate_json(report, capsys):
    assert cli.main(["estimate", *ARGS, "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    doc = embedded(report.read_text())
    for key in ("model", "settings", "plan", "estimate", "full_finetune", "gpu", "verdict",
                "suggestions", "fits_on", "assumptions"):
        assert doc[key] == estimate[key], key


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_bar_segments_add_up_to_the_memory_needed(phase):
    gib = 2**30
    e = {"peak_bytes": 40 * gib, "peak_phase": phase, "reserved_bytes": 44 * gib,
         "required_bytes": 44 * gib + 512 * 2**20,
         "weights_bytes": 10 * gib, "optimizer_state_bytes": 20 * gib, "gradient_bytes": 5 * gib,
         "optimizer_temporary_bytes": 4 * gib}
    segments = peak_segments(e)
    assert sum(v for _, v in segments) == e["required_bytes"]
    names = [n for n, _ in segments]
    assert names[:2] == ["weights", "optimizer states"]
    assert segments[-2:] == [("allocator cache (reserved, not in use)", 4 * gib),
                             ("CUDA context", 512 * 2**20)]
    if phase == "optimizer":  # 40 - 10 - 20 = 10 GiB: 5 of gradients, 4 temporary, 1 other
        assert segments[2:5] == [("gradients", 5 * gib), ("optimizer temporaries", 4 * gib),
                                 ("other", gib)]


def test_a_quantized_base_is_its_own_bar_segment_and_table_row():
    from layerscope.render.console import component_rows

    gib = 2**30
    e = {"peak_bytes": 40 * gib, "peak_phase": "backward", "reserved_bytes": 43 * gib,
         "required_bytes": 43 * gib + 512 * 2**20,
         "weights_bytes": 10 * gib, "quantized_base_bytes": 6 * gib,
         "optimizer_state_bytes": 20 * gib, "gradient_bytes": 5 * gib,
         "optimizer_temporary_bytes": 4 * gib, "activation_bytes": gib, "logits_bytes": gib,
         "paged_optimizer_bytes": 3 * gib}
    segments = peak_segments(e)
    assert segments[:3] == [("quantized base", 6 * gib), ("other weights", 4 * gib),
                            ("optimizer states", 20 * gib)]
    assert sum(v for _, v in segments) == e["required_bytes"]
    assert segments[-2:] == [("allocator cache (reserved, not in use)", 3 * gib),
                             ("CUDA context", 512 * 2**20)]
    f = {**e, "quantized_base_bytes": 0, "paged_optimizer_bytes": 0}
    rows = component_rows(e, f)
    assert rows[:2] == [("quantized base", 6 * gib, 0), ("other weights", 4 * gib, 10 * gib)]
    assert rows[-1] == ("paged optimizer states (not in peak)", 3 * gib, 0)


def test_svg_helpers_are_well_formed_and_spread_labels():
    gib = 2**30
    close = [("a100-80gb", 80 * gib), ("h100-sxm", int(79.6 * gib))]
    bars = ET.fromstring(svg.stacked_bars([("x", [("w", 10 * gib)])], close))
    labels = [t for t in bars.iter("{http://www.w3.org/2000/svg}text")
              if t.text.startswith(("a100", "h100"))]
    assert len({t.get("y") for t in labels}) == 2  # two rows: they would overlap on one
    chart = ET.fromstring(svg.line_chart([1, 2], [("s", [gib, 2 * gib])], close))
    ys = sorted(float(t.get("y")) for t in chart.iter("{http://www.w3.org/2000/svg}text")
                if t.text and t.text.startswith(("a100", "h100")))
    assert ys[1] - ys[0] >= 14
    strip = ET.fromstring(svg.block_strip([("a", 3, "frozen"), ("b", 1, "lora")]))
    fills = [r.get("fill") for r in strip.iter("{http://www.w3.org/2000/svg}rect")]
    assert fills[:2] == [svg.FROZEN_COLOR, svg.LORA_COLOR]


# -- a real browser --------------------------------------------------------------------------
def png_pixels(data: bytes) -> tuple[int, int, Any]:
    """Width, height and an (h, w, channels) uint8 array of an 8-bit RGB/RGBA PNG."""
    import numpy as np

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    prior = np.zeros(width * bpp, np.int32)
    for y in range(height):  # undo the per-row filters (PNG spec, section 9)
        kind, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            cur = row
        elif kind == 1:
            cur = np.cumsum(row.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:
            cur = (row + prior) % 256
        else:
            cur = row.copy()
            for i in range(width * bpp):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b, c = int(prior[i]), int(prior[i - bpp]) if i >= bpp else 0
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                    cur[i] = (cur[i] + pred) % 256
        out[y], prior = cur, cur
    return width, height, out.reshape(height, width, bpp)[:, :, :3].astype(np.uint8)


def count_color(pixels: Any, hex_color: str) -> int:
    rgb = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return int((pixels == rgb).all(axis=2).sum())


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium not installed (Debian package 'chromium'); the "
                           "browser rendering of the report is not checked")
def test_report_renders_in_chromium(report, tmp_path):
    png = tmp_path / "report.png"
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert png.exists(), done.stderr[-2000:]
    width, height, pixels = png_pixels(png.read_bytes())
    assert (width, height) == WINDOW
    white = (pixels == 255).all(axis=2)
    assert 0.03 < 1 - white.mean() < 0.6, "a page with content, not blank, not one colour"
    # what the charts draw, in their exact fill colours
    assert count_color(pixels, svg.FROZEN_COLOR) > 5000  # frozen blocks in the strip
    assert count_color(pixels, svg.TRAINABLE_COLOR) > 5000  # trainable blocks
    assert count_color(pixels, svg.PALETTE[0]) > 3000  # the weights segment of the bars
    assert count_color(pixels, "#ffe3e3") > 10000  # the red "does not fit" verdict box
    # content reaches down the page: the lower half is not empty
    assert (~white[height // 2:]).mean() > 0.01


def test_report_of_a_sharded_run_shows_its_communication(tmp_path):
    target = tmp_path / "sharded.html"
    assert cli.main(["report", "llama-3.2-1b", "--seq-len", "128", "--distributed", "zero3",
                     "--num-gpus", "4", "--html", str(target)]) == 0
    html = target.read_text()
    data = embedded(html)
    comm = data["training"]["full_finetune"]["step"]["communication"]
    assert comm["strategy"] == "zero3" and comm["num_gpus"] == 4
    assert "reduce-scatter" in comm["transfers"] and "all-gather" in comm["transfers"]
    assert "exposed of" in html and "NVLink within a node" in html
    assert "not modelled" not in html
