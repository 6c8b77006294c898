"""empty_model: every kind of source, dtypes, ties, the hub cache, and every bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from layerscope.build import check_ties, empty_model
from layerscope.errors import ConfigError, LayerscopeError, ModelTypeError, StructureError

ROOT = Path(__file__).resolve().parents[1]

# A small Llama: embeddings 100 x 64, two blocks, untied head.
TINY: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 100,
    "torch_dtype": "bfloat16",
}
# 2 x (q 64x64 + k,v 64x32 + o 64x64 + mlp 3 x 64x128 + 2 norms of 64) + 2 x 100x64 + norm 64
TINY_PARAMS = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64


def unique_numel(model: nn.Module) -> int:
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


def subprocess_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake Hugging Face cache holding acme/tiny-llama at refs/main; offline mode set."""
    hub = tmp_path / "hf_home" / "hub"
    repo = hub / "models--acme--tiny-llama"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text(json.dumps(TINY))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


# --- sources -----------------------------------------------------------------------------------


def test_dict_source() -> None:
    model = empty_model(TINY)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert unique_numel(model) == TINY_PARAMS
    assert all(p.is_meta for p in model.parameters())


def test_config_json_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    for source in (
        tmp_path / "config.json",
        tmp_path,
        str(tmp_path),
        str(tmp_path / "config.json"),
    ):
        assert unique_numel(empty_model(source)) == TINY_PARAMS


def test_config_object_is_not_modified() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    before = config.to_dict()
    model = empty_model(config, dtype="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert config.to_dict() == before
    assert model.config is not config


def test_dict_without_architectures_gets_the_causal_lm_head() -> None:
    config = {k: v for k, v in TINY.items() if k != "architectures"}
    model = empty_model(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.shape == (100, 64)


def test_unknown_architecture_falls_back_with_a_warning() -> None:
    from layerscope.errors import LayerscopeWarning

    with pytest.warns(LayerscopeWarning, match="LlamaForSomethingNew"):
        model = empty_model({**TINY, "architectures": ["LlamaForSomethingNew"]})
    assert type(model).__name__ == "LlamaForCausalLM"


def test_local_folder_wins_over_a_preset_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(TINY))
    monkeypatch.chdir(tmp_path)
    assert type(empty_model("gpt2")).__name__ == "LlamaForCausalLM"


# --- dtype ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (None, torch.bfloat16),  # the config's torch_dtype
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float32", torch.float32),
        (torch.float32, torch.float32),
    ],
)
def test_dtype(dtype: str | torch.dtype | None, expected: torch.dtype) -> None:
    assert {p.dtype for p in empty_model(TINY, dtype=dtype).parameters()} == {expected}


def test_config_without_dtype_is_float32() -> None:
    config = {k: v for k, v in TINY.items() if k != "torch_dtype"}
    assert {p.dtype for p in empty_model(config).parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", ["int8", "fp99"])
def test_bad_dtype(dtype: str) -> None:
    with pytest.raises(ConfigError, match=f"dtype='{dtype}'"):
        empty_model(TINY, dtype=dtype)


# --- ties ------------------------------------------------------------------------------------------


def test_tied_dict_config_is_tied_by_identity() -> None:
    model = empty_model({**TINY, "tie_word_embeddings": True})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert unique_numel(model) == TINY_PARAMS - 100 * 64


def test_check_ties_reports_a_broken_tie() -> None:
    model = empty_model({**TINY, "tie_word_embeddings": True})
    model.lm_head.weight = nn.Parameter(torch.empty(100, 64, device="meta"))
    with pytest.raises(StructureError, match="lm_head.weight -> model.embed_tokens.weight"):
        check_ties(model)


# --- hub ids: local cache only -------------------------------------------------------------------


def test_hub_id_from_the_local_cache(hub_cache: Path, no_network: None) -> None:
    model = empty_model("acme/tiny-llama")
    assert unique_numel(model) == TINY_PARAMS
    assert model.config.name_or_path == "acme/tiny-llama"


def test_hub_cache_env_var_wins(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache.parent / "elsewhere"))
    with pytest.raises(ConfigError, match="elsewhere"):
        empty_model("acme/tiny-llama")


def test_hub_id_not_cached_is_a_clear_error(hub_cache: Path, no_network: None) -> None:
    with pytest.raises(ConfigError) as info:
        empty_model("meta-llama/Llama-3.1-8B-Instruct")
    message = str(info.value)
    assert "'meta-llama/Llama-3.1-8B-Instruct'" in message
    assert "not a built-in preset" in message and "local Hugging Face cache" in message
    assert str(hub_cache) in message
    assert "llama-3.1-8b" in message  # the close preset
    assert "config.json" in message  # the path alternative


