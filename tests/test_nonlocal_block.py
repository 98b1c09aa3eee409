"""NonLocal1d/2d/3d: fast == reference == the paper's formula, identity at init, maps, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import nonlocalnet.functional
import nonlocalnet.layers.nonlocal_block
from nonlocalnet import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalNd
from nonlocalnet.functional import PAIRWISE
from nonlocalnet.layers.nonlocal_block import NL_PAIRWISE

DT = torch.float64
C, CI = 6, 4
CLASSES = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}
#: odd sizes, so that sub-sampling rounds (M = ceil(H/2)·ceil(W/2)...)
SIZES = {1: (7,), 2: (5, 3), 3: (3, 3, 5)}
#: (dims, extent)
LAYOUTS = [(1, "spacetime"), (2, "spacetime"), (3, "spacetime"), (3, "space"), (3, "time")]
#: (sub_sample, sub_sample_position)
SUBSAMPLING = [(False, "after"), (False, "before"), (True, "after"), (True, "before")]
#: the peers' rounding (floor), checked against the same oracles on the odd SIZES
FLOOR_SIZES = {1: (7,), 2: (5, 7), 3: (3, 5, 7)}


def _scales(pairwise: str) -> list[bool | None]:
    return [None, True, False] if "gaussian" in pairwise else [None, False]


def _configs() -> list[tuple]:
    return [
        (pw, dims, extent, sub, pos, use_scale)
        for pw in PAIRWISE
        for (dims, extent), (sub, pos) in itertools.product(LAYOUTS, SUBSAMPLING)
        for use_scale in _scales(pw)
    ]


def _floor_configs() -> list[tuple]:
    return [
        (pw, dims, extent, pos)
        for pw in PAIRWISE
        for (dims, extent) in LAYOUTS
        for pos in ("after", "before")
    ]


def _make(
    pairwise: str,
    dims: int,
    extent: str = "spacetime",
    sub: bool = False,
    pos: str = "after",
    use_scale: bool | None = None,
    impl: str = "fast",
    **kw,
):
    kwargs = {"extent": extent} if dims == 3 else {}
    return CLASSES[dims](
        C,
        CI,
        pairwise=pairwise,
        use_scale=use_scale,
        sub_sample=sub,
        sub_sample_position=pos,
        impl=impl,
        dtype=DT,
        **kwargs,
        **kw,
    )


def _randomize(block: torch.nn.Module) -> None:
    """Random non-zero weights of a size that keeps every softmax far from one-hot."""
    with torch.no_grad():
        for p in block.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in))


def _input(dims: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, C, *SIZES[dims], dtype=DT)


def _outputs_and_grads(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = block(x)
    grads = torch.autograd.grad(out, [x, *block.parameters()], grad)
    return torch.cat([t.reshape(-1) for t in (out, *grads)])  # (total,)


# -- fast == reference ------------------------------------------------------------------------


@pytest.mark.parametrize(("pairwise", "dims", "extent", "sub", "pos", "use_scale"), _configs())
def test_fast_equals_reference(pairwise, dims, extent, sub, pos, use_scale) -> None:
    fast = _make(pairwise, dims, extent, sub, pos, use_scale, zero_init=False)
    _randomize(fast)
    ref = _make(pairwise, dims, extent, sub, pos, use_scale, impl="reference")
    ref.load_state_dict(fast.state_dict())
    x = _input(dims)
    grad = torch.randn_like(x)
    got = _outputs_and_grads(fast, x, grad)
    want = _outputs_and_grads(ref, x, grad)
    err = float((got - want).detach().norm() / want.detach().norm())
    assert err <= 1e-10
    # and the residual branch is not trivially zero
    assert float((fast(x) - x).abs().max()) > 1e-2


@pytest.mark.parametrize(("pairwise", "dims", "extent", "pos"), _floor_configs())
def test_fast_equals_reference_floor_rounding(pairwise, dims, extent, pos) -> None:
    kw = {"sub_sample_rounding": "floor", "zero_init": False}
    fast = _make(pairwise, dims, extent, True, pos, **kw)
    _randomize(fast)
    ref = _make(pairwise, dims, extent, True, pos, impl="reference", **kw)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, C, *FLOOR_SIZES[dims], dtype=DT)
    grad = torch.randn_like(x)
    got = _outputs_and_grads(fast, x, grad)
    want = _outputs_and_grads(ref, x, grad)
    assert float((got - want).detach().norm() / want.detach().norm()) <= 1e-10


def test_config_count() -> None:
    """Every pairwise × layout × sub-sampling × scale choice is covered."""
    assert len(_configs()) == 5 * 4 * (3 + 3 + 2 + 2)


# -- reference == the paper's formula, written out independently -------------------------------


def _conv1x1(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])  # (out, in)
    y = torch.einsum("oc,bc...->bo...", w, x)
    if conv.bias is not None:
        y = y + conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    return y


def _maxpool(x: torch.Tensor, dims: int, rounding: str = "ceil") -> torch.Tensor:
    """Max over windows of 2 (1d), 2×2 (2d), 1×2×2 (3d); partial last windows kept (ceil) or
    dropped (floor)."""
    spatial = x.shape[2:]
    steps = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dims]
    rnd = math.ceil if rounding == "ceil" else math.floor
    out_size = [rnd(s / k) for s, k in zip(spatial, steps, strict=True)]
    out = torch.empty(*x.shape[:2], *out_size, dtype=x.dtype)
    for idx in itertools.product(*(range(s) for s in out_size)):
        window = tuple(slice(i * k, i * k + k) for i, k in zip(idx, steps, strict=True))
        out[(slice(None), slice(None), *idx)] = x[(slice(None), slice(None), *window)].amax(
            dim=tuple(range(2, 2 + dims))
        )
    return out


def _paper_block(block, x: torch.Tensor, pairwise: str, use_scale, extent: str) -> torch.Tensor:
    """z = BN(W_z y) + x with y_i = 1/C(x) Σ_j f(x_i, x_j) g(x_j), one query at a time."""
    dims = x.dim() - 2
    sub, pos = block.sub_sample, block.sub_sample_position
    rounding = block.sub_sample_rounding
    pool = (lambda t: _maxpool(t, dims, rounding)) if sub else (lambda t: t)
    xk = pool(x) if pos == "before" else x
    g = _conv1x1(block.g, xk)
    g = pool(g) if pos == "after" else g
    if pairwise == "gaussian":
        theta, phi = x, pool(x)
        scale = C**-0.5 if use_scale else 1.0
    else:
        theta = _conv1x1(block.theta, x)
        phi = _conv1x1(block.phi, xk)
        phi = pool(phi) if pos == "after" else phi
        scale = CI**-0.5 if use_scale in (None, True) else 1.0
    size, ksize = x.shape[2:], g.shape[2:]
    y = torch.zeros(x.shape[0], CI, *size, dtype=x.dtype)
    for b in range(x.shape[0]):
        for i in itertools.product(*(range(s) for s in size)):
            # key positions j seen by query i
            if extent == "space":
                keys = [(i[0], *j) for j in itertools.product(*(range(s) for s in ksize[1:]))]
            elif extent == "time":
                # the pixel's own cell; with floor rounding, past the last full window, the last
                hw = (min(i[1] // 2, ksize[1] - 1), min(i[2] // 2, ksize[2] - 1)) if sub else i[1:]
                keys = [(t, *hw) for t in range(ksize[0])]
            else:
                keys = list(itertools.product(*(range(s) for s in ksize)))
            ti = theta[(b, slice(None), *i)]
            fs = []
            for j in keys:
                pj = phi[(b, slice(None), *j)]
                if pairwise in ("gaussian", "embedded_gaussian"):
                    fs.append(torch.exp(scale * torch.dot(ti, pj)))
                elif pairwise == "dot_product":
                    fs.append(torch.dot(ti, pj))
                else:  # ReLU(w_fᵀ [θ(x_i); φ(x_j)]), the literal concatenation
                    w_f = block.concat_project.weight.reshape(-1)  # (2C',)
                    fs.append(torch.relu(torch.dot(w_f, torch.cat([ti, pj]))))
            f = torch.stack(fs)  # (M,)
            norm = f.sum() if "gaussian" in pairwise else len(keys)
            gj = torch.stack([g[(b, slice(None), *j)] for j in keys])  # (M, C')
            y[(b, slice(None), *i)] = (f[:, None] * gj).sum(0) / norm
    wz = _conv1x1(block.conv_out, y)
    # BatchNorm in training mode: batch statistics, biased variance.
    axes = [0, *range(2, x.dim())]
    mean = wz.mean(dim=axes, keepdim=True)
    var = wz.var(dim=axes, unbiased=False, keepdim=True)
    shape = (1, -1, *([1] * dims))
    bn = block.norm
    z = (wz - mean) / torch.sqrt(var + bn.eps) * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return z + x


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize(("dims", "extent"), LAYOUTS)
@pytest.mark.parametrize(
    ("sub", "pos", "rounding"),
    [
        (False, "after", "ceil"),
        (True, "after", "ceil"),
        (True, "before", "ceil"),
        (True, "after", "floor"),
        (True, "before", "floor"),
    ],
)
def test_reference_equals_paper_formula(pairwise, dims, extent, sub, pos, rounding) -> None:
    for use_scale in _scales(pairwise)[:2]:
        block = _make(
            pairwise,
            dims,
            extent,
            sub,
            pos,
            use_scale,
            impl="reference",
            sub_sample_rounding=rounding,
        )
        _randomize(block)
        x = _input(dims) if rounding == "ceil" else torch.randn(2, C, *FLOOR_SIZES[dims], dtype=DT)
        with torch.no_grad():
            got = block(x)
            want = _paper_block(block, x, pairwise, use_scale, extent)
        assert float((got - want).norm() / want.norm()) <= 1e-12


@pytest.mark.parametrize(
    ("pairwise", "use_scale", "expected"),
    [
        ("embedded_gaussian", None, CI**-0.5),
        ("embedded_gaussian", True, CI**-0.5),
        ("embedded_gaussian", False, 1.0),
        ("gaussian", None, 1.0),
        ("gaussian", True, C**-0.5),
        ("gaussian", False, 1.0),
        ("dot_product", None, 1.0),
        ("concatenation", False, 1.0),
    ],
)
def test_scale(pairwise, use_scale, expected) -> None:
    assert _make(pairwise, 2, use_scale=use_scale).scale == pytest.approx(expected, rel=1e-15)


# -- sub-sampling rounds up -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "extent", "size", "n", "m"),
    [
        (1, "spacetime", (7,), 7, 4),
        (1, "spacetime", (1,), 1, 1),
        (2, "spacetime", (5, 3), 15, 3 * 2),
        (2, "spacetime", (1, 9), 9, 1 * 5),
        (3, "spacetime", (3, 5, 3), 45, 3 * 3 * 2),
        (3, "space", (3, 5, 3), 15, 3 * 2),
        (3, "time", (3, 5, 3), 3, 3),
    ],
)
@pytest.mark.parametrize("pos", ["after", "before"])
@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_subsampled_key_count_is_ceil(dims, extent, size, n, m, pos, pairwise) -> None:
    block = _make(pairwise, dims, extent, True, pos)
    x = torch.randn(2, C, *size, dtype=DT)
    q, k, v = block.embed(x)
    assert q.shape[1] == n
    assert k.shape[1] == m
    assert v.shape[1] == m
    assert block(x).shape == x.shape
    assert block.attention_map(x).shape[1:] == (n, m)


@pytest.mark.parametrize(
    ("dims", "extent", "size", "n", "m"),
    [
        (1, "spacetime", (7,), 7, 3),
        (2, "spacetime", (7, 9), 63, 3 * 4),
        (2, "spacetime", (2, 9), 18, 1 * 4),
        (3, "spacetime", (3, 7, 9), 189, 3 * 3 * 4),
        (3, "space", (3, 7, 9), 63, 3 * 4),
        (3, "time", (3, 7, 9), 3, 3),
        (3, "spacetime", (1, 2, 2), 4, 1),  # time is never pooled: T = 1 is fine
    ],
)
@pytest.mark.parametrize("pos", ["after", "before"])
@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_subsampled_key_count_is_floor_with_floor_rounding(
    dims, extent, size, n, m, pos, pairwise
) -> None:
    block = _make(pairwise, dims, extent, True, pos, sub_sample_rounding="floor")
    x = torch.randn(2, C, *size, dtype=DT)
    q, k, v = block.embed(x)
    assert (q.shape[1], k.shape[1], v.shape[1]) == (n, m, m)
    assert block(x).shape == x.shape
    assert block.attention_map(x).shape[1:] == (n, m)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@pytest.mark.parametrize(("dims", "size"), [(1, (7,)), (2, (7, 9)), (3, (3, 7, 9))])
def test_sub_sample_rounding_is_max_pool_ceil_mode(dims, size) -> None:
    """floor is max pooling without ceil_mode (the official code, mmcv, SlowFast,
    pytorchvideo); ceil, the default, with it: on odd sizes they differ."""
    x = torch.randn(2, 3, *size, dtype=DT)
    window = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dims]
    pools = {}
    for rounding, ceil_mode in (("floor", False), ("ceil", True)):
        block = NonLocalNd(3, sub_sample=True, sub_sample_rounding=rounding, dims=dims)
        pools[rounding] = block._pool(x)
        want = _MAX_POOL[dims](x, window, window, ceil_mode=ceil_mode)
        assert torch.equal(pools[rounding], want)
        assert torch.equal(_maxpool(x, dims, rounding), want)
        assert block.layout(size).key_grid == tuple(want.shape[2:])
    assert pools["floor"].shape != pools["ceil"].shape
    assert NonLocalNd(3, sub_sample=True).sub_sample_rounding == "ceil"  # the default


@pytest.mark.parametrize("pos", ["after", "before"])
def test_floor_rounding_is_the_peers_block(pos) -> None:
    """An mmcv-style NL (embedded Gaussian, logits × C'^-1/2, floor max pooling of φ and g, or
    of x before them), written with torch ops, on a 7×9 map: floor matches it, ceil does not."""
    x = torch.randn(2, C, 7, 9, dtype=DT)
    outs = {}
    for rounding in ("ceil", "floor"):
        block = _make("embedded_gaussian", 2, "spacetime", True, pos, sub_sample_rounding=rounding)
        torch.manual_seed(1)
        _randomize(block)  # the same weights for both roundings
        with torch.no_grad():
            outs[rounding] = block.residual(x)

            def pool(t):
                return F.max_pool2d(t, 2, 2)  # floor, as the peers

            xk = pool(x) if pos == "before" else x
            theta = block.theta(x).flatten(2)  # (B, C', N)
            phi, g = block.phi(xk), block.g(xk)
            if pos == "after":
                phi, g = pool(phi), pool(g)
            logits = torch.einsum("bcn,bcm->bnm", theta, phi.flatten(2)) * CI**-0.5
            y = torch.einsum("bnm,bcm->bcn", torch.softmax(logits, -1), g.flatten(2))
            want = block.norm(block.conv_out(y.reshape(2, CI, 7, 9)))
    torch.testing.assert_close(outs["floor"], want, rtol=1e-12, atol=1e-12)
    assert float((outs["ceil"] - want).abs().max()) > 1e-3


def test_floor_rounding_needs_two_positions_per_pooled_axis() -> None:
    block = NonLocal2d(8, sub_sample=True, sub_sample_rounding="floor")
    with pytest.raises(ValueError, match=r"NonLocal2d: sub_sample_rounding='floor'.*\(1, 9\)"):
        block(torch.randn(2, 8, 1, 9))
    with pytest.raises(ValueError, match="floor rounding needs at least 2 positions"):
        block.layout((1, 9))
    # ceil keeps a size-1 axis at 1; without sub-sampling the rounding does not matter
    assert NonLocal2d(8, sub_sample=True)(torch.randn(2, 8, 1, 9)).shape == (2, 8, 1, 9)
    assert NonLocal2d(8, sub_sample_rounding="floor")(torch.randn(2, 8, 1, 1)).shape[2:] == (1, 1)
    video = NonLocal3d(8, sub_sample=True, sub_sample_rounding="floor")
    assert video(torch.randn(2, 8, 1, 2, 3)).shape == (2, 8, 1, 2, 3)  # time is not pooled
    with pytest.raises(ValueError, match="unknown sub_sample_rounding 'round'"):
        NonLocal2d(8, sub_sample_rounding="round")


# -- identity at initialisation ---------------------------------------------------------------


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize(("dims", "extent"), LAYOUTS)
@pytest.mark.parametrize("norm", [True, False])
def test_fresh_block_is_identity(pairwise, dims, extent, norm) -> None:
    for dtype in (torch.float32, DT):
        kw = {"extent": extent} if dims == 3 else {}
        block = CLASSES[dims](C, pairwise=pairwise, sub_sample=True, norm=norm, dtype=dtype, **kw)
        x = torch.randn(2, C, *SIZES[dims], dtype=dtype) * 10
        assert torch.equal(block(x), x)
        block.eval()
        assert torch.equal(block(x), x)
        # zero_init survives reset_parameters()
        block.reset_parameters()
        assert torch.equal(block(x), x)


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("norm", [True, False])
def test_random_weights_change_the_input(pairwise, norm) -> None:
    block = _make(pairwise, 2, norm=norm, zero_init=False)
    _randomize(block)
    x = _input(2)
    assert float((block(x) - x).abs().max()) > 1e-2
    fresh = _make(pairwise, 2, norm=norm)  # default init, zero_init: norm weight / W_z at 0
    target = fresh.norm.weight if norm else fresh.conv_out.weight
    assert torch.count_nonzero(target) == 0
    assert torch.count_nonzero(fresh.g.weight) > 0


def test_submodule_names() -> None:
    names = {n for n, _ in _make("concatenation", 2).named_children()}
    assert names == {"theta", "phi", "g", "concat_project", "conv_out", "norm"}
    names = {n for n, _ in _make("gaussian", 3, norm=False).named_children()}
    assert names == {"g", "conv_out"}
    assert isinstance(_make("dot_product", 3).norm, torch.nn.BatchNorm3d)


# -- attention maps ---------------------------------------------------------------------------


def _from_tokens(y: torch.Tensor, x: torch.Tensor, extent: str) -> torch.Tensor:
    b, c = x.shape[0], y.shape[-1]
    size = x.shape[2:]
    if extent == "spacetime":
        return y.transpose(1, 2).reshape(b, c, *size)  # (B, C', *S)
    t, h, w = size
    if extent == "space":
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C', T, H, W)
    return y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)  # (B, C', T, H, W)


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize(("dims", "extent"), LAYOUTS)
def test_attention_map_reconstructs_the_output(pairwise, dims, extent) -> None:
    block = _make(pairwise, dims, extent, sub=True, zero_init=False)
    _randomize(block)
    x = _input(dims)
    amap = block.attention_map(x)  # (B', N, M)
    _, _, v = block.embed(x)
    y = _from_tokens(torch.bmm(amap, v), x, extent)  # (B, C', *S)
    want = x + block.norm(block.conv_out(y))
    with torch.no_grad():
        got = block(x)
    assert float((got - want).norm() / want.norm()) <= 1e-12
    if "gaussian" in pairwise:
        assert torch.allclose(amap.sum(-1), torch.ones((), dtype=DT), rtol=0, atol=1e-12)
        assert bool((amap > 0).all())
    else:  # the 1/M normaliser: rows do not sum to 1
        assert not torch.allclose(amap.sum(-1), torch.ones((), dtype=DT))


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_attention_map_chosen_rows(pairwise) -> None:
    block = _make(pairwise, 2, zero_init=False)
    _randomize(block)
    x = torch.randn(2, C, 6, 7, dtype=DT)
    full = block.attention_map(x)
    rows = [41, 0, 17, 17, 5]
    chosen = block.attention_map(x, queries=rows, chunk_size=2)
    assert chosen.shape == (2, len(rows), 42)
    # equal up to the rounding of differently blocked matrix products
    assert torch.allclose(chosen, full[:, rows], rtol=1e-13, atol=1e-300)
    chosen_t = block.attention_map(x, queries=torch.tensor([3]))
    assert torch.allclose(chosen_t, full[:, [3]], rtol=1e-13, atol=1e-300)
    assert torch.allclose(block.attention_map(x, chunk_size=5), full, rtol=1e-13, atol=1e-300)
    assert float(full.abs().min()) > 0 or pairwise in ("dot_product", "concatenation")


def test_attention_map_matches_formula() -> None:
    block = _make("embedded_gaussian", 1, zero_init=False)
    _randomize(block)
    x = _input(1)
    amap = block.attention_map(x)
    theta = _conv1x1(block.theta, x)
    phi = _conv1x1(block.phi, x)
    logits = torch.einsum("bci,bcj->bij", theta, phi) * CI**-0.5
    want = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    assert torch.allclose(amap, want, rtol=1e-12, atol=0)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pairwise": "cosine"}, "pairwise"),
        ({"impl": "flash"}, "impl"),
        ({"sub_sample_position": "middle"}, "sub_sample_position"),
        ({"pairwise": "dot_product", "use_scale": True}, "use_scale"),
        ({"pairwise": "concatenation", "use_scale": True}, "use_scale"),
        ({"extent": "space"}, "extent"),
    ],
)
def test_bad_constructor_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        NonLocal2d(8, **kwargs)


def test_bad_extent_3d() -> None:
    with pytest.raises(ValueError, match=r"extent 'frames'.*'spacetime', 'space', 'time'"):
        NonLocal3d(8, extent="frames")


def test_bad_channels_argument() -> None:
    with pytest.raises(ValueError, match="channels"):
        NonLocal2d(0)
    with pytest.raises(ValueError, match="channels"):
        NonLocal2d(8, inner_channels=0)
    with pytest.raises(TypeError, match="norm"):
        NonLocal2d(8, norm="batch")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_inputs(dims) -> None:
    block = CLASSES[dims](8)
    good = torch.randn(1, 8, *([3] * dims))
    block(good)
    with pytest.raises(ValueError, match=rf"{dims + 2}-d.*got {dims + 1}-d"):
        block(good[0])
    with pytest.raises(ValueError, match=rf"{dims + 2}-d.*got {dims + 3}-d"):
        block(good[None])
    with pytest.raises(ValueError, match=r"8 channels.*got 5"):
        block(torch.randn(1, 5, *([3] * dims)))
    with pytest.raises(ValueError, match="empty dimension"):
        block(torch.randn(1, 8, *([3] * (dims - 1)), 0))
    with pytest.raises(ValueError, match="empty dimension"):
        block(torch.randn(0, 8, *([3] * dims)))
    with pytest.raises(TypeError, match=r"floating-point dtype, got torch\.int64"):
        block(good.long())
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        block(good.tolist())
    with pytest.raises(ValueError, match="8 channels"):
        block.attention_map(torch.randn(1, 4, *([3] * dims)))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_input_dtype_must_be_the_parameters(dims, impl) -> None:
    """One line naming the block and both dtypes, not torch's "Input type (double) and bias
    type (float) should be the same"; under autocast mixed dtypes are legitimate."""
    block = CLASSES[dims](8, sub_sample=True, impl=impl)
    x = torch.randn(2, 8, *([3] * dims), dtype=torch.float64)
    name = CLASSES[dims].__name__
    msg = (
        rf"^{name}: input dtype torch\.float64 differs from the parameters' torch\.float32; "
        rf"call block\.to\(torch\.float64\) or cast the input to torch\.float32$"
    )
    with pytest.raises(TypeError, match=msg):
        block(x)
    with pytest.raises(TypeError, match=msg):
        block.attention_map(x)
    with pytest.raises(TypeError, match=r"input dtype torch\.float32 differs.*torch\.float64"):
        block.double()(x.float())
    block.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x.bfloat16()).shape == x.shape  # autocast casts float32 and half types
        assert block(x.half()).shape == x.shape
        with pytest.raises(TypeError, match=msg):  # but never float64
            block(x)
    assert block(x.float()).dtype == torch.float32


