"""Multiply-add counting: analytic NL counts, fused attention, the paper's Table 2e ratios, the
generic counter and the ``nonlocalnet flops`` command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nonlocalnet import NonLocal3d
from nonlocalnet.cli import main
from nonlocalnet.cli.flops import parse_input_size
from nonlocalnet.models import create_model, flops
from nonlocalnet.models.flops import count_flops, count_macs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product"])
def test_nl_block_macs_equal_analytic_count(pairwise, position):
    C, Cp, T, H, W = 16, 8, 4, 8, 8
    block = NonLocal3d(C, pairwise=pairwise, sub_sample=True, sub_sample_position=position)
    N, M = T * H * W, T * (H // 2) * (W // 2)
    report = count_flops(block, (1, C, T, H, W), device="cpu")
    theta = N * C * Cp
    kv_positions = N if position == "after" else M  # phi and g run before or after pooling
    phi = g = kv_positions * C * Cp
    out = N * Cp * C
    if pairwise == "embedded_gaussian":
        attention = N * M * Cp + N * M * Cp  # Q·Kᵀ and softmax(·)·V
    else:
        attention = M * Cp * Cp + N * Cp * Cp  # right to left: Kᵀ·V, then Q·(KᵀV)
    assert report.macs == theta + phi + g + attention + out
    assert report.params == sum(p.numel() for p in block.parameters())


def test_cpu_fused_attention_op_is_counted():
    B, H, N, M, d = 1, 2, 32, 16, 8
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, M, d), torch.randn(B, H, M, d)
    with FlopCounterMode(display=False) as counter:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    assert counter.get_total_flops() == 2 * (B * H * N * M * d) * 2  # 2 FLOPs per MAC, 2 products


def test_stage_table_adds_up():
    with torch.device("meta"):
        model = create_model("nl_c2d_r50")
    r = count_flops(model, (1, 3, 8, 112, 112))
    assert list(r.stages) == ["stem", "res2", "res3", "res4", "res5", "head"]
    assert sum(m for _, m in r.stages.values()) == r.macs
    assert sum(p for p, _ in r.stages.values()) == r.params  # stem (conv1, bn1) .. head
    assert sorted(r.blocks) == [
        "layer2.1.after",
        "layer2.3.after",
        "layer3.1.after",
        "layer3.3.after",
        "layer3.5.after",
    ]
    # NL blocks are counted inside their stage
    res3_blocks = sum(m for n, (_, m) in r.blocks.items() if n.startswith("layer2"))
    assert 0 < res3_blocks < r.stages["res3"][1]


def _ratios(names, size=(1, 3, 32, 224, 224)):
    reports = {}
    for name in names:
        with torch.device("meta"):
            reports[name] = count_flops(create_model(name), size)
    base = reports["c2d_r101"]
    return {n: (r.params / base.params, r.macs / base.macs) for n, r in reports.items()}


def test_table_2e_cost_ratios_r101():
    """The NL paper's Table 2e, relative to C2D R101 at 32x224x224, within ±0.1."""
    ratios = _ratios(["c2d_r101", "i3d_r101_3x3x3", "i3d_r101", "nl_c2d_r101"])
    paper = {"i3d_r101_3x3x3": (1.5, 1.8), "i3d_r101": (1.2, 1.5), "nl_c2d_r101": (1.2, 1.2)}
    for name, (p, f) in paper.items():
        got_p, got_f = ratios[name]
        assert abs(got_p - p) <= 0.1, (name, got_p)
        assert abs(got_f - f) <= 0.1, (name, got_f)


def test_flops_subcommand(capsys):
    assert main(["flops", "nl_c2d_tiny", "--input", "3x8x32x32"]) == 0
    out = capsys.readouterr().out
    assert "res3" in out and "layer2.0.after" in out and "multiply-adds" in out
    assert main(["flops", "c2d_tiny", "--json", "--set", "num_classes=4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["input_size"] == [1, 3, 8, 32, 32]  # the model's default input
    assert line["stages"]["head"][0] == 64 * 4 + 4
    assert main(["flops", "c2d_tiny", "--input", "3by8"]) == 2
    assert parse_input_size("3x32x224x224") == (3, 32, 224, 224)


def test_count_macs_of_modules_and_callables():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    assert count_macs(lin, x) == 2 * 8 * 4
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(1, 3, 6, 6)) == 6 * 6 * 5 * 3 * 9
    # a training step: forward + the weight gradient (x needs no gradient)
    assert count_macs(lambda t: lin(t).sum().backward(), x) == 2 * (2 * 8 * 4)
    # with the input gradient too: three products of the same size
    xg = torch.randn(2, 8, requires_grad=True)
    assert count_macs(lambda t: lin(t).sum().backward(), xg) == 3 * (2 * 8 * 4)
    # several inputs, any callable; elementwise work is not counted
    a, b = torch.randn(3, 4), torch.randn(4, 6)
    assert count_macs(lambda p, q: (p @ q).relu().sum(), a, b) == 3 * 4 * 6
    with pytest.raises(TypeError, match="must be a module or a callable, got int"):
        count_macs(3, x)


def test_count_macs_agrees_with_count_flops_and_counts_fused_attention():
    block = NonLocal3d(16, pairwise="embedded_gaussian", sub_sample=True, device="meta").eval()
    x = torch.zeros(1, 16, 4, 8, 8, device="meta")
    with torch.no_grad():
        macs = count_macs(block, x)
    assert macs == count_flops(block, tuple(x.shape)).macs
    N, M, Cp = 4 * 8 * 8, 4 * 4 * 4, 8
    assert macs > 2 * N * M * Cp  # the attention products are in the count


def test_flops_module_counts_only():
    assert not hasattr(flops, "add_arguments") and not hasattr(flops, "run")
    assert set(flops.__all__) == {"FlopReport", "count_flops", "count_macs"}


def test_the_deep_stem_in_the_cost_and_the_stage_features() -> None:
    """ResNetV1c (mmseg's deep stem: 3→32→32→64 3×3 convs, the first strided): its stem is
    counted as the stem, and its stages keep the output strides 4..32."""
    from nonlocalnet.models import create_model

    deep = count_flops(create_model("resnet50", deep_stem=True), (1, 3, 224, 224), device="cpu")
    plain = count_flops(create_model("resnet50"), (1, 3, 224, 224), device="cpu")
    # 3·32·9 + 32·32·9 + 32·64·9 convs and three BNs (2·(32 + 32 + 64)) against 3·64·49 + 2·64
    assert deep.stages["stem"][0] == 864 + 9216 + 18432 + 256 and plain.stages["stem"][0] == 9536
    assert deep.params - plain.params == deep.stages["stem"][0] - plain.stages["stem"][0]
    # stem convs at 112×112: (864 + 9216 + 18432)·112², against the 7×7 conv's 9408·112²
    assert deep.stages["stem"][1] - plain.stages["stem"][1] == (28512 - 9408) * 112 * 112
    features = create_model("resnet50", deep_stem=True, features_only=True)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
