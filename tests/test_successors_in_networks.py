"""The successor blocks in the zoo's networks: segmentation heads, and DNL / criss-cross placed
as NL blocks are in video, image and detection backbones."""

from __future__ import annotations

import pytest
import torch

from nonlocalnet.layers import EMAU, CrissCrossAttention, DisentangledNonLocalNd, EfficientAttention
from nonlocalnet.models import (
    check_identity,
    create_model,
    inserted_blocks,
    model_info,
    without_blocks,
)

HEADS = {"dnl": DisentangledNonLocalNd, "ccnet": CrissCrossAttention, "ema": EMAU,
         "effattn": EfficientAttention}  # fmt: skip


@pytest.mark.parametrize("prefix", sorted(HEADS))
@pytest.mark.parametrize("depth", [50, 101])
def test_segmentation_heads_are_registered_with_their_papers(prefix: str, depth: int) -> None:
    info = model_info(f"{prefix}_r{depth}_os8")
    assert info.task == "segmentation" and "Published" in info.doc
    with torch.device("meta"):
        model = create_model(f"{prefix}_r{depth}_os8")
    blocks = [m for m in model.modules() if isinstance(m, HEADS[prefix])]
    assert len(blocks) == 1 and blocks[0].channels == 512
    assert model.head.conv_cat is not None  # mmseg's concat_input heads


@pytest.mark.parametrize("prefix", sorted(HEADS))
def test_a_small_segmentation_head_trains_a_step(prefix: str) -> None:
    torch.manual_seed(0)
    model = create_model(
        f"{prefix}_r50_os8", block="basic", layers=(1, 1, 1, 1), widths=(8, 16, 32, 64),
        stem_channels=8, head_channels=16, num_classes=3,
    )  # fmt: skip
    x = torch.randn(2, 3, 48, 64)
    out = model(x)
    assert out["out"].shape == (2, 3, 48, 64) and out["aux"].shape == (2, 3, 48, 64)
    loss = out["out"].logsumexp(1).mean() + out["aux"].logsumexp(1).mean()
    loss.backward()
    block = next(m for m in model.modules() if isinstance(m, HEADS[prefix]))
    grads = [p.grad for p in block.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("name", "cls"), [("dnl", DisentangledNonLocalNd), ("cca", CrissCrossAttention)]
)
def test_dnl_and_criss_cross_placed_as_nl_in_a_video_network(name: str, cls: type) -> None:
    torch.manual_seed(0)
    model = create_model("nl_c2d_tiny", nonlocal_block=name).eval()
    blocks = inserted_blocks(model)
    assert sorted(blocks) == ["layer2.0.after", "layer3.0.after"]  # the NL placement, as data
    assert all(isinstance(b, cls) and b.dims == 3 for b in blocks.values())
    # fresh blocks leave the output as it was (the backbone with the blocks removed, same weights)
    check_identity(without_blocks(model), model, torch.randn(1, 3, 8, 32, 32))


@pytest.mark.parametrize("name", ["dnl", "cca"])
def test_dnl_and_criss_cross_in_a_detector(name: str) -> None:
    torch.manual_seed(0)
    base = create_model("maskrcnn_tiny", num_classes=3).eval()
    model = create_model("nl_maskrcnn_tiny", num_classes=3, blocks=name).eval()
    placed = [
        m for m in model.modules() if isinstance(m, (DisentangledNonLocalNd, CrissCrossAttention))
    ]
    assert len(placed) == 1
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".after." in k for k in missing)
    images = [torch.rand(3, 96, 112)]
    with torch.no_grad():
        a, b = base(images)[0], model(images)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


@pytest.mark.parametrize(("name", "kind"), [("dnl", "pairwise"), ("cca", "pairwise"),
                                            ("ema", "bases"), ("effattn", "pairwise")])  # fmt: skip
def test_successors_are_drawn_and_analysed(tmp_path, name: str, kind: str) -> None:
    from nonlocalnet.layers import create_block
    from nonlocalnet.viz.analyze import analyze_model
    from nonlocalnet.viz.visualize import draw_model_attention

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), create_block(name, 16)).eval()
    x = torch.randn(3, 9, 11)
    summary = draw_model_attention(model, x, num_queries=1, k=4, out_dir=tmp_path)
    entry = summary["blocks"][0]
    assert entry["kind"] == kind and (tmp_path / "summary.json").is_file()
    weights = entry["queries"][0]["topk_weights"]
    assert weights == sorted(weights, reverse=True) and 0 < weights[0] <= 1
    rows = analyze_model(model, [x], num_pairs=30)
    assert rows[0]["block"] == "1" and 0.0 <= rows[0]["attention_mean"] <= 2.0


def test_ema_weights_over_positions_by_hand() -> None:
    torch.manual_seed(0)
    block = EMAU(8, num_bases=4, zero_init=False).eval().double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    z = block.attention_map(x)  # (B, N, K)
    w = block.attention_map(x, queries=[3, 17], over="positions")  # (B, 2, N)
    for b in range(2):
        for r, i in enumerate((3, 17)):
            for j in range(30):
                expected = sum(
                    z[b, i, k] * z[b, j, k] / (1e-6 + z[b, :, k].sum()) for k in range(4)
                )
                assert abs(float(w[b, r, j] - expected)) < 1e-12
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, dtype=torch.float64), atol=1e-5)
    layout = block.layout((5, 6))
    assert layout.kind == "bases" and layout.num_bases == 4 and layout.num_keys == 30


@pytest.mark.parametrize("name", ["dnl", "dnl_dot", "cca", "ema", "effattn"])
def test_successor_blocks_refuse_another_dtype_or_device(name: str) -> None:
    from nonlocalnet.layers.registry import create_block

    block = create_block(name, 16).eval()
    cls = type(block).__name__
    with pytest.raises(
        TypeError, match=rf"^{cls}: input dtype torch\.float64 differs from the parameters' "
    ):
        block(torch.randn(1, 16, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"^{cls}: input is on meta, the parameters on cpu"):
        block(torch.empty(1, 16, 6, 6, device="meta"))
    # under a bfloat16 autocast the float32 block takes a bfloat16 map, as autocast casts it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(1, 16, 6, 6, dtype=torch.bfloat16))
    assert out.shape == (1, 16, 6, 6) and torch.isfinite(out.float()).all()