def test_bad_flags_and_dims() -> None:
    with pytest.raises(ValueError, match="NonLocalNd: unknown dims True"):
        NonLocalNd(8, dims=True)
    with pytest.raises(TypeError, match="NonLocal2d: sub_sample must be a bool, got 'yes'"):
        NonLocal2d(8, sub_sample="yes")
    with pytest.raises(TypeError, match="NonLocal2d: use_scale must be None or a bool"):
        NonLocal2d(8, use_scale=1)
    with pytest.raises(ValueError, match="NonLocal2d: unknown pairwise 'cosine'"):
        NonLocal2d(8, pairwise="cosine")
    with pytest.raises(ValueError, match=r"NonLocal2d: use_scale applies to the softmax forms"):
        NonLocal2d(8, pairwise="dot_product", use_scale=True)


def test_training_batch_norm_needs_two_values() -> None:
    block = NonLocal2d(8)
    with pytest.raises(
        ValueError, match=r"NonLocal2d: a BatchNorm in training mode.*\(1, 8, 1, 1\)"
    ):
        block(torch.randn(1, 8, 1, 1))
    assert block.eval()(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)
    assert NonLocal2d(8, norm=False)(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)


def test_bad_attention_queries() -> None:
    block = NonLocal2d(8)
    x = torch.randn(1, 8, 3, 4)
    with pytest.raises(ValueError, match=r"\[0, 12\).*got range \[0, 12\]"):
        block.attention_map(x, queries=[0, 12])
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        block.attention_map(x, queries=[-1])
    with pytest.raises(ValueError, match="empty"):
        block.attention_map(x, queries=[])
    with pytest.raises(ValueError, match="chunk_size"):
        block.attention_map(x, chunk_size=0)


