"""Pretrained starts through the config: ``model.init`` (and ``create_model(name, weights=...)``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from nonlocalnet.engine import config_from_dict, train
from nonlocalnet.engine.checkpoint import latest_checkpoint, load_checkpoint
from nonlocalnet.models import create_model


@pytest.fixture(scope="module")
def torchvision_r50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    with torch.no_grad():  # BN statistics that are not the defaults, so loading them shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    return path


def test_create_model_with_weights_inflates_and_keeps_blocks_identity(
    torchvision_r50: Path,
) -> None:
    tv = torchvision.models.resnet50()
    tv.load_state_dict(torch.load(torchvision_r50, weights_only=True))
    model = create_model("nl_c2d_r50", weights=torchvision_r50, num_classes=7).eval().double()
    report = model.load_report
    assert "loaded 318 keys" in report.summary() and "dropped 2" in report.summary()
    # a C2D on a clip of one repeated frame computes the 2D network frame by frame: compare
    # res4 features (through the NL blocks, which are the identity when fresh)
    frame = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1)  # (1, 3, T, H, W)
    with torch.no_grad():
        f2d = create_feature_extractor(tv.eval().double(), {"layer3": "c4"})(frame)["c4"]
        f3d = model.forward_stages(clip)[2]  # (1, C, T', H', W')
    for t in range(f3d.shape[2]):
        assert torch.allclose(f3d[:, :, t], f2d, atol=1e-10, rtol=1e-10)


def test_model_init_in_a_config_starts_training(
    tmp_path: Path, torchvision_r50: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = {
        "model": {"name": "nl_c2d_r50", "init": str(torchvision_r50)},
        "data": {"task": "video", "format": "toy:datasets", "num_classes": 3, "num_frames": 8,
                 "train_crop": 64, "kwargs": {"num_samples": 2}, "num_workers": 0},
        "optim": {"lr": 1e-7},  # one tiny step: the weights stay next to the file's
        "train": {"steps": 1, "batch_size": 1, "log_every": 1, "checkpoint_every": 1,
                  "eval_every": -1, "progress": False},
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="nonlocalnet.engine.train"):
        result = train(config_from_dict(cfg), out_dir=tmp_path / "run")
    assert result["step"] == 1
    assert "model.init: nl_c2d_r50 <- " in caplog.text and "loaded 318 keys" in caplog.text
    # the trained weights started from the file: conv1 moved by one SGD step only
    tv = torch.load(torchvision_r50, weights_only=True)
    trained = load_checkpoint(latest_checkpoint(tmp_path / "run"))["model"]
    assert torch.allclose(trained["conv1.weight"][:, :, 0], tv["conv1.weight"], atol=1e-3)
    assert not torch.equal(trained["conv1.weight"][:, :, 0], tv["conv1.weight"])
    # a resumed run does not need the file any more (it continues from its checkpoint)
    cfg["train"]["steps"] = 2
    cfg["model"]["init"] = str(tmp_path / "moved_away.pth")
    assert train(config_from_dict(cfg), out_dir=tmp_path / "run", resume=True)["step"] == 2


def test_a_bad_init_is_one_clear_error(tmp_path: Path, torchvision_r50: Path) -> None:
    cfg = {
        "model": {"name": "c2d_tiny", "init": str(torchvision_r50)},
        "data": {"task": "video", "format": "toy:datasets", "num_classes": 3, "num_frames": 8,
                 "train_crop": 32, "kwargs": {"num_samples": 2}, "num_workers": 0},
        "train": {"steps": 1, "batch_size": 1, "eval_every": -1, "progress": False},
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"conv1\.weight|shape|fit"):
        train(config_from_dict(cfg), out_dir=tmp_path / "a")  # an R50 file into a tiny net
    cfg["model"]["init_format"] = "nope"
    with pytest.raises(ValueError, match=r"nope"):
        train(config_from_dict(cfg), out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
