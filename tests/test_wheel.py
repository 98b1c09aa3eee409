"""The main job works from an installed wheel, outside the checkout.

The wheel is built from the checkout and installed (without dependencies) into a fresh virtual
environment; torch and the other dependencies come from the test's environment through a path
entry, so nothing is downloaded. The reduced demo then runs from a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.video_io]

TINY_DEMO = [
    "data.kwargs.num_train=32",
    "data.kwargs.num_val=16",
    "data.num_workers=0",
    "train.steps=2",
    "train.batch_size=8",
    "train.log_every=1",
    "eval.num_clips=1",
    "eval.num_crops=1",
]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_demo_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)]
    )  # fmt: skip
    (wheel,) = wheels.glob("nonlocalnet-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    # torch & co. from this environment; its editable nonlocalnet is a .pth there, not read here
    deps = sysconfig.get_paths()["purelib"]
    Path(site.stdout.strip(), "deps.pth").write_text(deps + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    where = _run(
        [str(py), "-c", "import nonlocalnet; print(nonlocalnet.__file__)"], cwd=work, env=env
    )
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout
    cmd = [str(venv / "bin" / "nonlocalnet"), "demo", "--out", "out", "--data-root", "data"]
    _run([*cmd, "--no-attention", *TINY_DEMO], cwd=work, env=env)
    report = json.loads((work / "out" / "metrics.json").read_text())
    assert set(report["models"]) == {"c2d", "nl_c2d"}
    assert report["models"]["nl_c2d"]["steps"] == 2
