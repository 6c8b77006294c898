"""Measure what a real DeepSpeed ZeRO-3 engine allocates in a training step, on CPU, and set it
beside layerscope's ZeRO-3 estimate for the same tiny model and settings.

What it measures: every tensor storage created while a ZeRO-3 engine (world size 1, gloo, the
CPU accelerator) builds a small transformers Qwen2 model under ``zero.Init``, wraps it with
``deepspeed.initialize`` and trains a few optimizer steps (bf16, gradient checkpointing,
gradient accumulation), through a ``TorchDispatchMode`` that records each new storage's bytes
and the innermost DeepSpeed (else transformers, else torch) frame that created it, and a
``weakref.finalize`` on the storage that drops it when freed. It prints the live bytes at the
peak of each phase (init, forward, backward, optimizer step), grouped by allocation site, and
layerscope's estimate (allocated bytes, exact sizes: no GPU allocator here) with its
components. Storages created by C++ outside the dispatcher (none expected at world size 1)
are not seen.

Needs DeepSpeed, which layerscope does not depend on (not in its dependencies or CI). Used:
0.12.6 (Dec 2023), built from its sdist with ``DS_BUILD_OPS=0 DS_ACCELERATOR=cpu pip install
--no-build-isolation --no-deps .`` after four import fixes for torch 2.13 / numpy 2 without
Intel's extensions: ``accelerator/real_accelerator.py`` (both copies) without the
``intel_extension_for_pytorch`` check; ``cpu_accelerator.py`` with ``oneccl_bindings_for_pytorch``
optional and ``_communication_backend_name = 'gloo'``; ``elasticity/__init__.py`` with the
``DSElasticAgent`` import in a try (torch moved ``log``); ``autotuning/scheduler.py`` with
``BUFSIZE = 8192`` (numpy 2 removed it). This script patches the CPU accelerator's missing
streams and its ``numactl``-based ``device_count`` at run time. Runs without a GPU::

    DS_ACCELERATOR=cpu PYTHONPATH=. python benchmarks/zero3_cpu_probe.py [--steps 3]

The optimizer is DeepSpeed's own, built from the config's ``{"type": "AdamW"}``: FusedAdam, on
the CPU accelerator from its JIT-built CPU kernel (printed). ``--world-size N`` runs N ranks
over gloo (rank 0 reports; each rank's memory is alike); ``--lora R`` trains peft LoRA adapters
of rank R on every linear layer of the blocks (Qwen's recipe targets) over a frozen base.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from collections import Counter
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _site() -> str:
    """The innermost DeepSpeed frame of the caller (else transformers, else the first frame
    outside torch and this file) as ``package/file.py:function``."""
    f = sys._getframe(2)
    fallback = None
    hf = None
    while f is not None:
        name = f.f_code.co_filename
        if "/deepspeed/" in name:
            rel = name.split("/deepspeed/", 1)[1]
            return f"deepspeed/{rel}:{f.f_code.co_name}:{f.f_lineno}"
        if hf is None and "/transformers/" in name:
            hf = f"transformers/{name.split('/transformers/', 1)[1]}:{f.f_code.co_name}"
        if fallback is None and "/torch/" not in name and not name.endswith("zero3_cpu_probe.py"):
            fallback = f"{os.path.basename(name)}:{f.f_code.co_name}"
        f = f.f_back
    return hf or fallback or "torch"


class Tracker(TorchDispatchMode):
    """Live storage bytes by allocation site, with the peak of each phase."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.by_site: Counter[str] = Counter()
        self.total = 0
        self.phase = "start"
        self.peaks: dict[str, tuple[int, Counter[str]]] = {}
        self.events: list[tuple[str, int, int, str]] = []  # (phase, key, bytes; 0 = free, site)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.peaks.setdefault(phase, (self.total, Counter(self.by_site)))

    def _drop(self, key: int) -> None:
        nbytes, site = self.live.pop(key, (0, ""))
        if nbytes:
            self.events.append((self.phase, key, 0, site))
            self.total -= nbytes
            self.by_site[site] -= nbytes

    def see(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        nbytes = st.nbytes()
        key = st.data_ptr()
        if nbytes == 0 or key == 0 or key in self.live:
            return
        site = _site()
        self.live[key] = (nbytes, site)
        self.events.append((self.phase, key, nbytes, site))
        self.total += nbytes
        self.by_site[site] += nbytes
        weakref.finalize(st, self._drop, key)
        best = self.peaks.get(self.phase)
        if best is None or self.total > best[0]:
            self.peaks[self.phase] = (self.total, Counter(self.by_site))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.see(t)
        return out


class _Stream:
    """DeepSpeed 0.12.6's CPU accelerator returns no stream, yet ``AllGatherHandle.wait`` calls
    ``current_stream().synchronize()``: a CPU stream that does nothing (CPU ops are
    synchronous)."""

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass


def _patch_cpu_streams() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = type(get_accelerator())
    acc.current_stream = lambda self, device_index=None: _Stream()  # type: ignore[method-assign]
    acc.default_stream = lambda self, device_index=None: _Stream()  # type: ignore[method-assign]
    # its device_count runs `numactl --hardware`; one process, one "device"
    acc.device_count = lambda self: 1  # type: ignore[method-assign]


def ds_config(hidden: int, accumulation: int, sub_group_size: int) -> dict[str, Any]:
    """Qwen-1's finetune/ds_config_zero3.json with 'auto' filled as the HF Trainer fills it."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": 0.1}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "none"},
            "offload_param": {"device": "none"},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": sub_group_size,
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def qwen2_config(args: argparse.Namespace) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=args.hidden, num_hidden_layers=args.layers,
                       intermediate_size=args.intermediate, vocab_size=args.vocab,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       tie_word_embeddings=False, max_position_embeddings=4096,
                       attn_implementation="sdpa", use_cache=False)


def show(title: str, total: int, sites: Counter[str], top: int) -> None:
    print(f"\n== {title}: {total:,} B ({total / MIB:.2f} MiB) live")
    for site, b in sorted(sites.items(), key=lambda kv: -kv[1])[:top]:
        if b:
            print(f"   {b:>14,}  {b / MIB:9.2f} MiB  {site}")


def lora_config(rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def layerscope_estimate(args: argparse.Namespace, cfg: Any) -> None:
    from transformers import AutoModelForCausalLM

    from layerscope import estimate_memory
    from layerscope.estimate.sharding import ZeroSettings, make_sharding

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    h = args.hidden
    zero = ZeroSettings(overlap_comm=True, contiguous_gradients=True,
                        sub_group_size=args.sub_group_size,
                        reduce_bucket_size=h * h, prefetch_bucket_size=int(0.9 * h * h),
                        param_persistence_threshold=10 * h, max_live_parameters=10**9)
    lora = {"lora": lora_config(args.lora)} if args.lora else {}
    est = estimate_memory(model, batch_size=1, seq_len=args.seq_len, precision="bf16-mixed", **lora,
                          optimizer="adamw-fused", gradient_checkpointing=True,
                          gradient_accumulation_steps=args.accumulation,
                          sharding=make_sharding(distributed="zero3", num_gpus=args.world_size,
                                                 zero=zero))
    print(f"\n== layerscope estimate_memory (zero3 x{args.world_size}, bf16-mixed, adamw-fused, "
          f"ckpt{f', lora {args.lora}' if args.lora else ''})")
    for f in ("peak_bytes", "peak_phase", "forward_peak_bytes", "backward_peak_bytes",
              "optimizer_peak_bytes", "weights_bytes", "master_weights_bytes", "gradient_bytes",
              "optimizer_state_bytes", "optimizer_temporary_bytes", "buffer_bytes", "held_bytes",
              "activation_bytes", "logits_bytes", "trainable_params", "total_params"):
        v = getattr(est, f)
        print(f"   {f:28s} {v:>14,}" + (f"  {v / MIB:9.2f} MiB" if isinstance(v, int) and
                                          "params" not in f else "") if not isinstance(v, str)
              else f"   {f:28s} {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--accumulation", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sub-group-size", type=int, default=10**9,
                    help="zero_optimization.sub_group_size (elements; Qwen's config: 1e9)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-estimate", action="store_true")
    ap.add_argument("--events", type=int, default=0, metavar="BYTES",
                    help="also print, in order, every allocation and free of at least BYTES")
    ap.add_argument("--world-size", type=int, default=1, help="ranks (processes, gloo)")
    ap.add_argument("--lora", type=int, default=0, metavar="RANK",
                    help="train LoRA adapters of this rank over a frozen base (0: full)")
    args = ap.parse_args()
    if "RANK" not in os.environ:  # the launcher: one process per rank, rank 0 reports
        import subprocess

        children = []
        for rank in range(args.world_size):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(args.world_size))
            env.setdefault("MASTER_PORT", "29533")
            out = None if rank == 0 else subprocess.DEVNULL
            children.append(subprocess.Popen([sys.executable, *sys.argv], env=env, stdout=out,
                                             stderr=out))
        sys.exit(max(c.wait() for c in children))
    rank = int(os.environ["RANK"])

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    _patch_cpu_streams()
    cfg = qwen2_config(args)
    config = ds_config(args.hidden, args.accumulation, args.sub_group_size)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    tracker = Tracker()
    with tracker:
        tracker.set_phase("init")
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.config.use_cache = False
        if args.lora:  # as Qwen's finetune.py: peft over the loaded base, inputs require grad
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(args.lora))
            model.enable_input_require_grads()
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config,
                                                       model_parameters=trainable)
        print(f"optimizer: {type(optimizer).__name__} over "
              f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__}")
        engine.train()
        g = torch.Generator().manual_seed(0)
        for step in range(args.steps):
            for micro in range(args.accumulation):
                ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=g)
                tracker.set_phase(f"s{step} fwd")
                loss = engine(input_ids=ids, labels=ids).loss
                tracker.set_phase(f"s{step} bwd")
                engine.backward(loss)
                tracker.set_phase(f"s{step} step" if micro == args.accumulation - 1
                                  else f"s{step} bwd")
                engine.step()
            print(f"step {step}: loss {loss.item():.4f}, live {tracker.total:,} B")
        tracker.set_phase("end")
    if rank:
        return
    n = sum(p.ds_numel for p in model.parameters())
    t = sum(p.ds_numel for p in model.parameters() if p.requires_grad)
    print(f"\nparameters: {n:,} elements ({n * 2:,} B in bf16, {n * 4:,} B in fp32), "
          f"{t:,} trainable, stored as "
          f"{sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}")
    if args.events:
        print(f"\n== allocations (+) and frees (-) of at least {args.events:,} B, in order")
        sizes: dict[int, int] = {}
        live = 0
        for phase, key, nbytes, site in tracker.events:
            size = nbytes or sizes.pop(key, 0)
            if nbytes:
                sizes[key] = nbytes
            live += size if nbytes else -size
            if size >= args.events:
                print(f"   {phase:8s} {'+' if nbytes else '-'}{size:>13,}  live {live:>14,}  {site}")
    for phase, (total, sites) in tracker.peaks.items():
        show(f"peak of phase '{phase}'", total, sites, args.top)
    if not args.no_estimate:
        layerscope_estimate(args, cfg)


if __name__ == "__main__":
    main()
