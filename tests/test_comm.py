"""Communication time under DDP, FSDP, HSDP and ZeRO: NCCL's cost model and the step's schedule,
checked against arithmetic written out here."""

from __future__ import annotations

import math

import pytest

from layerscope.errors import EstimateError
from layerscope.estimate.comm import (
    BUS_EFFICIENCY,
    CPU_ADAM_PARAMS_PER_S,
    HOST_COPY_EFFICIENCY,
    RING_BASE_LATENCY_S,
    RING_STEP_LATENCY_S,
    TORCH_CPU_ADAMW_PARAMS_PER_S,
    TREE_ALGBW_RATIO,
    TREE_STEP_LATENCY_S,
    RankWork,
    Topology,
    Unit,
    Wire,
    collective,
    communication_time,
    cpu_optimizer_of,
    cpu_optimizer_seconds,
    rank_work,
    topology,
)
from layerscope.estimate.hardware import Fabric
from layerscope.estimate.sharding import DdpSettings, FsdpSettings, Sharding, ZeroSettings
from layerscope.estimate.states import TensorInfo

US = 1e-6
NVL, NET = RING_STEP_LATENCY_S["nvlink"], RING_STEP_LATENCY_S["net"]


def node(num_gpus: int = 4, per_node: int = 8) -> Topology:
    """Round numbers: 100 GB/s NVLink, one 10 GB/s adapter per GPU, 10 GB/s PCIe."""
    return Topology(num_gpus, per_node, 100e9, "nvlink", Fabric("test", 10e9), 10e9)


# -- NCCL's cost of one collective ------------------------------------------------------------
def test_ring_all_gather_within_a_node_of_h100s() -> None:
    topo = topology("h100", 8)
    c = collective("all-gather", 2**30, topo, 8)
    busbw = 450e9 * BUS_EFFICIENCY  # NVLink4: 900 GB/s both ways
    assert c.bus_bandwidth == pytest.approx(busbw)
    expected = RING_BASE_LATENCY_S + 7 * NVL + 7 / 8 * 2**30 / busbw  # 7 ring steps
    assert (c.algorithm, c.nodes) == ("ring", 1)
    assert c.seconds == pytest.approx(expected)
    rs = collective("reduce-scatter", 2**30, topo, 8)
    assert rs.seconds == pytest.approx(c.seconds)  # same volume as all-gather


def test_all_reduce_across_two_nodes_of_a100s_is_bounded_by_the_network() -> None:
    topo = topology("a100-80gb", 16)  # DGX A100: eight 200 Gb/s HDR adapters per node
    s = 4 * 2**30
    c = collective("all-reduce", s, topo, 16)
    busbw = min(300e9, 8 * 25e9) * BUS_EFFICIENCY
    ring = RING_BASE_LATENCY_S + (30 - 2) * NVL + 2 * NET + 2 * 15 / 16 * s / busbw
    tree = 2 * (7 * TREE_STEP_LATENCY_S["nvlink"] + 1 * TREE_STEP_LATENCY_S["net"]) + s / (
        TREE_ALGBW_RATIO * busbw)
    assert ring < tree and c.algorithm == "ring"
    assert c.seconds == pytest.approx(ring)
    assert c.nodes == 2 and c.bus_bandwidth == pytest.approx(busbw)


def test_tree_wins_small_all_reduce_over_many_nodes() -> None:
    topo = topology("h100", 512)  # 64 nodes
    c = collective("all-reduce", 4096, topo, 512)
    tree = 2 * (7 * TREE_STEP_LATENCY_S["nvlink"] + 6 * TREE_STEP_LATENCY_S["net"]) + 4096 / (
        TREE_ALGBW_RATIO * c.bus_bandwidth)
    assert c.algorithm == "tree" and c.seconds == pytest.approx(tree)
    ring_latency = RING_BASE_LATENCY_S + (1022 - 126) * NVL + 126 * NET
    assert ring_latency > tree