def test_pooling_is_max_with_partial_windows() -> None:
    """Cross-check of the test's own pooling helper against torch's ceil_mode pooling."""
    x = torch.randn(2, 3, 5, 7, dtype=DT)
    assert torch.equal(_maxpool(x, 2), F.max_pool2d(x, 2, 2, ceil_mode=True))


# -- the fast path never forms the N×M map ------------------------------------------------------


def _map_shaped_ops(block: torch.nn.Module, x: torch.Tensor, n: int, m: int) -> list[str]:
    """Ops of forward+backward that take a tensor with an (N, M) or (M, N) pair of dims."""
    from torch.profiler import ProfilerActivity, profile

    x = x.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        block(x).backward(torch.randn_like(x))
    found = []
    for e in prof.events():
        for shape in e.input_shapes or []:
            dims = list(shape) if isinstance(shape, (list, tuple)) else []
            pairs = set(itertools.pairwise(dims))
            if (n, m) in pairs or (m, n) in pairs:
                found.append(f"{e.name}{dims}")
    return found


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_fast_path_never_materialises_the_map(pairwise, monkeypatch) -> None:
    # gaussian (C-wide logits, C'-wide values) runs by blocks of queries: make them smaller
    # than N here, as they are for any large input
    monkeypatch.setattr(nonlocalnet.functional, "ATTENTION_CHUNK_ELEMENTS", 5 * 15)
    # N = 54, sub-sampled M = 3·5 = 15 (no width of the block is 15 or 54)
    for x in (torch.randn(1, C, 6, 9, dtype=DT), torch.randn(2, C, 6, 9, dtype=DT)):
        fast = _make(pairwise, 2, sub=True, zero_init=False, impl="fast")
        assert _map_shaped_ops(fast, x, 54, 15) == []
        ref = _make(pairwise, 2, sub=True, zero_init=False, impl="reference")
        assert _map_shaped_ops(ref, x, 54, 15) != []  # the check does see a materialised map