def test_preset_repo_id_needs_no_cache(hub_cache: Path, no_network: None) -> None:
    model = empty_model("meta-llama/Llama-3.2-1B")
    assert model.config.name_or_path == "meta-llama/Llama-3.2-1B"


# --- bad input ---------------------------------------------------------------------------------------


def write(tmp_path: Path, content: str | bytes, name: str = "config.json") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match=r"'mistral-8b' is not a built-in preset.*'mistral-7b'"):
        empty_model("mistral-8b")


def test_malformed_json(tmp_path: Path) -> None:
    path = write(tmp_path, '{"model_type": "llama",')
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        empty_model(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read") as info:
        empty_model(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a JSON object, found list"):
        empty_model(write(tmp_path, "[1, 2]"))


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        empty_model(tmp_path / "nothing.json")
    with pytest.raises(ConfigError, match="no such file"):
        empty_model(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(ConfigError, match="folder has no config.json"):
        empty_model(tmp_path)
    with pytest.raises(ConfigError, match="empty model source"):
        empty_model("")


def test_no_model_type() -> None:
    with pytest.raises(ConfigError, match="no 'model_type'"):
        empty_model({"hidden_size": 64})


def test_unknown_model_type(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({**TINY, "model_type": "lama"}))
    with pytest.raises(ConfigError, match=r"unknown model_type 'lama'.*'llama'") as info:
        empty_model(path)
    assert str(path) in str(info.value)


def test_values_transformers_rejects() -> None:
    with pytest.raises(ConfigError, match="config dict") as info:
        empty_model({**TINY, "num_attention_heads": 5})  # 64 is not a multiple of 5
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("source", [42, 3.5, None, b"gpt2", ["gpt2"]])
def test_unsupported_source_type(source: object) -> None:
    with pytest.raises(ModelTypeError, match=type(source).__name__) as info:
        empty_model(source)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, LayerscopeError)


# --- remote code ----------------------------------------------------------------------------------------

REMOTE_CONFIG = textwrap.dedent(
    """
    from transformers import PretrainedConfig

    class TinyConfig(PretrainedConfig):
        model_type = "layerscope_tiny"

        def __init__(self, hidden_size=8, vocab_size=16, tie_word_embeddings=True, **kwargs):
            self.hidden_size = hidden_size
            self.vocab_size = vocab_size
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
    """
)
REMOTE_MODEL = textwrap.dedent(
    """
    from torch import nn
    from transformers import PreTrainedModel
    from .configuration_tiny import TinyConfig

    class TinyForCausalLM(PreTrainedModel):
        config_class = TinyConfig
        _tied_weights_keys = {"lm_head.weight": "embed.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head
    """
)


@pytest.fixture
def remote_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-remote"
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = {
        "model_type": "layerscope_tiny",
        "architectures": ["TinyForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_needs_trust(remote_folder: Path) -> None:
    with pytest.raises(ConfigError, match="remote code.*trust_remote_code=True") as info:
        empty_model(remote_folder)
    assert str(remote_folder) in str(info.value)


def test_auto_map_is_ignored_when_transformers_has_the_class(tmp_path: Path) -> None:
    # Like Phi-3's published config: auto_map points to remote code, but transformers has Phi3.
    config = {**TINY, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    assert type(empty_model(config)).__name__ == "LlamaForCausalLM"
    assert type(empty_model(config, trust_remote_code=True)).__name__ == "LlamaForCausalLM"
    assert type(empty_model(write(tmp_path, json.dumps(config)))).__name__ == "LlamaForCausalLM"


def test_remote_code_with_trust(remote_folder: Path, tmp_path: Path) -> None:
    # In a subprocess: transformers copies remote code to HF_MODULES_CACHE, read at import.
    script = (
        "from layerscope.build import empty_model\n"
        f"m = empty_model({str(remote_folder)!r}, trust_remote_code=True)\n"
        "assert type(m).__name__ == 'TinyForCausalLM', type(m)\n"
        "assert m.lm_head.weight is m.embed.weight\n"
        "assert m.lm_head.weight.is_meta\n"
    )
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# --- imports ---------------------------------------------------------------------------------------------


def test_import_layerscope_does_not_import_transformers() -> None:
    script = (
        "import sys\n"
        "import layerscope, layerscope.build, layerscope.catalog\n"
        "assert layerscope.catalog.presets()\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