def test_one_gpu_per_node_gets_its_share_of_the_node_network() -> None:
    topo = topology("h100", 32)  # four nodes; HSDP's replica groups: one GPU per node
    c = collective("all-reduce", 2**30, topo, 4, ranks_per_node=1)
    assert c.bus_bandwidth == pytest.approx(400e9 / 8 * BUS_EFFICIENCY)  # one NDR adapter
    eth = topology("l40s", 16)  # one 100 Gb/s adapter for the whole node
    assert collective("all-gather", 2**20, eth, 16).bus_bandwidth == pytest.approx(
        12.5e9 * BUS_EFFICIENCY)
    assert collective("all-reduce", 2**20, eth, 2, ranks_per_node=1).bus_bandwidth == (
        pytest.approx(12.5e9 / 8 * BUS_EFFICIENCY))


def test_uneven_last_node_bounds_the_ring() -> None:
    topo = node(12, 8)  # 8 + 4 GPUs: the 4-GPU node has half the adapters
    c = collective("all-gather", 10**9, topo, 12)
    assert c.bus_bandwidth == pytest.approx(min(100e9, 8 * 10e9 * 4 / 8) * BUS_EFFICIENCY)


def test_a_single_rank_or_nothing_to_send_costs_nothing() -> None:
    assert collective("all-reduce", 10**9, node(1, 8), 1).seconds == 0.0
    assert collective("all-gather", 0, node(), 4).seconds == 0.0


def test_bad_collectives() -> None:
    with pytest.raises(EstimateError, match="unknown collective 'broadcast'"):
        collective("broadcast", 1, node(), 4)
    with pytest.raises(EstimateError, match="nbytes"):
        collective("all-gather", -1, node(), 4)
    with pytest.raises(EstimateError, match="ranks must be an int >= 1"):
        collective("all-gather", 1, node(), 0)


def test_cpu_optimizer_shares_the_node_cores() -> None:
    assert cpu_optimizer_seconds(1e9, 1, "deepspeed-cpu-adam") == pytest.approx(0.22)
    assert cpu_optimizer_seconds(1e9, 8, "deepspeed-cpu-adam") == pytest.approx(8 * 0.22)
    assert cpu_optimizer_seconds(1e9, 1, "torch-adamw") == pytest.approx(
        1e9 / TORCH_CPU_ADAMW_PARAMS_PER_S)
    assert cpu_optimizer_seconds(1e9, 1, "torch-adamw-fused") == pytest.approx(0.22)
    with pytest.raises(EstimateError, match="unknown CPU optimizer"):
        cpu_optimizer_seconds(1, 1, "lion")


# -- one step's schedule ----------------------------------------------------------------------
P = 100_000_000  # parameters of each block
ROOT = 50_000_000
FWD, BWD = 0.010, 0.020  # seconds of one block's compute


BF16 = Wire(param_bytes=2, grad_bytes=2, offload_param_bytes=4)
"""bf16 gathers and reductions, fp32 CPU copies (FSDP's sharded parameters)."""


def two_blocks(trainable: int = P, root_trainable: int = ROOT, opt: float = 0.005) -> RankWork:
    blocks = tuple(Unit(f"block {i}", P, trainable, FWD, BWD) for i in range(2))
    return RankWork(Unit("root", ROOT, root_trainable, 0.0, 0.0), blocks, opt)


def comm(work: RankWork, strategy: str, gpus: int, topo: Topology, wire: Wire = BF16,
         **knobs: object) -> object:
    sharding = Sharding(strategy, gpus, topo.gpus_per_node, **knobs)  # type: ignore[arg-type]
    return communication_time(work, sharding, topo, wire,
                              cpu_optimizer=cpu_optimizer_of(sharding, "adamw"))


