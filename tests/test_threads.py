"""Estimates in threads: what another thread sees and does is unchanged.

layerscope runs inside training scripts. While estimates run in other threads, a thread that
builds and trains a real model must get initialised weights, transformers' own functions, its
own warnings filters and log records, and the process's default dtype, as if no estimate ran.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import warnings

import torch
import transformers.masking_utils as masking
from conftest import LLAMA, build
from transformers import AutoModelForCausalLM, LlamaConfig

import layerscope

PACKED = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
"""Three sequences packed in one row: transformers finds them (the estimate's answer is None)."""


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _estimates(models: list, errors: list, stop: threading.Event) -> None:
    """Estimate until told to stop: the settings that touch warnings (checkpointing), peft
    (LoRA), logging and transformers' packed-sequence check (every trace)."""
    settings = [dict(), dict(gradient_checkpointing=True), dict(lora=2), dict(inference=True)]
    i = 0
    try:
        while not stop.is_set() or i < 2:
            model = models[i % len(models)]
            layerscope.estimate_memory(model, seq_len=8 + i % 3, **settings[i % len(settings)])
            i += 1
    except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
        errors.append(exc)


def test_estimates_in_four_threads_leave_a_training_thread_alone():
    models = [build("llama", "meta"), build("gpt2", "meta")]
    original_packed = masking.find_packed_sequence_indices(PACKED)
    assert original_packed is not None
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    records = _Records()
    fake_log.addHandler(records)
    stop, errors = threading.Event(), []
    workers = [threading.Thread(target=_estimates, args=(models, errors, stop)) for _ in range(4)]
    seen: dict[str, list] = {"packed": [], "filters": [], "dtype": [], "level": []}
    losses: list[float] = []
    filters = list(warnings.filters)
    level = logging.getLogger("transformers").getEffectiveLevel()

    def train() -> None:
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
            for p in model.parameters():
                seen["dtype"].append(p.dtype)
            weights = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
            assert all(p.abs().sum() > 0 and p.std() > 0 for p in weights), "weights not initialised"
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            x = torch.randint(0, LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
            for step in range(25):
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                seen["packed"].append(masking.find_packed_sequence_indices(PACKED))
                seen["filters"].append(list(warnings.filters))
                seen["dtype"].append(torch.get_default_dtype())
                seen["level"].append(logging.getLogger("transformers").getEffectiveLevel())
                fake_log.error("from the training thread %d", step)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    trainer = threading.Thread(target=train)
    try:
        for w in workers:
            w.start()
        trainer.start()
        trainer.join()
        stop.set()
        for w in workers:
            w.join()
    finally:
        fake_log.removeHandler(records)
    assert not errors, errors
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, original_packed) for p in seen["packed"])
    assert all(f == filters for f in seen["filters"])
    assert set(seen["dtype"]) == {torch.float32}
    assert set(seen["level"]) == {level}
    assert records.messages == [f"from the training thread {i}" for i in range(25)]
    assert list(warnings.filters) == filters
    assert torch.get_default_dtype() == torch.float32


def test_user_hooks_never_run_during_an_estimate():
    model = build("llama", "meta")
    calls = []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append("forward"))
    model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append("pre"))
    model.lm_head.register_full_backward_hook(lambda *a: calls.append("backward"))
    layerscope.estimate_memory(model, seq_len=8)
    assert calls == []


def test_skeletons_built_in_threads_leave_the_default_dtype():
    """transformers builds under ``torch.set_default_dtype``: interleaved, two builds restored
    each other's dtype and left the process on bfloat16."""
    config = dict(LLAMA, model_type="llama")
    errors = []

    def builds() -> None:
        try:
            for _ in range(15):
                assert layerscope.empty_model(config, dtype="bf16").lm_head.weight.dtype == torch.bfloat16
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=builds) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.get_default_dtype() == torch.float32


RACE = textwrap.dedent("""
    import threading, layerscope
    llama = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                 max_position_embeddings=64)
    gpt2 = dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    barrier, errors = threading.Barrier(6), []

    def work(i):
        barrier.wait()  # every thread makes layerscope's first transformers/peft import at once
        try:
            if i % 2:
                layerscope.estimate_memory(llama if i % 3 else gpt2, seq_len=8, lora=2)
            else:
                layerscope.empty_model(gpt2 if i % 4 else llama)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(errors)
""")


def test_first_imports_in_threads_do_not_race():
    """A fresh process: six threads reach layerscope's first import of transformers and peft
    together (it used to fail with "cannot import name 'PretrainedConfig' from 'transformers'")."""
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
