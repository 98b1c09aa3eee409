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
