"""The converters' common behaviour: torchvision identity, refusals, the report, files, CLI."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch
import torchvision

from nonlocalnet.convert import (
    SOURCES,
    ConversionError,
    convert_state_dict,
    create_model,
    load_pretrained,
    read_checkpoint,
    save_converted,
    unwrap_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def tv_resnet18() -> torch.nn.Module:
    net = torchvision.models.resnet18(num_classes=7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def test_torchvision_is_the_identity_mapping() -> None:
    theirs = tv_resnet18().double().eval()
    conv = convert_state_dict(theirs.state_dict(), "torchvision")
    assert conv.model_name == "resnet18" and conv.overrides == {"num_classes": 7}
    assert all(src == dst for src, dst in conv.report.mapped)
    assert len(conv.report.mapped) == len(theirs.state_dict()) and conv.report.exact
    conv.model.double().eval().load_state_dict(conv.state_dict)
    x = torch.randn(2, 3, 45, 51, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(conv.model(x), theirs(x))


def test_the_report() -> None:
    conv = convert_state_dict(tv_resnet18().state_dict(), "torchvision")
    counts = conv.report.counts()
    assert counts["stem"] == {"mapped": 6, "derived": 0}
    assert counts["layer1 (res2)"]["mapped"] == 2 * 12  # conv1, bn1 (5 entries), conv2, bn2
    assert counts["fc"]["mapped"] == 2
    table = conv.report.table()
    assert "torchvision -> resnet18: 122 keys mapped" in table
    assert "build: create_model('resnet18', **overrides)" in table
    json.dumps(conv.report.to_dict())


def test_unknown_source_and_option() -> None:
    with pytest.raises(
        ValueError, match="unknown checkpoint source 'caffe'; expected one of caffe2"
    ):
        convert_state_dict({"a": torch.zeros(1)}, "caffe")
    with pytest.raises(ConversionError, match=r"unknown option\(s\) 'pairwise'; valid: none"):
        convert_state_dict(tv_resnet18().state_dict(), "torchvision", pairwise="dot_product")


def test_missing_unexpected_and_misshaped_keys_are_named() -> None:
    state = tv_resnet18().state_dict()
    broken = dict(state)
    del broken["layer2.1.bn1.running_var"]
    with pytest.raises(ConversionError, match=r"1 missing: layer2\.1\.bn1\.running_var"):
        convert_state_dict(broken, "torchvision")
    extra = {**state, "layer2.1.extra.weight": torch.zeros(1)}
    with pytest.raises(
        ConversionError, match=r"no counterpart in a torchvision ResNet: layer2\.1\.extra"
    ):
        convert_state_dict(extra, "torchvision")
    shaped = {**state, "layer3.0.conv2.weight": torch.zeros(256, 256, 1, 1)}
    with pytest.raises(
        ConversionError, match=r"wrongly shaped: layer3\.0\.conv2\.weight \(256, 256, 1, 1\)"
    ):
        convert_state_dict(shaped, "torchvision")
    with pytest.raises(
        ConversionError, match=r"is a 'resnet50' \(depth=50\); 'resnet18' has depth=18"
    ):
        convert_state_dict(torchvision.models.resnet50().state_dict(), "torchvision", "resnet18")
    with pytest.raises(ConversionError, match=r"198 unexpected: .*layer1\.0\.conv3\.weight"):
        convert_state_dict(
            torchvision.models.resnet50().state_dict(), "torchvision", create_model("resnet18")
        )


def test_unwrap_state() -> None:
    state = {"module.conv1.weight": torch.zeros(1)}
    assert list(unwrap_state({"model": state, "epoch": 3})[0]) == ["conv1.weight"]
    inner, meta = unwrap_state({"state_dict": {"a": torch.zeros(1)}, "meta": {"cfg": "x"}})
    assert list(inner) == ["a"] and meta["cfg"] == "x"
    with pytest.raises(ConversionError, match="a checkpoint must be a dict"):
        unwrap_state([1, 2])


# -- files ----------------------------------------------------------------------------------------


@pytest.fixture()
def r18_file(tmp_path):
    net = tv_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_truncated_files_are_one_clear_error(tmp_path, r18_file) -> None:
    _, path = r18_file
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConversionError, match=r"cannot be read safely with torch\.load"):
        load_pretrained(create_model("resnet18", num_classes=7), cut)
    conv = convert_state_dict(torch.load(path, weights_only=True), "torchvision")
    out = save_converted(conv, tmp_path / "r18.safetensors")
    blob = out.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConversionError, match="cannot read the safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_never_does(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Evil(marker)}, path)
    with pytest.raises(ConversionError, match="weights_only"):
        load_pretrained(create_model("resnet18"), path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"blobs": {"conv1_w": _Evil(marker)}}))
    with pytest.raises(ConversionError, match="refusing to load global"):
        load_pretrained(create_model("c2d_r50"), raw, source="caffe2")
    assert not marker.exists()


def test_a_checkpoint_of_another_architecture_is_refused(r18_file) -> None:
    _, path = r18_file
    with pytest.raises(ConversionError, match="another architecture than resnet50"):
        load_pretrained(create_model("resnet50"), path)
    with pytest.raises(ValueError, match="unknown checkpoint source 'tv'"):
        load_pretrained(create_model("resnet18"), path, source="tv")


def test_converted_file_rebuilds_its_model(tmp_path, r18_file) -> None:
    net, path = r18_file
    state, _ = read_checkpoint(path)
    conv = convert_state_dict(state, "torchvision")
    out = save_converted(conv, tmp_path / "r18.safetensors")
    sidecar = json.loads((tmp_path / "r18.safetensors.json").read_text())
    assert sidecar["model"] == "resnet18" and sidecar["overrides"] == {"num_classes": 7}
    model = create_model(weights=out, source="nonlocalnet")
    assert model.model_name == "resnet18" and model.fc.out_features == 7
    assert len(model.load_report.loaded) == len(state) and not model.load_report.new
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


# -- the command ----------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    from nonlocalnet.cli import convert as cli

    parser = argparse.ArgumentParser(prog="nonlocalnet convert")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_cli_writes_safetensors_and_says_how_to_build(tmp_path, r18_file, capsys) -> None:
    _, path = r18_file
    out = tmp_path / "out.safetensors"
    assert _run_cli(["--from", "torchvision", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torchvision -> resnet18: 122 keys mapped" in printed
    assert "create_model(weights=" in printed and out.is_file()
    state, meta = read_checkpoint(out)
    assert meta["nonlocalnet.model"] == "resnet18" and len(state) == 122
    assert _run_cli(["--from", "torchvision", str(path), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mapped"] == 122


def test_cli_bad_input(tmp_path, r18_file) -> None:
    _, path = r18_file
    with pytest.raises(ValueError, match="--from must be one of"):
        _run_cli(["--from", "nope", str(path), "--out", str(tmp_path / "o.safetensors")])
    with pytest.raises(ValueError, match=r"--out must be a \.safetensors"):
        _run_cli(["--from", "torchvision", str(path), "--out", str(tmp_path / "o.pt")])
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        _run_cli(
            [
                "--from",
                "torchvision",
                str(path),
                "--out",
                str(tmp_path / "o.safetensors"),
                "--set",
                "x",
            ]
        )


def test_cli_through_main_when_registered(tmp_path, r18_file, capsys) -> None:
    from nonlocalnet.cli import COMMANDS, main

    if "convert" not in COMMANDS:
        pytest.skip("the convert command is not registered in nonlocalnet.cli yet")
    _, path = r18_file
    code = main(["convert", "--from", "caffe", str(path), "--out", str(tmp_path / "o.safetensors")])
    assert code == 2 and "--from must be one of" in capsys.readouterr().err


def test_every_source_documents_itself() -> None:
    from nonlocalnet.convert import get_converter

    for name in SOURCES:
        module = get_converter(name)
        assert name == module.NAME and module.DESCRIPTION and module.__doc__


def test_a_torch_file_given_as_caffe2_is_one_clear_error(r18_file) -> None:
    _, path = r18_file
    with pytest.raises(
        ConversionError, match=r"a Caffe2 checkpoint is a pickle .* torch\.save file"
    ):
        read_checkpoint(path, "caffe2")