def test_fsdp_exposes_the_first_gathers_and_the_last_reductions() -> None:
    topo = node()
    r = comm(two_blocks(), "fsdp", 4, topo)

    def t(kind: str, elements: int) -> float:
        return collective(kind, elements * 2, topo, 4).seconds  # bf16

    # forward: root and block 0 gathered before anything runs; block 1's gather hides behind
    # block 0. backward: block 1's gather is waited for (nothing to hide it), block 0's hides
    # behind block 1; the last two reduce-scatters (block 0, root) are waited for.
    assert t("all-gather", P) < FWD and t("reduce-scatter", P) < BWD
    exposed = (t("all-gather", ROOT) + t("all-gather", P) + t("all-gather", P)
               + t("reduce-scatter", P) + t("reduce-scatter", ROOT))
    assert r.exposed_seconds == pytest.approx(exposed)
    assert r.compute_seconds == pytest.approx(2 * FWD + 2 * BWD)
    assert r.optimizer_seconds == pytest.approx(0.005)  # the rank's shard, as given
    assert r.seconds == pytest.approx(r.compute_seconds + exposed + r.optimizer_seconds)
    assert r.bytes_of("all-gather") == (ROOT + 2 * P) * 2 + 2 * P * 2  # forward + backward
    assert r.bytes_of("reduce-scatter") == (ROOT + 2 * P) * 2
    assert sum(x.exposed for x in r.transfers) == pytest.approx(exposed)
    assert r.exposed_of("all-gather") + r.exposed_of("reduce-scatter") == pytest.approx(exposed)
    assert r.kinds == ("all-gather", "reduce-scatter")
    assert (r.intra_node, r.fabric, r.cpu_optimizer) == ("nvlink", "test", None)


def test_grad_op_keeps_parameters_from_forward_to_backward() -> None:
    topo = node()
    r = comm(two_blocks(), "fsdp-grad-op", 4, topo)
    assert r.bytes_of("all-gather") == (ROOT + 2 * P) * 2  # forward only
    ag = collective("all-gather", P * 2, topo, 4).seconds
    rs = collective("reduce-scatter", P * 2, topo, 4).seconds
    root_ag = collective("all-gather", ROOT * 2, topo, 4).seconds
    root_rs = collective("reduce-scatter", ROOT * 2, topo, 4).seconds
    assert r.exposed_seconds == pytest.approx(root_ag + ag + rs + root_rs)


def test_resharding_the_root_gathers_it_again_before_backward() -> None:
    topo = node()
    kept = comm(two_blocks(), "fsdp", 4, topo)
    again = comm(two_blocks(), "fsdp", 4, topo, fsdp=FsdpSettings(reshard_root=True))
    root_ag = collective("all-gather", ROOT * 2, topo, 4).seconds
    assert again.bytes_of("all-gather") == kept.bytes_of("all-gather") + ROOT * 2
    assert again.exposed_seconds == pytest.approx(kept.exposed_seconds + root_ag)


def test_zero3_gathers_without_prefetch_are_all_exposed() -> None:
    topo = node()
    r = comm(two_blocks(), "zero3", 4, topo, zero=ZeroSettings(prefetch_bucket_size=0))
    ag = collective("all-gather", P * 2, topo, 4).seconds
    root_ag = collective("all-gather", ROOT * 2, topo, 4).seconds
    rs = collective("reduce-scatter", P * 2, topo, 4).seconds
    root_rs = collective("reduce-scatter", ROOT * 2, topo, 4).seconds
    # every block's gather, forward and backward, is issued when it is needed
    assert r.exposed_seconds == pytest.approx(root_ag + 4 * ag + rs + root_rs)
    prefetched = comm(two_blocks(), "zero3", 4, topo)  # stage3_prefetch_bucket_size 5e7
    assert prefetched.exposed_seconds == pytest.approx(root_ag + 2 * ag + rs + root_rs)


def test_fsdp1_without_backward_prefetch_waits_for_each_backward_gather() -> None:
    topo = node()
    r = comm(two_blocks(), "fsdp", 4, topo, fsdp=FsdpSettings(version=1, backward_prefetch=False))
    ag = collective("all-gather", P * 2, topo, 4).seconds
    root_ag = collective("all-gather", ROOT * 2, topo, 4).seconds
    rs = collective("reduce-scatter", P * 2, topo, 4).seconds
    root_rs = collective("reduce-scatter", ROOT * 2, topo, 4).seconds
    # forward gathers still overlap (the CPU issues them ahead); backward ones do not
    assert r.exposed_seconds == pytest.approx(root_ag + ag + 2 * ag + rs + root_rs)