@pytest.mark.parametrize(("dims", "extent"), LAYOUTS)
@pytest.mark.parametrize(("sub", "pos"), [(False, "after"), (True, "before")])
def test_fast_equals_reference_blocked_softmax(dims, extent, sub, pos, monkeypatch) -> None:
    """The query-blocked softmax kernel for equal widths (embedded_gaussian), inside the block."""
    monkeypatch.setattr(nonlocalnet.functional, "ATTENTION_CHUNK_ELEMENTS", 16)
    fast = _make("embedded_gaussian", dims, extent, sub, pos, impl="blocked", zero_init=False)
    _randomize(fast)
    ref = _make("embedded_gaussian", dims, extent, sub, pos, impl="reference")
    ref.load_state_dict(fast.state_dict())
    x = _input(dims)
    assert fast.kernel_for(x) == "blocked"
    grad = torch.randn_like(x)
    got = _outputs_and_grads(fast, x, grad)
    want = _outputs_and_grads(ref, x, grad)
    assert float((got - want).detach().norm() / want.detach().norm()) <= 1e-10


# -- every kernel, and the dispatcher's choice ---------------------------------------------------


def _block_impls(pairwise: str, sub: bool) -> list[str]:
    """Every impl of the block but the reference (symmetric only where keys are queries)."""
    kernels = nonlocalnet.layers.nonlocal_block._impl_choices(pairwise)
    shared = pairwise == "gaussian" and not sub
    return [i for i in kernels if i != "reference" and (i != "symmetric" or shared)]


