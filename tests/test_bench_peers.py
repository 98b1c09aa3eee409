"""``benchmarks/bench_peers.py``: the weight maps make every peer our function, the agreement
check catches a wrong copy, and ``--quick`` runs end to end with its ratios printed."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers
from peers import adapters, alexhex7, ann, slowfast

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK_BLOCK_ROWS = [r for r in bench_peers.QUICK_ROWS if isinstance(r, bench_peers.BlockRow)]
PAIRS = [
    pytest.param(row, peer, id=f"{row.name}-{peer.name}")
    for row in QUICK_BLOCK_ROWS
    for peer in adapters.peers_for(row.spec)
]


def _pair(row: bench_peers.BlockRow, peer: adapters.Peer, options: dict | None = None):
    spec = row.spec
    ours = adapters.build_ours(spec, peer.ours_options(spec) if options is None else options)
    adapters.randomise(ours)
    module = peer.build(spec)
    adapters.copy_weights(ours, module, peer, spec)
    return ours, module


@pytest.mark.parametrize(("row", "peer"), PAIRS)
def test_every_peer_computes_our_function(row, peer) -> None:
    ours, module = _pair(row, peer)
    train = "fwd_bwd" in row.steps  # inference-only rows: the peer cannot train
    errs = bench_peers.check_agreement(ours, module, row.spec, label=row.name, train=train)
    assert set(errs) == ({"eval", "train", "grad", "bf16"} if train else {"eval", "bf16"})
    assert max(errs.get(k, 0.0) for k in ("eval", "train", "grad")) <= 1e-5, errs
    assert errs["bf16"] < 0.1, errs
    # the branch is not zero: the check compares something
    x, _ = bench_peers.make_input(row.spec)
    module.eval()
    with torch.no_grad():
        out = module(x)
    branch = out - x if row.spec.kind != "apnb" else out
    assert branch.abs().max() > 0.1


@pytest.mark.parametrize(("row", "peer"), PAIRS)
def test_check_catches_a_wrong_weight_copy(row, peer) -> None:
    ours, module = _pair(row, peer)
    changed = adapters.corrupt_weights(module)
    label, train = f"{row.name}/{peer.name}", "fwd_bwd" in row.steps
    with pytest.raises(bench_peers.MismatchError, match="disagree after the weight copy") as exc:
        bench_peers.check_agreement(ours, module, row.spec, label=label, train=train)
    assert f"{row.name}/{peer.name}" in str(exc.value)
    assert "tolerance 1e-04" in str(exc.value), changed


ROWS = {r.name: r for r in QUICK_BLOCK_ROWS}


@pytest.mark.parametrize(
    ("row", "peer", "wrong"),
    [
        # timm scales by C^-1/2: without θ·√(C/C') the logits differ
        ("nl_4096", replace(adapters.TIMM_NL, transform=None), None),
        # AlexHex7 does not scale: ours with its default C'^-1/2
        ("nl_4096", adapters.ALEXHEX7, {}),
        # SlowFast pools x before φ/g: ours pooling after them
        ("nl_video_sub", adapters.SLOWFAST, {"sub_sample_position": "after"}),
        # mmcv pools after φ/g: ours pooling before
        ("nl_video_sub", adapters.MMCV_NL, {"sub_sample_position": "before"}),
        # mmcv's conv_out has no bias: ours keeping it (seen in eval mode)
        ("nl_4096", replace(adapters.MMCV_NL, prepare_ours=None), None),
    ],
    ids=["timm-scale", "alexhex7-scale", "slowfast-pool", "mmcv-pool", "mmcv-bias"],
)
def test_each_convention_matters(row, peer, wrong) -> None:
    """Each fact of the weight maps is needed: the check fails without it."""
    ours, module = _pair(ROWS[row], peer, wrong)
    with pytest.raises(bench_peers.MismatchError):
        bench_peers.check_agreement(ours, module, ROWS[row].spec)


def test_copy_names_every_key() -> None:
    spec = ROWS["nl_4096"].spec
    ours = adapters.build_ours(spec)
    no_norm = replace(
        adapters.MMCV_NL, rules=lambda s: [r for r in adapters.MMCV_NL.rules(s) if "bn" not in r[0]]
    )
    with pytest.raises(KeyError, match=r"no rule maps the peer's key 'conv_out\.bn\.weight'"):
        adapters.copy_weights(ours, no_norm.build(spec), no_norm, spec)
    keep_bias = replace(adapters.MMCV_NL, dropped=())
    with pytest.raises(KeyError, match=r"our \['conv_out.bias'\] have no counterpart"):
        adapters.copy_weights(ours, keep_bias.build(spec), keep_bias, spec)


def test_stand_ins_follow_their_sources() -> None:
    """Spot values of the stand-ins' conventions (the sources' own defaults)."""
    b = alexhex7.make_block("embedded_gaussian", 8, 4, 2, sub_sample=True)
    assert isinstance(b.phi, torch.nn.Sequential) and isinstance(b.g[1], torch.nn.MaxPool2d)
    assert not b.W[1].weight.detach().any()  # zero-initialised BN
    s = slowfast.Nonlocal(8, 4, pool_size=[1, 2, 2])
    assert s.pool.kernel_size == [1, 2, 2] and not s.pool.ceil_mode
    a = ann.APNB(8, 8, 4, 4, dropout=0.05)
    assert a.stages[0].f_query is a.stages[0].f_key
    assert ann.PSPModule()(torch.randn(1, 3, 9, 9)).shape == (1, 3, 110)


def test_slowfast_stand_in_is_the_package_when_installed() -> None:
    helper = pytest.importorskip("slowfast.models.nonlocal_helper")
    for pool in (None, [1, 2, 2]):
        ours = slowfast.Nonlocal(8, 4, pool_size=pool)
        pkg = helper.Nonlocal(8, 4, pool_size=pool, instantiation="softmax")
        pkg.load_state_dict(ours.state_dict())
        x = torch.randn(2, 8, 2, 4, 4)
        assert torch.equal(ours(x), pkg(x))


def _args(**kw):
    base = {
        "quick": True,
        "threads": 1,
        "warmup": 1,
        "repeat": 3,
        "tol": 1e-4,
        "dtype": list(bench_peers.DTYPES),
        "step": list(bench_peers.STEPS),
        "peers": [],
        "corrupt": [],
    }
    return SimpleNamespace(**{**base, **kw})


def test_plan_checks_first_and_shares_our_configs() -> None:
    table = bench_peers.rows_table(quick=True)
    cases = bench_peers.plan_row(table["nl_video_sub"], _args())
    ours = [c for c in cases if c.impl == "ours"]
    # mmcv: after; AlexHex7: after, unscaled; SlowFast and pytorchvideo: before
    configs = {bench_peers._options_key(c.ours_options) for c in ours}
    assert configs == {
        bench_peers._options_key(o)
        for o in (
            {"sub_sample_position": "after"},
            {"sub_sample_position": "after", "use_scale": False},
            {"sub_sample_position": "before"},
        )
    }
    assert len(ours) == 3 * 4
    peers = [c for c in cases if c.impl != "ours"]
    assert sorted({c.impl for c in peers}) == ["alexhex7", "mmcv", "pytorchvideo", "slowfast"]
    for name in ("mmcv", "slowfast"):
        mine = [c for c in peers if c.impl == name]
        assert (mine[0].dtype, mine[0].step, mine[0].check) == ("float32", "fwd_bwd", True)
        assert not any(c.check for c in mine[1:])
    net = bench_peers.plan_row(table["net_nl_c2d_tiny"], _args(peers=["timm"]))
    assert [(c.impl, c.dtype, c.check) for c in net] == [
        ("fast", "float32", False),
        ("reference", "float32", True),
    ]


def _result(row, impl, ms, mib, options=None, **kw):
    return {
        "row": row,
        "impl": impl,
        "dtype": "float32",
        "step": "fwd_bwd",
        "ours_options": options or {},
        "ms": ms,
        "peak_extra_mib": mib,
        "error": None,
        "check_errors": None,
        **kw,
    }


def test_ratios_are_peer_over_ours() -> None:
    results = [
        _result("nl_4096", "ours", 10.0, 5.0),
        _result("nl_4096", "ours", 20.0, 6.0, {"use_scale": False}),
        _result("nl_4096", "mmcv", 15.0, 50.0),
        _result("nl_4096", "alexhex7", 18.0, 3.0, {"use_scale": False}),
        _result("nl_4096", "timm", 0, 0, error="nl_4096/timm: outputs disagree", error_kind="x"),
        _result("net_nl_c2d_tiny", "fast", 100.0, 10.0, macs=1e9),
        _result("net_nl_c2d_tiny", "reference", 150.0, 20.0, macs=1e9),
    ]
    comps = {c["peer"]: c for c in bench_peers.compare(results)}
    assert comps["mmcv"]["time_ratio"] == 1.5 and comps["mmcv"]["memory_ratio"] == 10.0
    assert comps["alexhex7"]["time_ratio"] == 0.9  # against ours with use_scale=False
    assert comps["alexhex7"]["memory_ratio"] == 0.5
    assert "disagree" in comps["timm"]["error"]
    assert comps["reference"]["time_per_mac_ratio"] == 1.5
    report = bench_peers.format_report(results, quick=True)
    assert "| mmcv | float32 fwd+bwd | 10.0 | 15.0 | 1.50× | 5.0 | 50.0 | 10.00× |" in report
    assert "| alexhex7 | float32 fwd+bwd | 20.0 | 18.0 | 0.90× (loses) |" in report
    assert "| timm | float32 fwd+bwd | aborted: nl_4096/timm: outputs disagree |" in report
    assert "time: ours wins 2/3 (lowest 0.90× vs alexhex7 on nl_4096" in report
    assert "1 comparisons aborted" in report


def test_quick_run_every_row(tmp_path, capsys) -> None:
    out = tmp_path / "peers.json"
    argv = ["--quick", "--group", "all", "--threads", "1", "--repeat", "1", "--json", str(out)]
    assert bench_peers.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["complete"] and data["meta"]["quick"]
    results = data["results"]
    assert not [r for r in results if r["error"]]
    assert {r["row"] for r in results} == set(bench_peers.rows_table(quick=True))
    video = {r["impl"] for r in results if r["row"] == "nl_video"}
    assert video == {"ours", "mmcv", "alexhex7", "timm", "slowfast", "pytorchvideo"}
    assert {r["impl"] for r in results if r["row"] == "gc"} == {"ours", "mmcv", "timm"}
    assert {r["impl"] for r in results if r["row"] == "apnb_64x128"} == {"ours", "ann"}
    checked = {(r["row"], r["impl"]): r["check_errors"] for r in results if r["check"]}
    net_check = checked.pop(("net_nl_c2d_tiny", "reference"))
    assert net_check["eval"] < 1e-4 and max(net_check["train_f64"], net_check["grad_f64"]) < 1e-9
    assert len(checked) == sum(len(adapters.peers_for(r.spec)) for r in QUICK_BLOCK_ROWS)
    for key, errs in checked.items():
        assert max(errs.get(k, 0.0) for k in ("eval", "train", "grad")) < 1e-4, key
    sources = {r["impl"]: r["source"] for r in results if r["row"] == "nl_video"}
    assert sources["ours"] == "nonlocalnet" and sources["slowfast"] == slowfast.source()
    for c in data["comparisons"]:
        assert c["time_ratio"] > 0 and c["ours_ms"] > 0 and c["peer_ms"] > 0, c
    modes = {(r["dtype"], r["step"]) for r in results if r["row"] == "nl_4096"}
    assert modes == {(d, s) for d in bench_peers.DTYPES for s in bench_peers.STEPS}
    net = next(c for c in data["comparisons"] if c["row"] == "net_nl_c2d_tiny")
    assert net["mac_ratio"] == pytest.approx(1.0) and net["time_per_mac_ratio"] > 0
    report = capsys.readouterr().out
    assert "| peer | mode | ours ms | peer ms | time ratio |" in report
    assert "| timm | bfloat16 fwd |" in report
    assert "| reference | float32 fwd+bwd |" in report  # the network row
    assert "Summary: time: ours wins" in report
    assert "nl/timm: timm " in report and "(package)" in report
    assert "stand-in benchmarks/peers/alexhex7.py" in report


def test_quick_run_aborts_a_peer_whose_copy_is_wrong(monkeypatch, capsys) -> None:
    """The orchestration and the report of an aborted peer (cases run in this process)."""

    def in_process(cases, timeout, env=None):
        return bench_peers._worker({"cases": [asdict(c) for c in cases]})["results"]

    monkeypatch.setattr(bench_peers, "_run_batch", in_process)
    argv = ["--quick", "--group", "all", "--threads", "1", "--repeat", "1", "--rows", "nl_4096"]
    argv += ["--peers", "timm,mmcv", "--corrupt", "timm", "--dtype", "float32"]
    assert bench_peers.main(argv) == 1
    report = capsys.readouterr().out
    assert "| timm | float32 fwd+bwd | aborted: nl_4096/timm: outputs disagree" in report
    assert "| timm | float32 fwd | aborted: skipped: nl_4096/timm" in report
    assert "| mmcv | float32 fwd+bwd |" in report and "2 comparisons aborted" in report


def test_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_peers.main(["--quick", "--rows", "nl_9999"])
    assert exc.value.code == 2
    assert "unknown rows ['nl_9999']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_peers.main(["--peers", "fairseq"])
    assert "unknown peers ['fairseq']" in capsys.readouterr().err


def test_interleaved_run_prints_same_run_ratios(capsys) -> None:
    """``--interleave``: ours and each peer alternate in one process; the table has both medians
    and the ratios, after the same agreement check."""
    code = bench_peers.main(
        [
            "--quick",
            "--interleave",
            "3",
            "--rows",
            "gc,concat_784",
            "--dtype",
            "float32",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| gc | mmcv | float32 fwd+bwd |" in out and "| gc | timm | float32 fwd |" in out
    assert "| concat_784 | mmcv | float32 fwd |" in out  # an inference-only row
    assert "concat_784 | mmcv | float32 fwd+bwd" not in out
    rows = [line for line in out.splitlines() if line.startswith("| gc |")]
    assert len(rows) == 4 and all("×" in line for line in rows)