def test_lora_gathers_every_parameter_but_reduces_only_adapters() -> None:
    topo = node()
    adapters = 1_000_000
    r = comm(two_blocks(adapters, 0), "fsdp", 4, topo)
    assert r.bytes_of("reduce-scatter") == 2 * adapters * 2
    assert r.bytes_of("all-gather") == (ROOT + 2 * P) * 2 + 2 * P * 2
    ddp = comm(two_blocks(adapters, 0), "ddp", 4, topo)
    assert ddp.bytes_of("all-reduce") == 2 * adapters * 2 and ddp.bytes_of("all-gather") == 0


def test_ddp_hides_all_but_the_last_bucket() -> None:
    topo = node()
    fp32 = Wire(4, 4, 4)
    r = comm(two_blocks(root_trainable=0), "ddp", 4, topo, fp32,
             ddp=DdpSettings(bucket_cap_mb=4 * P / 2**20))  # a bucket per block
    ar = collective("all-reduce", 4 * P, topo, 4).seconds
    assert ar == pytest.approx(RING_BASE_LATENCY_S + 6 * NVL + 2 * 3 / 4 * 4 * P / (
        100e9 * BUS_EFFICIENCY))
    assert ar < BWD  # block 1's all-reduce hides behind block 0's backward
    assert r.exposed_seconds == pytest.approx(ar)
    assert r.optimizer_seconds == pytest.approx(0.005)
    assert [t.unit for t in r.transfers] == ["bucket 0", "bucket 1"]


def test_ddp_buckets_of_25_mib() -> None:
    topo = node()
    r = comm(two_blocks(root_trainable=0), "ddp", 4, topo)
    grads = 2 * P * 2
    assert len(r.transfers) == math.ceil(grads / (25 * 2**20))
    assert r.bytes_of("all-reduce") == grads


def test_zero2_without_overlap_waits_for_each_reduction_and_the_final_gather() -> None:
    topo = node()
    buckets = ZeroSettings(reduce_bucket_size=P)  # a bucket per block; overlap_comm off
    r = comm(two_blocks(root_trainable=0), "zero2", 4, topo, zero=buckets)
    rs = collective("reduce-scatter", P * 2, topo, 4).seconds
    ag = collective("all-gather", 2 * P * 2, topo, 4).seconds  # updated parameters, one bucket
    assert r.exposed_seconds == pytest.approx(2 * rs + ag)
    overlapped = comm(two_blocks(root_trainable=0), "zero2", 4, topo,
                      zero=ZeroSettings(reduce_bucket_size=P, overlap_comm=True))
    assert overlapped.exposed_seconds == pytest.approx(rs + ag)
    split = comm(two_blocks(root_trainable=0), "zero2", 4, topo,
                 zero=ZeroSettings(reduce_bucket_size=P, allgather_bucket_size=P))
    assert [t.nbytes for t in split.transfers if t.phase == "step"] == [P * 2, P * 2]


def test_zero_offload_copies_gradients_out_and_parameters_back() -> None:
    topo = node()
    r = comm(two_blocks(root_trainable=0), "zero2", 4, topo, offload="optimizer",
             zero=ZeroSettings(reduce_bucket_size=P, overlap_comm=True))
    shard = 2 * P // 4  # this rank's trainable elements
    cpu = shard * 4 / CPU_ADAM_PARAMS_PER_S  # four ranks share the node's CPU
    assert r.optimizer_seconds == pytest.approx(cpu) and r.cpu_optimizer == "deepspeed-cpu-adam"
    rs = collective("reduce-scatter", P * 2, topo, 4).seconds
    d2h = P * 2 / 4 / (10e9 * HOST_COPY_EFFICIENCY)
    h2d = shard * 2 / (10e9 * HOST_COPY_EFFICIENCY)
    ag = collective("all-gather", 2 * P * 2, topo, 4).seconds
    assert rs + d2h < BWD
    assert r.exposed_seconds == pytest.approx(rs + d2h + h2d + ag)
    assert r.bytes_of("device-to-host") == 2 * P * 2 // 4


