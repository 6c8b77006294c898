"""Live tensor bytes of a real QLoRA training step on the CPU, beside layerscope's estimate.

What it measures: a tiny Llama built from a config, saved, loaded the way peft's
``examples/sft`` loads a sharded-QLoRA base (bitsandbytes NF4, double quantisation,
``bnb_4bit_quant_storage`` = ``torch_dtype`` = bf16), LoRA r=8 on all linear layers with the
adapters in the base's bf16 (peft 0.7-0.11), ``enable_input_require_grads`` (TRL skips
``prepare_model_for_kbit_training`` for a sharded QLoRA base), reentrant gradient
checkpointing, CPU bf16 autocast, AdamW; two steps, the second reported. Optionally under
FSDP1 (``--world 2``: two processes on gloo, peft's ``fsdp_auto_wrap_policy``, FULL_SHARD,
``use_orig_params=False``, bf16 ``MixedPrecision`` as accelerate sets it for ``--bf16``).

Every storage an ATen op returns inside the step is recorded (a ``TorchDispatchMode``), with
the module, autograd node and op that made it; parameters, buffers, bitsandbytes quant states,
optimizer state and FSDP1's padded unsharded buffers are registered before the step. Their
current ``nbytes`` are summed after every op (FSDP frees by resizing storages, which no op
shows), and the peak's composition is printed, then ``estimate_memory``'s figures for the same
model and settings (``peak_bytes`` is the comparable figure: allocated, not reserved).

CPU differences to keep in mind: dropout masks are the input's dtype on the CPU (bool on CUDA),
so compare with ``--dropout 0``; attention is SDPA's CPU flash kernel.

Needs ``pip install bitsandbytes`` (>= 0.46: 4-bit on the CPU); not a dependency of layerscope.
``OLD=1 PYTHONPATH=<dir>`` with transformers 4.39.3 and peft 0.10.0 installed in ``<dir>``
(``pip install --no-deps --target``) runs the March-2024 stack (the 4-bit layers then replace
``nn.Linear`` by hand: transformers 4.39's quantizer refuses a machine without CUDA).

    PYTHONPATH=. python benchmarks/qlora_probe.py --dropout 0 [--world 2] [--layers 16]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class Live:
    """The storages alive now, each with the tag of what made it, and the peak's composition."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[StorageWeakRef, str]] = {}
        self.peak, self.peak_at, self.peak_comp = 0, "", collections.Counter[str]()
        self.peak_count = collections.Counter[str]()
        self.stack: list[str] = []
        self.phase = "state"

    def add(self, t: Any, tag: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in self.live or self.live[ref.cdata][0].expired():
            self.live[ref.cdata] = (ref, tag)

    def check(self, where: str) -> int:
        sizes = {}
        for key, (ref, _) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
            else:
                sizes[key] = torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
        total = sum(sizes.values())
        if total > self.peak:
            self.peak, self.peak_at = total, where
            self.peak_comp = collections.Counter()
            self.peak_count = collections.Counter[str]()
            for key, n in sizes.items():
                self.peak_comp[self.live[key][1]] += n
                self.peak_count[self.live[key][1]] += 1
        return total


class Mode(TorchDispatchMode):
    def __init__(self, live: Live) -> None:
        super().__init__()
        self.live = live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        where = self.live.stack[-1] if self.live.stack else "-"
        tag = f"{self.live.phase}|{where}|{node.name() if node is not None else ''}|{func.__name__}"
        for t in tree_flatten(out)[0]:
            self.live.add(t, tag)
        self.live.check(tag)
        return out


def register_state(model: nn.Module, live: Live, opt: torch.optim.Optimizer) -> None:
    for name, p in model.named_parameters():
        live.add(p, "state|param:" + ("lora" if "lora_" in name else type(p).__name__))
    for b in model.buffers():
        live.add(b, "state|buffer")
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None) or getattr(m, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                live.add(t, "state|quant_state")
            if getattr(qs, "state2", None) is not None:
                live.add(qs.state2.absmax, "state|quant_state")
                live.add(qs.state2.code, "state|quant_state")
        handle = getattr(m, "_handle", None)
        if handle is not None:
            flat = handle.flat_param
            kind = "lora" if flat.requires_grad else "frozen"
            for attr in ("_full_param_padded", "_mp_shard", "_saved_grad_shard", "_cpu_grad"):
                live.add(getattr(flat, attr, None), f"state|fsdp{attr}:{kind}")
    for st in opt.state.values():
        for v in st.values():
            live.add(v, "state|optimizer")


def build(args: argparse.Namespace) -> tuple[Any, nn.Module]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.inter,
                      vocab_size=args.vocab, num_attention_heads=args.heads, num_key_value_heads=args.kv,
                      max_position_embeddings=4096, torch_dtype="bfloat16")
    path = f"{args.cache}/llama_{args.hidden}_{args.layers}_{args.inter}_{args.vocab}_{args.heads}_{args.kv}"
    if not os.path.exists(path):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    if os.environ.get("OLD"):  # transformers 4.39: its bnb quantizer needs CUDA; replace by hand
        import bitsandbytes as bnb

        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                     attn_implementation=args.attn)
        for name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and not name.endswith("lm_head"):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", quant_storage=torch.bfloat16)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, quant_storage=torch.bfloat16,
                                             module=q).to("cpu")
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, q)
        model.is_loaded_in_4bit = True
        return cfg, model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
                               bnb_4bit_quant_storage=torch.bfloat16)
    return cfg, AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map="cpu", attn_implementation=args.attn)