#: sizes on both sides of the small-map thresholds of C' = CI = 4 (with gradients): embedded
#: N·M <= 3·(N·4 + M·8) (N = M <= 36; gaussian, C_q = C = 6: <= 48), dot product and efficient
#: N·M·8 < (N + M)·16 (N = M < 4), concatenation N·M <= N + 5·M (N = M <= 6)
THRESHOLD_SIZES = {"tiny": (1, 3), "small": (2, 3), "large": (8, 9)}


@pytest.mark.parametrize("pairwise", NL_PAIRWISE)
@pytest.mark.parametrize("side", list(THRESHOLD_SIZES))
@pytest.mark.parametrize(("sub", "pos"), [(False, "after"), (True, "after"), (True, "before")])
def test_every_impl_equals_reference(pairwise, side, sub, pos) -> None:
    """Each kernel the block can run, and both dispatch choices, on a small and a large map:
    float64 output and every gradient (input and parameters) equal to the reference."""
    x = torch.randn(2, C, *THRESHOLD_SIZES[side], dtype=DT)
    grad = torch.randn_like(x)
    ref = _make(pairwise, 2, sub=sub, pos=pos, impl="reference", zero_init=False)
    _randomize(ref)
    want = _outputs_and_grads(ref, x, grad)
    for impl in _block_impls(pairwise, sub):
        fast = _make(pairwise, 2, sub=sub, pos=pos, impl=impl, zero_init=False)
        fast.load_state_dict(ref.state_dict())
        got = _outputs_and_grads(fast, x, grad)
        assert float((got - want).detach().norm() / want.detach().norm()) <= 1e-10, impl
        fast.load_state_dict(ref.state_dict())  # the same running statistics
        fast.eval(), ref.eval()
        with torch.no_grad():  # eval mode: the BatchNorm folded into W_z
            err = (fast(x) - ref(x)).norm() / ref(x).norm()
        fast.train(), ref.train()
        assert float(err) <= 1e-12, impl


