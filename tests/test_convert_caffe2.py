"""The official Caffe2 video-nonlocal-net checkpoints (Caffe2 cannot be installed here).

The fixture ``fixtures/caffe2_nl_i3d_r50_blobs.txt`` lists the blob names and shapes of the
official NL I3D ResNet-50 (resnet_video_org + nonlocal_helper), as :func:`official_blobs`
derives them from the official code's naming rules. A checkpoint with random blobs is written
as the official ones are (a Python 2 pickle of numpy arrays), read back by the library, converted,
and the converted model is checked against forwards computed here from the raw arrays, with
Caffe2's formulas: the stem, a bottleneck with projection shortcut and temporal kernel, a
non-local block (pooling before φ/g, floor, logits × C'^-1/2, out-conv bias, BN eps 1.0000001e-5),
and the whole network (pool1 padding 0, pool2, pool5, the classifier) at odd sizes.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nonlocalnet.convert import ConversionError, convert_state_dict, read_checkpoint
from nonlocalnet.convert._core import supported_nl_options
from nonlocalnet.convert.caffe2 import load_pickle

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "caffe2_nl_i3d_r50_blobs.txt"
EPS = 1.0000001e-5
HAS_ROUNDING = "sub_sample_rounding" in supported_nl_options()
needs_rounding = pytest.mark.skipif(
    not HAS_ROUNDING, reason="NonLocalNd has no sub_sample_rounding option yet (floor pooling)"
)


def official_blobs(depth: int = 50, arc: str = "i3d", nonlocal_: bool = True, classes: int = 400):
    """(name, shape) of the official net's parameter blobs, in the order the net creates them."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    temp = {
        "c2d": [[0] * n for n in blocks],
        "i3d": [
            [1] * blocks[0],
            [1, 0, 1, 0],
            [int(i % 2 == 0) for i in range(blocks[2])],
            [0, 1, 0],
        ],
    }[arc]
    out = [("conv1_w", (64, 3, 5 if arc == "i3d" else 1, 7, 7))]

    def bn(prefix, c):
        return [(f"{prefix}_bn_{s}", (c,)) for s in ("s", "b", "rm", "riv")]

    out += bn("res_conv1", 64)
    dim_in = 64
    layer_mod = {3: 2, 4: 2 if depth == 50 else 7}  # NONLOCAL.LAYER_MOD, x4-1 for R101 res4
    widths = zip(blocks, (64, 128, 256, 512), (256, 512, 1024, 2048), strict=True)
    for stage, (n, inner, dim_out) in enumerate(widths, start=2):
        for i in range(n):
            p = f"res{stage}_{i}"
            t = 1 + 2 * temp[stage - 2][i]
            out += [(f"{p}_branch2a_w", (inner, dim_in, t, 1, 1)), *bn(f"{p}_branch2a", inner)]
            out += [(f"{p}_branch2b_w", (inner, inner, 1, 3, 3)), *bn(f"{p}_branch2b", inner)]
            out += [(f"{p}_branch2c_w", (dim_out, inner, 1, 1, 1)), *bn(f"{p}_branch2c", dim_out)]
            if i == 0:
                out += [
                    (f"{p}_branch1_w", (dim_out, dim_in, 1, 1, 1)),
                    *bn(f"{p}_branch1", dim_out),
                ]
            dim_in = dim_out
            mod = layer_mod.get(stage)
            if nonlocal_ and mod and i % mod == mod - 1:
                q = f"nonlocal_conv{stage}_{i}"
                for c in ("theta", "phi", "g"):
                    out += [
                        (f"{q}_{c}_w", (dim_out // 2, dim_out, 1, 1, 1)),
                        (f"{q}_{c}_b", (dim_out // 2,)),
                    ]
                out += [
                    (f"{q}_out_w", (dim_out, dim_out // 2, 1, 1, 1)),
                    (f"{q}_out_b", (dim_out,)),
                ]
                out += bn(q, dim_out)
    out += [("pred_w", (classes, 2048)), ("pred_b", (classes,))]
    return out


def read_fixture() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in FIXTURE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            rows.append((name, tuple(int(s) for s in shape.split("x"))))
    return rows


def random_blobs(rows, seed: int = 0, dtype=np.float64) -> dict[str, object]:
    """Blobs of a trained-looking net: He-scaled convs, BN scale ~1, positive variances."""
    rng = np.random.default_rng(seed)
    blobs: dict[str, object] = {}
    for name, shape in rows:
        if name.endswith(("_rm", "_b")):
            a = rng.normal(0.0, 0.1, shape)
        elif name.endswith("_riv") or name.endswith("_s"):
            a = rng.uniform(0.5, 1.5, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape)
        blobs[name] = a.astype(dtype)
        if not name.endswith(("_rm", "_riv")):
            blobs[name + "_momentum"] = np.zeros(1, dtype)  # its shape does not matter here
    blobs["lr"] = np.float32(0.01)
    blobs["model_iter"] = np.int64(400000)
    return blobs


# -- a Python 2 pickle, as cPickle.dump(protocol=2) wrote the official checkpoints -----------


def py2_pickle(obj: object) -> bytes:
    """Protocol-2 pickle with Python 2 ``str`` for strings/bytes and numpy.core globals."""
    out = io.BytesIO()
    w = out.write

    def string(s: str | bytes) -> None:
        b = s.encode("latin1") if isinstance(s, str) else s
        if len(b) < 256:
            w(b"U" + bytes([len(b)]) + b)  # SHORT_BINSTRING
        else:
            w(b"T" + struct.pack("<I", len(b)) + b)  # BINSTRING

    def save(o: object) -> None:
        if o is None:
            w(b"N")
        elif o is False or o is True:
            w(b"\x89" if o is False else b"\x88")
        elif isinstance(o, (int, np.integer)) and not isinstance(o, np.ndarray):
            w(b"J" + struct.pack("<i", int(o)))
        elif isinstance(o, (str, bytes)):
            string(o)
        elif isinstance(o, tuple):
            w(b"(")
            for x in o:
                save(x)
            w(b"t")
        elif isinstance(o, dict):
            w(b"}(")
            for k, v in o.items():
                save(k)
                save(v)
            w(b"u")
        elif isinstance(o, np.dtype):
            w(b"cnumpy\ndtype\n")
            save((o.str[1:], 0, 1))
            w(b"R")
            save((3, "<", None, None, None, -1, -1, 0))
            w(b"b")
        elif isinstance(o, np.generic):
            w(b"cnumpy.core.multiarray\nscalar\n")
            save((o.dtype, o.tobytes()))
            w(b"R")
        elif isinstance(o, np.ndarray):
            w(b"cnumpy.core.multiarray\n_reconstruct\n")
            w(b"cnumpy\nndarray\n")
            save((0,))
            w(b"U\x01b")  # the py2 str "b"
            w(b"\x87R")  # TUPLE3, REDUCE
            save((1, tuple(o.shape), o.dtype, False, np.ascontiguousarray(o).tobytes()))
            w(b"b")
        else:  # pragma: no cover
            raise TypeError(type(o))

    w(b"\x80\x02")
    save(obj)
    w(b".")
    return out.getvalue()


def write_checkpoint(path: Path, blobs: dict[str, object]) -> Path:
    path.write_bytes(py2_pickle({"blobs": blobs}))
    return path


# -- independent forwards, from the raw arrays ----------------------------------------------------


def t(blobs, name):
    """A blob as a float64 tensor (the forwards here run in float64)."""
    return torch.from_numpy(np.asarray(blobs[name])).double()


def c2_bn(x, blobs, prefix):
    """Caffe2 SpatialBN in test mode: (x - rm) / sqrt(riv + eps) * s + b."""
    shape = (1, -1, 1, 1, 1)
    rm, riv = t(blobs, f"{prefix}_rm").reshape(shape), t(blobs, f"{prefix}_riv").reshape(shape)
    s, b = t(blobs, f"{prefix}_s").reshape(shape), t(blobs, f"{prefix}_b").reshape(shape)
    return (x - rm) / torch.sqrt(riv + EPS) * s + b


def c2_stem(x, blobs):
    y = F.conv3d(x, t(blobs, "conv1_w"), stride=(2, 2, 2), padding=(2, 3, 3))
    return torch.relu(c2_bn(y, blobs, "res_conv1_bn"))


def c2_bottleneck(x, blobs, prefix, stride, temporal):
    a = F.conv3d(x, t(blobs, f"{prefix}_branch2a_w"), padding=(temporal, 0, 0))
    a = torch.relu(c2_bn(a, blobs, f"{prefix}_branch2a_bn"))
    b = F.conv3d(a, t(blobs, f"{prefix}_branch2b_w"), stride=(1, stride, stride), padding=(0, 1, 1))
    b = torch.relu(c2_bn(b, blobs, f"{prefix}_branch2b_bn"))
    c = c2_bn(F.conv3d(b, t(blobs, f"{prefix}_branch2c_w")), blobs, f"{prefix}_branch2c_bn")
    sc = x
    if f"{prefix}_branch1_w" in blobs:
        sc = F.conv3d(x, t(blobs, f"{prefix}_branch1_w"), stride=(1, stride, stride))
        sc = c2_bn(sc, blobs, f"{prefix}_branch1_bn")
    return torch.relu(c + sc)


def c2_nonlocal(x, blobs, prefix):
    """spacetime_nonlocal + the residual sum (nonlocal_helper.py), Caffe2's op semantics."""
    n = x.shape[0]

    def conv(z, c):
        return F.conv3d(z, t(blobs, f"{prefix}_{c}_w"), t(blobs, f"{prefix}_{c}_b"))

    theta = conv(x, "theta")
    pooled = F.max_pool3d(x, (1, 2, 2), (1, 2, 2))  # Caffe2 MaxPool, pads 0: floor
    phi, g = conv(pooled, "phi"), conv(pooled, "g")
    d = theta.shape[1]
    theta, phi, g = theta.reshape(n, d, -1), phi.reshape(n, d, -1), g.reshape(n, d, -1)
    affinity = torch.bmm(theta.transpose(1, 2), phi) * d**-0.5  # BatchMatMul trans_a, Scale
    p = torch.softmax(affinity, dim=2)
    y = torch.bmm(g, p.transpose(1, 2)).reshape(n, d, *x.shape[2:])  # BatchMatMul trans_b
    out = c2_bn(conv(y, "out"), blobs, f"{prefix}_bn")
    return x + out


def c2_network(x, blobs, blocks=(3, 4, 6, 3)):
    """resnet_video_org's test net: conv1, pool1 (pads 0), res2, pool2, res3..res5 with the NL
    blocks, pool5 (the average over res5's whole map), pred."""
    y = F.max_pool3d(c2_stem(x, blobs), (2, 3, 3), (2, 2, 2), padding=0)
    for stage, n in enumerate(blocks, start=2):
        for i in range(n):
            p = f"res{stage}_{i}"
            stride = 2 if i == 0 and stage > 2 else 1
            temporal = np.asarray(blobs[f"{p}_branch2a_w"]).shape[2] // 2
            y = c2_bottleneck(y, blobs, p, stride, temporal)
            if f"nonlocal_conv{stage}_{i}_theta_w" in blobs:
                y = c2_nonlocal(y, blobs, f"nonlocal_conv{stage}_{i}")
        if stage == 2:
            y = F.max_pool3d(y, (2, 1, 1), (2, 1, 1))  # pool2
    y = y.mean(dim=(2, 3, 4))  # pool5: AveragePool with res5's T x 7 x 7 as kernel at 224
    return y @ t(blobs, "pred_w").T + t(blobs, "pred_b")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# -- tests ----------------------------------------------------------------------------------------


def test_the_fixture_lists_the_official_names_and_shapes() -> None:
    assert read_fixture() == official_blobs()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    blobs = random_blobs(read_fixture(), dtype=np.float32)  # as the official blobs
    path = write_checkpoint(tmp_path_factory.mktemp("c2") / "i3d_nonlocal_32x2.pkl", blobs)
    state, _meta = read_checkpoint(path, "caffe2")
    conv = convert_state_dict(state, "caffe2")
    conv.model.double().eval().load_state_dict(conv.state_dict)  # computed in float64
    return blobs, conv


def test_the_pickle_reads_as_python_2_wrote_it(tmp_path) -> None:
    blobs = {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3), "lr": np.float32(0.5)}
    data = py2_pickle({"blobs": blobs, "model_iter": 3})
    assert b"numpy.core.multiarray" in data and b"_codecs" not in data
    loaded = load_pickle(data)
    np.testing.assert_array_equal(loaded["conv1_w"], blobs["conv1_w"])
    assert float(loaded["lr"]) == 0.5


def test_conversion_infers_the_model_and_the_options(converted) -> None:
    _, conv = converted
    assert conv.model_name == "nl_i3d_r50"
    nl = conv.overrides["nonlocal_kwargs"]
    assert nl["sub_sample"] is True and nl["sub_sample_position"] == "before"
    assert nl["pairwise"] == "embedded_gaussian" and nl["use_scale"] is True
    assert nl.get("sub_sample_rounding", "floor") == "floor"
    assert conv.report.block_options["nl.sub_sample_rounding"] == "floor"
    ignored = conv.report.ignored_counts()
    assert ignored["training bookkeeping (model_iter, lr)"] == 2
    assert ignored["SGD momentum (*_momentum)"] > 200
    assert len(conv.report.mapped) == len(read_fixture())
    # the derived keys are exactly the BN step counters
    assert {how for _, how in conv.report.derived} == {
        "num_batches_tracked = 0 (not in the source)"
    }
    assert conv.overrides["pool1_padding"] == (0, 0, 0)
    table = conv.report.table()
    assert "layer2 (res3) NL blocks" in table and "pool1 pads 0" in table
    assert conv.report.exact


def test_the_whole_network_matches_the_official_forward(converted) -> None:
    """73x81 pixels: pool1 gives 18x20 (torchvision's padding: 19x21), res3 9x10, res4 5x5."""
    blobs, conv = converted
    x = torch.randn(1, 3, 16, 73, 81, dtype=torch.float64)
    with torch.no_grad():
        assert conv.model.maxpool(conv.model.forward_stem(x)).shape[-2:] == (18, 20)
        assert rel(conv.model(x), c2_network(x, blobs)) <= 1e-10


def test_a_given_model_must_pool_as_the_official_net(converted) -> None:
    from nonlocalnet.models import create_model

    blobs, conv = converted
    other = {k: v for k, v in conv.overrides.items() if k != "pool1_padding"}
    with pytest.raises(
        ConversionError, match=r"pool1_padding is \(0, 1, 1\), the source's \(0, 0, 0\)"
    ):
        convert_state_dict(blobs, "caffe2", create_model("nl_i3d_r50", **other))


def test_stem_matches_the_official_forward(converted) -> None:
    blobs, conv = converted
    m = conv.model
    x = torch.randn(1, 3, 8, 30, 34, dtype=torch.float64)
    with torch.no_grad():
        ours = m.relu(m.bn1(m.conv1(x)))
    assert rel(ours, c2_stem(x, blobs)) <= 1e-10


@pytest.mark.parametrize(
    "block,stride,temporal,size",
    [("res3_0", 2, 1, (7, 9)), ("res4_1", 1, 0, (8, 10)), ("res5_1", 1, 1, (7, 9))],
)
def test_bottleneck_matches_the_official_forward(converted, block, stride, temporal, size) -> None:
    blobs, conv = converted
    stage, i = int(block[3]), int(block.split("_")[1])
    mod = getattr(conv.model, f"layer{stage - 1}")[i]
    x = torch.randn(1, mod.conv1.in_channels, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        ours = mod(x)  # with the NL block after it, where the net has one (res4_1)
    expected = c2_bottleneck(x, blobs, block, stride, temporal)
    if getattr(mod, "after", None) is not None:
        expected = c2_nonlocal(expected, blobs, f"nonlocal_conv{stage}_{i}")
    assert rel(ours, expected) <= 1e-10


@pytest.mark.parametrize("size", [(8, 8), pytest.param((7, 9), marks=needs_rounding)])
def test_nonlocal_block_matches_the_official_forward(converted, size) -> None:
    blobs, conv = converted
    block = conv.model.layer2[1].after
    x = torch.randn(2, 512, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        ours = block(x)
    assert rel(ours, c2_nonlocal(x, blobs, "nonlocal_conv3_1")) <= 1e-10


def test_eps_is_folded_into_the_variances(converted) -> None:
    blobs, conv = converted
    riv = t(blobs, "res_conv1_bn_riv")
    assert torch.equal(conv.state_dict["bn1.running_var"], (riv + (EPS - 1e-5)).float())
    assert any("eps 1.0000001e-05" in n for n in conv.report.notes)
    blobs64 = random_blobs(official_blobs(arc="c2d", nonlocal_=False))
    state = convert_state_dict(blobs64, "caffe2").state_dict
    riv = torch.from_numpy(blobs64["res3_1_branch2b_bn_riv"])
    assert torch.equal(state["layer2.1.bn2.running_var"], riv + (EPS - 1e-5))


def test_affine_only_norms_become_the_affine_map() -> None:
    rows = [
        r for r in official_blobs(arc="c2d", nonlocal_=False) if not r[0].endswith(("_rm", "_riv"))
    ]
    blobs = random_blobs(rows)
    conv = convert_state_dict(blobs, "caffe2")
    assert conv.model_name == "c2d_r50"
    conv.model.double().eval().load_state_dict(conv.state_dict)
    bn = conv.model.bn1
    x = torch.randn(1, 64, 2, 3, 3, dtype=torch.float64)
    s, b = t(blobs, "res_conv1_bn_s"), t(blobs, "res_conv1_bn_b")
    assert rel(bn(x), x * s.reshape(1, -1, 1, 1, 1) + b.reshape(1, -1, 1, 1, 1)) <= 1e-12


@pytest.mark.slow
def test_r101_and_the_8x8_variant() -> None:
    blobs = random_blobs(official_blobs(depth=101, arc="c2d"), dtype=np.float32)
    conv = convert_state_dict(blobs, "caffe2", variant="8x8")
    assert conv.model_name == "nl_c2d_r101"
    assert conv.model.layer3[6].after is not None and conv.model.layer3[20].after is not None
    assert conv.overrides["conv1_stride"] == (1, 2, 2) and conv.overrides["pool1_kernel"] == (
        1,
        3,
        3,
    )


def test_dot_product_option() -> None:
    blobs = random_blobs(official_blobs(arc="c2d"), dtype=np.float32)
    conv = convert_state_dict(blobs, "caffe2", pairwise="dot_product")
    assert conv.model.layer2[1].after.pairwise == "dot_product"


def test_missing_unexpected_and_misshaped_blobs_are_refused() -> None:
    blobs = random_blobs(official_blobs(arc="c2d", nonlocal_=False), dtype=np.float32)
    missing = dict(blobs)
    del missing["res4_2_branch2b_bn_riv"]
    with pytest.raises(ConversionError, match=r"missing: layer3\.2\.bn2\.running_var"):
        convert_state_dict(missing, "caffe2")
    del missing["res4_2_branch2b_bn_rm"]  # one norm without statistics among the others
    with pytest.raises(ConversionError, match="affine-only"):
        convert_state_dict(missing, "caffe2")
    extra = {**blobs, "res6_0_branch2a_w": np.zeros((1, 1, 1, 1, 1), np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected: layer5\.0\.conv1\.weight"):
        convert_state_dict(extra, "caffe2", model="c2d_r50")
    unknown = {**blobs, "fancy_blob": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError, match=r"no counterpart.*fancy_blob"):
        convert_state_dict(unknown, "caffe2")
    shaped = {**blobs, "res2_1_branch2b_w": np.zeros((64, 64, 1, 1, 1), np.float32)}
    with pytest.raises(ConversionError, match=r"wrongly shaped: layer1\.1\.conv2\.weight"):
        convert_state_dict(shaped, "caffe2", model="c2d_r50")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_never_does(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": _Evil(marker)}}, protocol=2))
    with pytest.raises(ConversionError, match=r"refusing to load global (posix|os)\.system"):
        read_checkpoint(path, "caffe2")
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"blobs": {"x": eval}}, protocol=2))
    with pytest.raises(
        ConversionError, match=r"refusing to load global (builtins|__builtin__)\.eval"
    ):
        read_checkpoint(path, "caffe2")


def test_a_truncated_pickle_is_one_clear_error(tmp_path) -> None:
    data = py2_pickle({"blobs": random_blobs([("conv1_w", (64, 3, 1, 7, 7))])})
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or not a pickle"):
        read_checkpoint(path, "caffe2")


def test_an_imagenet_caffe2_pickle_starts_a_video_network(tmp_path) -> None:
    """The official 2D pretrain pickles (4-d kernels, 1000 classes) inflate into C2D/I3D."""
    rows = [
        (n, s[:2] + s[3:] if n.endswith("_w") and len(s) == 5 else s)
        for n, s in official_blobs(arc="c2d", nonlocal_=False, classes=1000)
    ]
    path = write_checkpoint(
        tmp_path / "r50_pretrain_c2_model_iter450450_clean.pkl", random_blobs(rows)
    )
    from nonlocalnet.convert import load_pretrained
    from nonlocalnet.models import create_model

    model = create_model("nl_i3d_r50").double()
    report = load_pretrained(model, path, source="caffe2")
    assert len(report.inflated) == 53 and {k for k, _ in report.dropped} == {"pred_w", "pred_b"}
    assert all(".after." in k or k.startswith("fc.") for k in report.new)
    blobs = load_pickle(path)
    w = torch.from_numpy(blobs["res2_0_branch2a_w"])  # (64, 64, 1, 1): inflated to 3 taps, / 3
    torch.testing.assert_close(model.layer1[0].conv1.weight[:, :, 1], w / 3, rtol=0, atol=1e-15)
    var = model.layer1[0].bn1.running_var
    torch.testing.assert_close(
        var, t(blobs, "res2_0_branch2a_bn_riv") + (EPS - 1e-5), rtol=0, atol=0
    )


def test_a_pretrained_start_may_differ_from_the_source_and_says_so(converted) -> None:
    from nonlocalnet.convert import load_pretrained
    from nonlocalnet.models import create_model

    blobs, _ = converted
    report = load_pretrained(create_model("nl_i3d_r50"), blobs, source="caffe2")
    norms = sum(name.endswith("_bn_s") for name, _ in read_fixture())
    assert not report.new and len(report.loaded) == len(read_fixture()) + norms  # + BN counters
    assert any("sub_sample_rounding is 'ceil', the source's 'floor'" in r for r in report.inexact)
    assert any(
        "the stem: pool1_padding is (0, 1, 1), the source's (0, 0, 0)" in r for r in report.inexact
    )


def test_the_out_conv_bias_folds_into_the_norm_where_the_model_has_no_slot() -> None:
    from torch import nn

    from nonlocalnet.models import create_model, inserted_blocks

    blobs = random_blobs(official_blobs(arc="c2d"))
    overrides = convert_state_dict(blobs, "caffe2").overrides
    model = create_model("nl_c2d_r50", **overrides)
    for block in inserted_blocks(model).values():
        c = block.conv_out
        block.conv_out = nn.Conv3d(c.in_channels, c.out_channels, 1, bias=False)
    conv = convert_state_dict(blobs, "caffe2", model)
    assert "layer2.1.after.conv_out.bias" not in conv.state_dict
    assert any("folded into layer2.1.after.norm.running_mean" in n for n in conv.report.notes)
    model.double().eval().load_state_dict(conv.state_dict)
    x = torch.randn(1, 512, 2, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        assert rel(model.layer2[1].after(x), c2_nonlocal(x, blobs, "nonlocal_conv3_1")) <= 1e-10
