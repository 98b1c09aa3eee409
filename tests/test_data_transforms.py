"""Spatial transforms: exact crop positions, sizes, determinism, normalisation, joint transforms."""

from __future__ import annotations

import pytest
import torch

from nonlocalnet.data.transforms import (
    CenterCrop,
    JointHorizontalFlip,
    JointRandomCrop,
    JointRandomScale,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ShortSideScale,
    ThreeCrop,
    resize,
    short_side_size,
    video_test_transform,
    video_train_transform,
)


def coords(c: int, t: int, h: int, w: int) -> torch.Tensor:
    """(C, T, H, W) float tensor whose value at (y, x) is 1000 * y + x."""
    y = torch.arange(h).view(h, 1) * 1000.0
    x = torch.arange(w).view(1, w).float()
    return (y + x).expand(c, t, h, w).clone()


def corner(crop: torch.Tensor) -> tuple[int, int]:
    """(top, left) of a crop of a `coords` tensor."""
    v = int(crop[..., 0, 0].flatten()[0])
    return v // 1000, v % 1000


def test_three_crop_landscape_and_portrait_positions() -> None:
    crops = ThreeCrop(4)(coords(3, 2, 6, 10))
    assert crops.shape == (3, 3, 2, 4, 4)
    assert [corner(c) for c in crops] == [(1, 0), (1, 3), (1, 6)]  # left, centre, right
    crops = ThreeCrop(4)(coords(3, 2, 11, 5))
    assert [corner(c) for c in crops] == [(0, 0), (3, 0), (7, 0)]  # top, centre, bottom
    assert torch.equal(crops[2], coords(3, 2, 11, 5)[..., 7:11, 0:4])
    one = ThreeCrop(4, num_crops=1)(coords(3, 2, 6, 10))
    assert one.shape == (1, 3, 2, 4, 4) and corner(one[0]) == (1, 3)
    with pytest.raises(ValueError, match="crop size 8x8 larger than the input 6x10"):
        ThreeCrop(8)(coords(1, 1, 6, 10))


def test_center_and_random_crop() -> None:
    x = coords(3, 2, 9, 12)
    assert corner(CenterCrop(5)(x)) == (2, 3)
    seen = {
        corner(RandomCrop(5)(x, generator=torch.Generator().manual_seed(s))) for s in range(300)
    }
    assert seen == {(t, l) for t in range(5) for l in range(8)}
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(RandomCrop(5)(x, generator=g1), RandomCrop(5)(x, generator=g2))


def test_short_side_scale_sizes_and_values() -> None:
    assert short_side_size(240, 320, 256) == (256, 341)
    assert short_side_size(320, 240, 256) == (341, 256)
    x = torch.full((3, 2, 30, 40), 77, dtype=torch.uint8)
    out = ShortSideScale(15)(x)
    assert out.shape == (3, 2, 15, 20) and out.dtype == torch.uint8 and bool((out == 77).all())
    sizes = {
        ShortSideScale((10, 13))(x, generator=torch.Generator().manual_seed(s)).shape[-2]
        for s in range(100)
    }
    assert sizes == {10, 11, 12, 13}
    # the native uint8 kernel agrees with the float computation to one grey level
    video = torch.randint(0, 256, (3, 4, 30, 40), dtype=torch.uint8)
    for size in [(20, 27), (45, 60)]:
        fast = resize(video, size)
        slow = resize(video.float(), size).round().clamp(0, 255)
        assert fast.dtype == torch.uint8 and fast.shape == (3, 4, *size)
        assert (fast.float() - slow).abs().max() <= 1
    # bilinear (half-pixel centres) doubling of [0, 4] along the width
    row = torch.tensor([[[0.0, 4.0]]])
    assert torch.allclose(resize(row, (1, 4)), torch.tensor([[[0.0, 1.0, 3.0, 4.0]]]))


def test_flip_and_normalize_values() -> None:
    x = coords(3, 1, 2, 3)
    always, never = RandomHorizontalFlip(1.0), RandomHorizontalFlip(0.0)
    assert torch.equal(always(x)[..., 0], x[..., 2]) and torch.equal(never(x), x)
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 1, 1)
    out = Normalize(mean=(0.0, 0.1, 0.5), std=(1.0, 0.5, 0.25))(u8)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, (0.2 - 0.1) / 0.5, (1.0 - 0.5) / 0.25]))
    with pytest.raises(ValueError, match="Normalize expects 3 channels in dim 0, got 2"):
        Normalize()(torch.zeros(2, 1, 4, 4))


def test_video_pipelines_deterministic_given_generator() -> None:
    video = torch.randint(0, 256, (3, 4, 36, 48), dtype=torch.uint8)
    train = video_train_transform(short_side=(36, 44), crop_size=32)
    a = train(video, generator=torch.Generator().manual_seed(1))
    b = train(video, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 4, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    outs = {train(video, generator=torch.Generator().manual_seed(s)).sum().item() for s in range(8)}
    assert len(outs) > 1
    test = video_test_transform(short_side=24, crop_size=24, mean=(0, 0, 0), std=(1, 1, 1))
    views = test(video)
    assert views.shape == (3, 3, 4, 24, 24)
    scaled = resize(video, (24, 32)).float() / 255
    assert torch.allclose(views[2], scaled[..., :, 8:32])  # right crop


def test_random_resized_crop_window() -> None:
    rrc = RandomResizedCrop(8, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    for s in range(20):
        top, left, h, w = rrc.window(40, 40, torch.Generator().manual_seed(s))
        assert (h, w) == (20, 20) and 0 <= top <= 20 and 0 <= left <= 20
    out = rrc(coords(3, 1, 40, 40).squeeze(1), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 8, 8)
    # impossible ratio falls back to a centre crop of the clamped ratio
    assert RandomResizedCrop(4, ratio=(3.0, 3.0), scale=(1.0, 1.0)).window(10, 10, None) == (
        3,
        0,
        3,
        10,
    )


def test_joint_transforms_keep_image_and_mask_aligned() -> None:
    h, w = 12, 16
    image = coords(1, 1, h, w).view(1, h, w)
    mask = (image[0] % 7).long()  # a label that is a function of the pixel's coordinates
    g = torch.Generator().manual_seed(0)
    img2, mask2 = JointHorizontalFlip(1.0)(image, mask, generator=g)
    assert torch.equal((img2[0] % 7).long(), mask2)
    img3, mask3 = JointRandomScale((2.0, 2.0))(image, mask, generator=g)
    assert img3.shape == (1, 24, 32) and mask3.shape == (24, 32)
    assert mask3.dtype == torch.long and torch.equal(mask3[::2, ::2], mask)  # nearest: exact labels
    img4, mask4 = JointRandomCrop((20, 10), ignore_index=255)(image, mask, generator=g)
    assert img4.shape == (1, 20, 10) and mask4.shape == (20, 10)
    assert bool((mask4[12:] == 255).all()) and bool((img4[0, 12:] == 0).all())  # padded rows
    valid = mask4[:12] != 255
    assert torch.equal((img4[0, :12][valid] % 7).long(), mask4[:12][valid])