def test_dispatch_choice_of_the_block() -> None:
    """auto: direct for a small map, an O(N)-memory kernel for a large one; fast: never the map."""
    tiny, small, large = (torch.randn(1, C, *size) for size in THRESHOLD_SIZES.values())

    def block(pairwise: str, impl: str = "auto", **kw) -> NonLocalNd:
        return NonLocal2d(C, CI, pairwise=pairwise, impl=impl, **kw)

    assert block("embedded_gaussian").kernel_for(small) == "direct"
    assert block("embedded_gaussian").kernel_for(large) == "sdpa"
    assert block("embedded_gaussian", "fast").kernel_for(small) == "sdpa"
    assert block("gaussian").kernel_for(small) == "direct"
    assert block("gaussian").kernel_for(large) == "symmetric"
    assert block("gaussian", sub_sample=True).kernel_for(torch.randn(1, C, 16, 18)) == "blocked"
    assert block("dot_product").kernel_for(tiny) == "direct"
    assert block("dot_product").kernel_for(small) == "linear"
    assert block("concatenation").kernel_for(small) == "direct"
    assert block("concatenation").kernel_for(large) == "sorted"
    assert block("efficient").kernel_for(tiny) == "direct"
    assert block("efficient").kernel_for(small) == "context"
    assert block("embedded_gaussian", "reference").kernel_for(large) == "reference"
    assert block("embedded_gaussian", "blocked").kernel_for(small) == "blocked"
    # at the sizes of the networks: C = 1024, C' = 512, 14×14 and 7×7; a 64×64 map
    nl = NonLocal2d(1024)
    assert nl.kernel_for(torch.empty(8, 1024, 7, 7)) == "direct"
    assert nl.kernel_for(torch.empty(8, 1024, 14, 14)) == "direct"
    assert nl.kernel_for(torch.empty(1, 1024, 64, 64)) == "sdpa"
    assert "kernel_for" in repr(nl) and "impl='auto'" in repr(nl)