def with_lora(model: Any, args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.enable_input_require_grads()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules="all-linear")
    if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    else:
        model = get_peft_model(model, config)
    reentrant = {"use_reentrant": not args.non_reentrant}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
    return model


def measure(rank: int, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cfg, model = build(args)
    model = with_lora(model, args)
    if args.world > 1:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy

        bf16 = torch.bfloat16
        model = FullyShardedDataParallel(
            model, sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
            mixed_precision=None if args.no_mixed_precision else MixedPrecision(
                param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
            use_orig_params=False, device_id=torch.device("cpu"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids.clone(), "return_dict": True}
    names = {m: n for n, m in model.named_modules()}
    for step in range(2):
        live = Live()
        register_state(model, live, opt)
        live.add(ids, "state|input")
        start = live.check("start")

        def pre(m: nn.Module, a: Any, live: Live = live) -> None:
            live.stack.append(names.get(m, type(m).__name__))

        def post(m: nn.Module, a: Any, o: Any, live: Live = live) -> None:
            if live.stack:
                live.stack.pop()

        hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
                 nn.modules.module.register_module_forward_hook(post, always_call=True)]
        with Mode(live):
            live.phase = "fwd"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            live.phase = "bwd"
            loss.backward()
            del loss
            live.phase = "opt"
            opt.step()
            opt.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
        if rank == 0 and step == 1:
            print(f"rank 0, step 2: {start / MIB:.3f} MiB alive at the start, peak {live.peak / MIB:.3f} MiB "
                  f"at {live.peak_at}")
            by_kind = collections.Counter[tuple[str, ...]]()
            for tag, n in live.peak_comp.items():
                parts = tag.split("|")
                by_kind[tuple(parts) if len(parts) == 2 else (parts[0], parts[2] or parts[1], parts[3])] += n
            for kind, n in by_kind.most_common(args.top):
                print(f"  {n / MIB:10.3f} MiB  {' | '.join(kind)}")
            for tag, n in sorted(live.peak_comp.items(), key=lambda kv: -kv[1]):
                if args.detail and args.detail in tag:
                    print(f"    {n / MIB:8.3f} MiB in {live.peak_count[tag]:3d}  {tag}")
            if os.environ.get("OLD"):  # layerscope needs the current peft: run without OLD for it
                print("layerscope estimate: not run with OLD (it needs the installed peft)")
            else:
                estimate(cfg, args)


def estimate(cfg: Any, args: argparse.Namespace) -> None:
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    import layerscope
    from layerscope.estimate.sharding import FsdpSettings, make_sharding
    from layerscope.quantization import Quantization

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    kw: dict[str, Any] = dict(
        batch_size=args.batch, seq_len=args.seq, precision="bf16-mixed", optimizer="adamw",
        gradient_checkpointing=True, base_dtype="bf16", lora_dtype="bf16", attn_implementation=args.attn,
        quantization=Quantization("nf4", double_quant=True),
        lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if args.world > 1:
        kw["sharding"] = make_sharding(distributed="fsdp", num_gpus=args.world, gpus_per_node=8, offload=None,
                                       fsdp=FsdpSettings(version=1, use_orig_params=False))
    else:
        kw["prepare_kbit"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = layerscope.estimate_memory(skeleton, **kw)
    print(f"layerscope estimate_memory: peak_bytes {est.peak_bytes / MIB:.3f} MiB ({est.peak_phase}); "
          + ", ".join(f"{k} {getattr(est, k) / MIB:.3f}" for k in (
              "weights_bytes", "quantized_base_bytes", "held_bytes", "activation_bytes", "logits_bytes",
              "optimizer_state_bytes")))


def worker(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        measure(rank, args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("hidden", 1024), ("layers", 8), ("inter", 2816), ("vocab", 4096), ("heads", 16),
                          ("kv", 2), ("batch", 2), ("seq", 512), ("world", 1), ("port", 29613), ("top", 30)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--no-mixed-precision", action="store_true", help="FSDP1 without MixedPrecision")
    ap.add_argument("--non-reentrant", action="store_true", help="use_reentrant=False checkpointing")
    ap.add_argument("--detail", default="", help="also print every tag at the peak containing this text")
    ap.add_argument("--cache", default="/tmp/layerscope_qlora_probe",
                    help="where the tiny checkpoint is saved")
    args = ap.parse_args()
    if args.world > 1:
        mp.spawn(worker, args=(args,), nprocs=args.world)
    else:
        measure(0, args)


if __name__ == "__main__":
    main()