def test_fsdp_parameter_offload_copies_every_shard_before_its_gather() -> None:
    topo = node()
    r = comm(two_blocks(), "fsdp", 4, topo, offload="params")
    copies = [t for t in r.transfers if t.op == "host-to-device"]
    assert len(copies) == 3 + 2  # root and two blocks in forward, two blocks in backward
    assert copies[0].nbytes == ROOT // 4 * 4  # fp32 shard of the root
    trainable = ROOT + 2 * P
    assert r.optimizer_seconds == pytest.approx(trainable / 4 * 4 / TORCH_CPU_ADAMW_PARAMS_PER_S)
    assert r.cpu_optimizer == "torch-adamw"
    assert r.bytes_of("device-to-host") == (ROOT + 2 * P) * 2 // 4


def test_hsdp_reduces_within_the_node_then_across_nodes() -> None:
    topo = node(8, 4)
    r = comm(two_blocks(), "hsdp", 8, topo)
    replica = [t for t in r.transfers if t.op == "all-reduce"]
    assert [t.nbytes for t in replica] == [P * 2 // 4, P * 2 // 4, ROOT * 2 // 4]
    ar = collective("all-reduce", P * 2 // 4, topo, 2, ranks_per_node=1)
    assert replica[0].seconds == pytest.approx(ar.seconds)
    assert ar.bus_bandwidth == pytest.approx(4 * 10e9 / 4 * BUS_EFFICIENCY)
    ag = [t for t in r.transfers if t.op == "all-gather"]
    assert ag[0].seconds == pytest.approx(collective("all-gather", ROOT * 2, topo, 4).seconds)


def test_one_gpu_is_compute_and_optimizer_only() -> None:
    r = comm(two_blocks(), "zero3", 1, node(1, 8))
    assert r.exposed_seconds == pytest.approx(0.0)
    assert r.seconds == pytest.approx(2 * FWD + 2 * BWD + 0.005)


def test_inference_gathers_forward_only() -> None:
    topo = node()
    sharding = Sharding("zero3", 4, 8)
    r = communication_time(two_blocks(0, 0), sharding, topo, BF16, inference=True)
    assert r.bytes_of("all-gather") == (ROOT + 2 * P) * 2 and r.bytes_of("reduce-scatter") == 0
    assert r.compute_seconds == pytest.approx(2 * FWD) and r.optimizer_seconds == 0.0


def test_slow_network_is_exposed_beyond_compute() -> None:
    slow = Topology(16, 8, 100e9, "nvlink", Fabric("slow", 0.1e9, 1), 10e9)
    r = comm(two_blocks(), "fsdp", 16, slow)
    ag = collective("all-gather", P * 2, slow, 16).seconds
    assert ag > 10 * FWD  # 0.1 GB/s for the whole node
    assert r.exposed_seconds > 4 * ag  # forward and backward wait on most gathers


# -- what a strategy moves, from the setup ----------------------------------------------------
def test_wire_follows_each_strategys_mixed_precision() -> None:
    from layerscope.setup import PRECISIONS

    mixed, pure = PRECISIONS["bf16-mixed"], PRECISIONS["bf16-true"]
    # DDP all-reduces each .grad in its own dtype (fp32 parameters, bf16 adapters alike)
    assert Wire.of(Sharding("ddp", 8), mixed) == Wire(4, 4, 4, grads_stored=True)
    # FSDP copies each CPU shard in its own dtype; FSDP2 reduces in the fp32 reduce_dtype
    assert Wire.of(Sharding("fsdp", 8), mixed) == Wire(2, 4, 4, offload_stored=True)
    assert Wire.of(Sharding("fsdp", 8, fsdp=FsdpSettings(version=1)), mixed) == Wire(
        2, 2, 4, offload_stored=True)
    assert Wire.of(Sharding("zero3", 8), mixed) == Wire(2, 2, 2)  # DeepSpeed's 16-bit module
    # FSDP2 without a policy reduces each gradient in its parameter's dtype
    assert Wire.of(Sharding("fsdp", 8), pure) == Wire(2, 2, 2, grads_stored=True,
                                                      offload_stored=True)
    assert Wire.of(Sharding("ddp", 8), PRECISIONS["32-true"]) == Wire(4, 4, 4, grads_stored=True)
    zero = Sharding("zero3", 8, offload="optimizer")
    assert cpu_optimizer_of(zero, "adamw") == "deepspeed-cpu-adam"
    assert cpu_optimizer_of(Sharding("fsdp", 8, offload="params"), "adamw-fused") == (
        "torch-adamw-fused")


# -- bad settings -----------------------------------------------------------------------------
def test_bad_units_work_and_mismatched_topology() -> None:
    with pytest.raises(EstimateError, match="trainable=5 exceeds params=4"):
        Unit("block 0", 4, 5, 0.0, 0.0)
    with pytest.raises(EstimateError, match="forward_seconds"):
        Unit("block 0", 4, 4, -1.0, 0.0)
    with pytest.raises(EstimateError, match="one time per block"):
        rank_work([], 2, forward=[1.0], backward=[1.0, 1.0])
    with pytest.raises(EstimateError, match=r"outside 0\.\.1"):
        rank_work([TensorInfo(4, (4,), 2, True, 5)], 2, forward=[0.0, 0.0], backward=[0.0, 0.0])
    with pytest.raises(EstimateError, match="topology has 4 GPUs"):
        communication_time(two_blocks(), Sharding("fsdp", 8), node(), BF16)
    with pytest.raises(EstimateError, match="needs a data-parallel Sharding"):
        communication_time(two_blocks(), Sharding(), node(1), BF16)
    with pytest.raises(EstimateError, match="unknown CPU optimizer"):
        communication_time(two_blocks(), Sharding("fsdp", 4), node(), BF16, cpu_optimizer="sgd")
    with pytest.raises(EstimateError, match="unknown fabric"):
        topology("h100", 16, fabric="token-ring")
    with pytest.raises(EstimateError, match="gpus_per_node"):
        topology("h100", 16, gpus_per_node=0)


def test_rank_work_sums_the_tensors_of_each_block() -> None:
    params = [TensorInfo(10, (10,), 2, True, None), TensorInfo(7, (7,), 2, False, 0),
              TensorInfo(5, (5,), 2, True, 0), TensorInfo(3, (3,), 2, True, 1),
              TensorInfo(2, (2,), 2, False, None)]
    work = rank_work(params, 2, forward=[0.1, 0.2], backward=[0.3, 0.4], root_forward=0.5,
                     root_backward=0.6, optimizer_seconds=0.7)
    assert [(u.params, u.trainable) for u in work.blocks] == [(12, 5), (3, 3)]
    assert (work.root.params, work.root.trainable) == (12, 10)
    assert work.compute_seconds == pytest.approx(0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6)
    assert work.optimizer_seconds == 0.7


def test_scan_tensors_of_a_tiny_llama_with_adapters() -> None:
    from conftest import LLAMA, build

    from layerscope.estimate.states import scan_tensors
    from layerscope.scan import scan
    from layerscope.setup import TrainingSetup

    model = build("llama", "meta")
    s = scan(model)
    d, ff, layers, vocab = 64, 128, 4, 100  # tests/conftest.py LLAMA
    assert (LLAMA["hidden_size"], LLAMA["intermediate_size"]) == (d, ff)
    kv = 2 * (d // 4)  # two of four heads for k and v
    block = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q, o, k, v, MLP, two norms
    trainable = set(s.block_names(1)) | {"model.norm.weight"}
    lora = TrainingSetup(model, lora=2, seq_len=64).lora
    adapters = 2 * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)  # r * (in + out), 7 Linears
    params = scan_tensors(s, trainable, lora)
    work = rank_work(params, layers, forward=[0.0] * 4, backward=[0.0] * 4)
    assert [u.params for u in work.blocks] == [block + adapters] * layers
    assert [u.trainable for u in work.blocks] == [adapters, block + adapters, adapters, adapters]
    assert work.root.params == 2 * vocab * d + d and work.root.trainable == d
    assert sum(p.itemsize == 4 for p in params) == len(params)  # fp32 base and adapters
    with pytest.raises(EstimateError, match="not in the model"):
        scan_tensors(s, {"nope"})


def test_fsdp1_reduces_each_units_whole_flat_gradient_when_any_of_it_trains() -> None:
    from layerscope import estimate_step_time
    from layerscope.estimate.states import fsdp1_grad_numel
    from tests.conftest import build

    llama = build("llama", "meta")
    # tiny Llama block: 36,992 base elements; LoRA r=8 on its 7 Linears adds 8,192
    # (q 1024, k and v 768, o 1024, gate/up/down 1536). With use_orig_params=True (the
    # default) each block's flat parameter has one gradient, 45,184 elements, reduced in bf16
    # (accelerate's reduce dtype under bf16-mixed); the root (embeddings, norm, head) is frozen
    block = 36992 + 1024 + 768 + 768 + 1024 + 3 * 1536
    assert block == 45184
    kw = dict(lora=8, seq_len=32, batch_size=2, distributed="fsdp", fsdp_version=1,
              num_gpus=2, gpu="h100", precision="bf16-mixed")
    comm = estimate_step_time(llama, **kw).communication
    assert comm is not None
    assert [t.nbytes for t in comm.transfers if t.op == "reduce-scatter"] == [block * 2] * 4
    # on a quantized base the HF Trainer wraps the adapters apart (use_orig_params=False):
    # only their 8,192 elements a block are reduced
    qlora = estimate_step_time(llama, **kw, quantization="nf4").communication
    assert qlora is not None
    assert [t.nbytes for t in qlora.transfers if t.op == "reduce-scatter"] == [8192 * 2] * 4
    # one rule for memory and time: tensors past the last block are the root's
    params = [TensorInfo(10, (10,), 4, True, 0), TensorInfo(6, (6,), 4, False, 0),
              TensorInfo(3, (3,), 4, True, 1), TensorInfo(5, (5,), 4, False, None)]
    assert fsdp1_grad_numel(params, 1, True) == [16, 8]
    assert fsdp1_grad_numel(params, 1, False) == [10, 3]
    with pytest.raises(EstimateError, match=r"reduced=17 exceeds params=16"):
        rank_work(params[:2], 1, forward=[0.0], backward=[0.0], reduced=[17, 0])
    with pytest.raises(EstimateError, match=r"one count per block and the root \(2\), got 1"):
        rank_work(params[:2], 1, forward=[0.0], backward=[0.0], reduced=[16])


def test_each_tensor_is_copied_and_reduced_in_its_stored_dtype() -> None:
    from layerscope import estimate_step_time
    from tests.conftest import build

    llama = build("llama", "meta")
    kw = dict(lora=8, seq_len=32, batch_size=2, num_gpus=2, gpu="h100", precision="bf16-mixed")
    # a block: 36,992 frozen base elements in bf16 and 8,192 fp32 adapter elements
    # (LoRA r=8 on its 7 Linears); the root: 12,864 frozen bf16 elements
    block = 36992 * 2 + 8192 * 4
    root = (160832 - 4 * 36992) * 2
    assert (block, root) == (106752, 25728)
    # FSDP2 with CPUOffload copies each rank's half of a unit to the GPU before its gather,
    # each tensor in its stored dtype
    fsdp = estimate_step_time(llama, **kw, base_dtype="bf16", distributed="fsdp",
                              offload="params").communication
    assert fsdp is not None
    copies = {(t.unit, t.nbytes) for t in fsdp.transfers if t.op == "host-to-device"}
    assert copies == {*((f"block {i}", block // 2) for i in range(4)), ("root", root // 2)}
    # DDP all-reduces bf16 adapters' .grad in bf16: 4 x 8,192 elements x 2 bytes
    ddp = estimate_step_time(llama, **kw, lora_dtype="bf16", distributed="ddp").communication
    assert ddp is not None
    assert ddp.bytes_of("all-reduce") == 4 * 8192 * 2