@pytest.mark.parametrize("pairwise", NL_PAIRWISE)
def test_auto_never_materialises_a_large_map(pairwise, monkeypatch) -> None:
    """The default impl on a map above the threshold: no (N, M) tensor, forward or backward;
    on a map below it the direct kernel does form it (the profiler check sees it)."""
    monkeypatch.setattr(nonlocalnet.functional, "ATTENTION_CHUNK_ELEMENTS", 5 * 30)
    x = torch.randn(1, C, 10, 11, dtype=DT)  # N = 110, sub-sampled M = 5·6 = 30
    block = _make(pairwise, 2, sub=True, zero_init=False, impl="auto")
    assert block.kernel_for(x.requires_grad_(True)) not in ("direct", "reference")
    assert _map_shaped_ops(block, x, 110, 30) == []
    small = torch.randn(1, C, 2, 3, dtype=DT)  # N = 6, M = 2
    if block.kernel_for(small) == "direct":  # dot product, efficient: N = 6 is linear already
        assert _map_shaped_ops(block, small, 6, 2) != []


def test_projections_are_one_product_per_weight() -> None:
    """The fast path computes θ, φ, g and W_z as matrix products over all B·N positions (no
    per-sample convolution), and an eval-mode BatchNorm is folded into W_z."""
    from torch.profiler import ProfilerActivity, profile

    block = NonLocal2d(16, 8, zero_init=False).eval()
    x = torch.randn(4, 16, 5, 5)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x)
    names = {e.name for e in prof.events()}
    assert not any("conv" in n for n in names), names
    assert not any("batch_norm" in n for n in names), names


