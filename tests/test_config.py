"""Config validation: shipped configs parse, bad keys/types/values are named, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nonlocalnet.engine.config import (
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = [
    "kinetics_c2d_r50_32x2.yaml",
    "kinetics_nl_c2d_r50_32x2.yaml",
    "kinetics_i3d_r50_32x2.yaml",
    "kinetics_nl_i3d_r50_32x2.yaml",
    "cityscapes_ann_r101_os8.yaml",
    "imagenet_gc_r50.yaml",
]


@pytest.mark.parametrize(
    "name", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("demo_"))
)
def test_shipped_config_parses_and_names_a_registered_model(name: str) -> None:
    from nonlocalnet.models import list_models

    config = load_config(CONFIGS / name)
    assert config.model.name in list_models()
    # Every key of the file is a known key: a round trip through the dataclasses keeps them all
    # (a mapping, such as model.kwargs, may hold more keys merged from a `_base_` file).
    raw = yaml.safe_load((CONFIGS / name).read_text())
    resolved = config_to_dict(config)
    raw.pop("_base_", None)
    for section, values in raw.items():
        for key, value in values.items():
            if isinstance(value, dict):
                assert value.items() <= resolved[section][key].items(), f"{section}.{key}"
            else:
                assert resolved[section][key] == value, f"{section}.{key}"


def test_kinetics_recipe_numbers() -> None:
    c = load_config(CONFIGS / "kinetics_nl_i3d_r50_32x2.yaml")
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.01, 0.9, 1e-4)
    assert not c.optim.decay_norm_and_bias
    assert (c.schedule.name, c.schedule.milestones, c.train.steps) == (
        "step",
        [150000, 300000],
        400000,
    )
    assert c.train.batch_size * 8 == 64
    assert (c.data.num_frames, c.data.sampling_rate) == (32, 2)
    assert (c.data.train_jitter, c.data.train_crop) == ([256, 320], 224)
    assert (c.eval.num_clips, c.eval.num_crops, c.data.test_crop) == (10, 3, 256)


def test_cityscapes_and_imagenet_recipe_numbers() -> None:
    c = load_config(CONFIGS / "cityscapes_ann_r101_os8.yaml")
    assert (c.schedule.name, c.schedule.power, c.train.aux_weight) == ("poly", 0.9, 0.4)
    assert c.train.batch_size * 4 == 8 and c.optim.lr == 0.01
    assert c.data.ignore_index == 255 and c.data.num_classes == 19
    g = load_config(CONFIGS / "imagenet_gc_r50.yaml")
    assert g.optim.lr == 0.1 and g.train.batch_size * 8 == 256
    # 100 epochs of ImageNet-1k at batch 256
    assert g.train.steps == round(1_281_167 * 100 / 256)


def test_coco_1x_recipe_numbers() -> None:
    """GCNet's 1x schedule: 12 epochs of COCO train2017 (117,266 images with annotations) at 16
    images per step, lr 0.02 x0.1 after epochs 8 and 11, warm-up 500 from x0.001."""
    base = load_config(CONFIGS / "coco_maskrcnn_r50_fpn_1x.yaml")
    per_epoch = -(-117_266 // 16)
    assert per_epoch == 7330
    assert base.train.batch_size * 8 == 16 and base.optim.lr == 0.02
    assert base.train.steps == 12 * per_epoch == 87_960
    assert base.schedule.milestones == [8 * per_epoch, 11 * per_epoch] == [58_640, 80_630]
    assert (base.schedule.warmup_steps, base.schedule.warmup_factor) == (500, 0.001)
    assert (base.optim.momentum, base.optim.weight_decay) == (0.9, 1e-4)
    assert (base.data.task, base.data.format, base.data.num_classes) == ("detection", "coco", 91)
    assert base.model.kwargs["norm"] == "sync_bn" and base.model.kwargs["trainable_layers"] == 3
    for name, model in (("coco_gc_maskrcnn_r50_fpn_1x.yaml", "gc_maskrcnn_r50_fpn"),
                        ("coco_nl_maskrcnn_r50_fpn_1x.yaml", "nl_maskrcnn_r50_fpn")):  # fmt: skip
        c = load_config(CONFIGS / name)
        assert c.model.name == model
        a, b = config_to_dict(c), config_to_dict(base)
        for d in (a, b):  # the same recipe: only the model and the run folder differ
            d["model"].pop("name")
            d["train"].pop("out_dir")
        assert a == b, name


def test_unknown_key_names_full_path_and_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"optim\.lrr: unknown key; expected one of lr, momentum"):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ValueError, match=r"^trian: unknown key; expected one of model, data"):
        config_from_dict({"trian": {}})
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: train\.stepz: unknown key"):
        load_config(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected float, got 'fast'"),
        ({"train": {"steps": 1.5}}, r"train\.steps: expected int, got 1\.5"),
        ({"train": {"steps": True}}, r"train\.steps: expected int, got True"),
        ({"optim": {"nesterov": "yes"}}, r"optim\.nesterov: expected bool, got 'yes'"),
        ({"schedule": {"milestones": [10, "x"]}}, r"schedule\.milestones\[1\]: expected int"),
        ({"data": {"train_jitter": 256}}, r"data\.train_jitter: expected list\[int\], got 256"),
        ({"model": {"kwargs": [1]}}, r"model\.kwargs: expected a mapping"),
        ({"optim": 3}, r"optim: expected a mapping"),
    ],
)
def test_wrong_type_names_key_expected_and_got(data: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"schedule": {"name": "linear"}}, r"unknown schedule\.name 'linear'; expected one of"),
        ({"train": {"amp": "fp16"}}, r"unknown train\.amp 'fp16'"),
        ({"train": {"steps": 0}}, r"train\.steps: expected a positive integer, got 0"),
        ({"data": {"train_jitter": [320, 256]}}, r"data\.train_jitter: expected \[min, max\]"),
        ({"schedule": {"milestones": [5, 2]}}, r"schedule\.milestones: expected increasing"),
        (
            {"data": {"max_skip_fraction": 1.5}},
            r"data\.max_skip_fraction: expected a number in \[0, 1\]",
        ),
    ],
)
def test_bad_values_are_named(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_int_is_accepted_for_float_and_converted() -> None:
    config = config_from_dict({"optim": {"lr": 1}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    # YAML 1.1 reads 1e-4 (no dot) as the string "1e-4": accepted where a float is expected.
    config = load_config(None, ["optim.weight_decay=1e-4", "optim.lr=5E-2"])
    assert config.optim.weight_decay == 1e-4 and config.optim.lr == 0.05
    with pytest.raises(TypeError, match=r"optim\.lr: expected float, got '1e-4x'"):
        load_config(None, ["optim.lr=1e-4x"])
    with pytest.raises(TypeError, match=r"train\.steps: expected int, got '1e3'"):
        load_config(None, ["train.steps=1e3"])


def test_overrides_parse_yaml_values_and_are_type_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\ntrain:\n  steps: 10\n")
    config = load_config(
        path,
        ["optim.lr=0.1", "train.steps=100", "schedule.milestones=[30, 60]",
         "model.kwargs.pairwise=dot", "data.mean=[0.5, 0.5, 0.5]", "optim.nesterov=true"],
    )  # fmt: skip
    assert config.optim.lr == 0.1
    assert config.train.steps == 100
    assert config.schedule.milestones == [30, 60]
    assert config.model.kwargs == {"pairwise": "dot"}
    assert config.data.mean == [0.5, 0.5, 0.5]
    assert config.optim.nesterov is True
    with pytest.raises(ValueError, match=r"optim\.lrr: unknown key; expected one of lr"):
        load_config(path, ["optim.lrr=0.1"])
    with pytest.raises(TypeError, match=r"train\.steps: expected int, got 'many'"):
        load_config(path, ["train.steps=many"])
    with pytest.raises(ValueError, match=r"expected key\.path=value"):
        load_config(path, ["optim.lr"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="expected a mapping of sections, got list"):
        load_config(listy)


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    config = load_config(None, ["optim.lr=0.3", "model.name=nl_c2d_tiny", "eval.topk=[1]"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert isinstance(config_to_dict(config)["model"], dict)
    assert Config() == config_from_dict({})


def test_cli_prints_one_line_for_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from nonlocalnet.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "optim.lrr: unknown key" in err[0]
