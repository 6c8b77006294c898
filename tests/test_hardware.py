import pytest

from layerscope.errors import EstimateError
from layerscope.estimate.hardware import GPU, get_gpu, gpus


def test_catalogue_has_the_issue_gpus():
    assert {"h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l40s", "l4", "a10g",
            "rtx-4090"} <= set(gpus())
    assert gpus() == sorted(gpus())


def test_every_gpu_has_memory_bf16_fp32_and_bandwidth():
    for name in gpus():
        g = get_gpu(name)
        assert g.memory_bytes > 16 * 2**30 and g.memory_bandwidth > 1e11 and g.sm_count > 0
        assert g.peak("bf16") > g.peak("fp32") > 0  # tensor cores beat CUDA cores
        assert g.price_per_hour is None or g.price_per_hour > 0


def test_h100_sxm_datasheet_figures():
    g = get_gpu("h100-sxm")
    assert g.memory_bytes == 81559 * 2**20  # nvidia-smi on an H100 80GB HBM3
    assert g.peak("bf16") == 989.4e12  # dense: half the 1979 TFLOP/s "with sparsity"
    assert g.peak("fp32") == 66.9e12 and g.memory_bandwidth == 3.35e12


@pytest.mark.parametrize("alias", ["H100", "h100 sxm", "NVIDIA H100 80GB HBM3", "H100_SXM5"])
def test_names_are_case_insensitive_with_aliases(alias):
    assert get_gpu(alias).name == "h100-sxm"


def test_aliases_of_other_gpus():
    assert get_gpu("RTX 4090").name == "rtx-4090"
    assert get_gpu("A100").name == "a100-80gb"
    g = get_gpu("l4")
    assert get_gpu(g) is g


def test_unknown_gpu_lists_known_and_suggests_close():
    with pytest.raises(EstimateError, match=r"unknown GPU 'h10'.*did you mean h100-sxm.*known: a100-40gb"):
        get_gpu("h10")
    with pytest.raises(ValueError, match="known:"):
        get_gpu("tpu-v5")
    with pytest.raises(EstimateError, match="str"):
        get_gpu(3)  # type: ignore[arg-type]


def test_missing_dtype_and_price_override():
    g = get_gpu("a10g")
    with pytest.raises(EstimateError, match="fp8.*known: bf16"):
        g.peak("fp8")
    assert g.with_price(0.5).price_per_hour == 0.5 and g.price_per_hour == 1.006
    assert g.with_price(None).price_per_hour is None
    for bad in (-1.0, float("inf"), "2", True):
        with pytest.raises(EstimateError, match="price_per_hour"):
            g.with_price(bad)  # type: ignore[arg-type]
    assert isinstance(g, GPU) and hash(g) == hash(get_gpu("a10g"))


def test_interconnect_datasheet_figures():
    from layerscope.estimate.hardware import get_fabric

    h100 = get_gpu("h100-sxm")
    assert h100.nvlink_bandwidth == 900e9 / 2  # NVLink4: 900 GB/s bidirectional
    assert h100.pcie_generation == 5 and h100.pcie_bandwidth == 128e9 / 2
    assert h100.intra_node_bandwidth == h100.nvlink_bandwidth
    a100 = get_gpu("a100-80gb")
    assert a100.nvlink_bandwidth == 600e9 / 2 and a100.pcie_bandwidth == 64e9 / 2
    card = get_gpu("rtx-4090")  # no NVLink: GPUs of a node talk over PCIe
    assert card.nvlink_bandwidth is None and card.intra_node_bandwidth == 64e9 / 2
    ndr = get_fabric(h100.fabric or "")
    assert ndr.name == "infiniband-ndr" and ndr.nic_bandwidth == 400e9 / 8  # 400 Gb/s
    assert ndr.node_bandwidth(8) == 8 * 50e9  # one adapter per GPU
    eth = get_fabric(card.fabric or "")
    assert eth.node_bandwidth(8) == eth.node_bandwidth(2) == 100e9 / 8  # one adapter per node


def test_every_gpu_has_an_interconnect_and_a_known_fabric():
    from layerscope.estimate.hardware import fabrics

    for name in gpus():
        g = get_gpu(name)
        assert g.pcie_generation in (4, 5) and g.pcie_bandwidth
        assert g.fabric in fabrics()


def test_unknown_fabric_and_bad_node_size():
    from layerscope.estimate.hardware import Fabric, get_fabric

    with pytest.raises(EstimateError, match=r"unknown fabric 'myrinet'.*known: ethernet-100g"):
        get_fabric("myrinet")
    with pytest.raises(EstimateError, match="str"):
        get_fabric(400)  # type: ignore[arg-type]
    custom = Fabric("lab", nic_bandwidth=10e9, nics_per_node=2)
    assert get_fabric(custom) is custom and custom.node_bandwidth(8) == 20e9
    for bad in (0, -1, 2.5, True):
        with pytest.raises(EstimateError, match="gpus_per_node"):
            custom.node_bandwidth(bad)  # type: ignore[arg-type]