# -- efficient attention as a pairwise form -----------------------------------------------------


@pytest.mark.parametrize(("dims", "extent"), LAYOUTS)
@pytest.mark.parametrize(("sub", "pos"), SUBSAMPLING)
def test_efficient_fast_equals_reference(dims, extent, sub, pos) -> None:
    fast = _make("efficient", dims, extent, sub, pos, zero_init=False, impl="context")
    _randomize(fast)
    ref = _make("efficient", dims, extent, sub, pos, impl="reference")
    ref.load_state_dict(fast.state_dict())
    x = _input(dims)
    grad = torch.randn_like(x)
    got = _outputs_and_grads(fast, x, grad)
    want = _outputs_and_grads(ref, x, grad)
    assert float((got - want).detach().norm() / want.detach().norm()) <= 1e-10
    assert float((fast(x) - x).abs().max()) > 1e-2


def test_efficient_matches_its_formula_and_map() -> None:
    """y = ρ_q(θ) (ρ_k(φ)ᵀ g): softmax of each query over channels, of each key channel over
    positions; attention_map rows are non-negative, sum to 1 and rebuild the output."""
    block = _make("efficient", 2, zero_init=False)
    _randomize(block)
    x = _input(2)
    theta, phi, g = (_conv1x1(m, x).flatten(2) for m in (block.theta, block.phi, block.g))
    rho_q = torch.softmax(theta, dim=1)  # (B, C', N): over channels
    rho_k = torch.softmax(phi, dim=2)  # (B, C', N): over positions
    y = torch.einsum("bcn,bcm,bdm->bdn", rho_q, rho_k, g).reshape(2, CI, *SIZES[2])
    want = x + block.norm(block.conv_out(y))
    with torch.no_grad():
        assert float((block(x) - want).norm() / want.norm()) <= 1e-12
    amap = block.attention_map(x)
    assert bool((amap >= 0).all())
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 15, dtype=DT), rtol=0, atol=1e-12)
    _, _, v = block.embed(x)
    y_map = torch.bmm(amap, v).transpose(1, 2).reshape(2, CI, *SIZES[2])
    assert torch.allclose(block.norm(block.conv_out(y_map)) + x, want, rtol=0, atol=1e-12)
    assert torch.equal(_make("efficient", 2)(x), x)  # zero-initialised: the identity
    with pytest.raises(ValueError, match="use_scale"):
        NonLocal2d(8, pairwise="efficient", use_scale=True)
    with pytest.raises(ValueError, match="impl"):
        NonLocal2d(8, pairwise="efficient", impl="sdpa")


# -- CUDA -----------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("pairwise", NL_PAIRWISE)
@pytest.mark.parametrize("sub", [False, True])
def test_cuda_block_fast_path(pairwise, sub) -> None:
    """On a CUDA device: the fused attention kernels with the math backend excluded (softmax
    forms), no host-device synchronisation in forward and backward, and the reference's
    numbers; float32 and bfloat16 autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    block = NonLocal2d(64, 32, pairwise=pairwise, sub_sample=sub, zero_init=False).cuda()
    _randomize(block)
    ref = NonLocal2d(64, 32, pairwise=pairwise, sub_sample=sub, impl="reference").cuda()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 64, 24, 20, device="cuda", requires_grad=True)
    if pairwise in ("gaussian", "embedded_gaussian"):
        assert block.kernel_for(x) == "sdpa"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = block(x)
            out.sum().backward()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out16 = block(x)
            out16.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        want = ref(x)
    assert float((out - want).norm() / want.norm()) <= 1e-4
    assert float((out16.float() - want).norm() / want.norm()) <= 3e-2


@cuda
def test_cuda_other_blocks_do_not_sync() -> None:
    from nonlocalnet import APNB, GlobalContext

    for block, x in (
        (GlobalContext(64, zero_init=False), torch.randn(4, 64, 14, 14)),
        (APNB(64, key_channels=32, value_channels=32, zero_init=False), torch.randn(2, 64, 32, 32)),
    ):
        block = block.cuda()
        x = x.cuda().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            block(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
