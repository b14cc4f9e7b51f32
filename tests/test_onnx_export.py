"""export_onnx: folded, sparse, verified ONNX that onnxruntime runs like PyTorch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import sparsify_fx
from sparsify_fx.errors import ExportError, InputError
from sparsify_fx.cli.export import main as cli_main
from sparsify_fx.export.onnx_export import OnnxExport, run_onnx
from sparsify_fx.export.sparse_initializers import coo_lower_bound, sparsify_initializers
from sparsify_fx.models import DigitsCNN
from tests.zoo import ZOO, build, first_tensor

RTOL, ATOL = 1e-4, 1e-5


def random_mask(model: nn.Module, keep: float = 0.1, seed: int = 0) -> nn.Module:
    """Freeze every mask of ``model`` to a seeded random element mask keeping ``keep``."""
    gen = torch.Generator().manual_seed(seed)
    for entry in sparsify_fx.masks(model):
        entry.mask.freeze(torch.rand(entry.mask.score_shape, generator=gen) >= 1.0 - keep)
    return model


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def zeros_fraction(model: onnx.ModelProto, name: str) -> float:
    """Sparsity of initializer ``name`` read back from the file, dense or sparse."""
    for init in model.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init)
            return 1.0 - np.count_nonzero(arr) / arr.size
    for sp in model.graph.sparse_initializer:
        if sp.values.name == name:
            return 1.0 - numpy_helper.to_array(sp.values).size / int(np.prod(sp.dims))
    raise KeyError(name)


@pytest.fixture(scope="module")
def digits_model() -> nn.Module:
    """DigitsCNN briefly trained on 8x8 digits (non-trivial BatchNorm statistics), 90 % pruned."""
    from sparsify_fx.data import digits

    torch.manual_seed(0)
    model = DigitsCNN(width=8, hidden=32)
    x, y = digits().train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(30):
        idx = torch.arange(i * 32, i * 32 + 32) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return random_mask(sparsify_fx.transform(model.eval(), method="cs"))


@pytest.fixture(scope="module")
def digits_export(digits_model: nn.Module, tmp_path_factory) -> OnnxExport:
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    return sparsify_fx.export_onnx(digits_model, torch.randn(4, 1, 8, 8), path)


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory) -> tuple[nn.Module, OnnxExport]:
    model, x = build("resnet18")
    gm = random_mask(sparsify_fx.transform(model, method="cs"))
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    return gm, sparsify_fx.export_onnx(gm, x, path)


# -- the small CNN the demo exports ------------------------------------------------------
def test_digits_export_matches_pytorch_at_other_batch(digits_model, digits_export):
    result = digits_export
    assert result.path.is_file() and result.bytes == result.path.stat().st_size
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
    x = torch.randn(9, 1, 8, 8)  # batch 9, example batch was 4
    with torch.no_grad(), sparsify_fx.hard_masks(digits_model):
        expected = digits_model(x).numpy()
    for got in (result.run(x), run_onnx(result.path, x), run_onnx(result.path, [x.numpy()])):
        assert got.shape == (9, 10)
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_digits_graph_is_folded_and_sparse(digits_model, digits_export):
    ops = op_types(digits_export.path)
    assert "Sigmoid" not in ops and "Mul" not in ops, ops  # no mask arithmetic
    assert "BatchNormalization" not in ops, ops  # BN folded into the convs
    proto = onnx.load(str(digits_export.path))
    sparse = {s.values.name for s in proto.graph.sparse_initializer}
    masked = {e.name for e in sparsify_fx.masks(digits_model)}
    assert sparse == masked == set(digits_export.sparse_names)
    dense_names = {i.name for i in proto.graph.initializer}
    assert not sparse & dense_names
    assert not sparse & {v.name for v in proto.graph.value_info}
    for name in masked:  # the sparsity in the file is the mask's, counted from tensors
        layer = sparsify_fx.sparsity(digits_model, per_layer=True)[name]
        assert zeros_fraction(proto, name) == pytest.approx(layer, abs=1e-9)
    onnx.checker.check_model(proto)


def test_export_does_not_mutate_model(digits_model, tmp_path):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    digits_model.train()
    try:
        sparsify_fx.export_onnx(digits_model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx",
                                latency_runs=0)
        assert digits_model.training and all(m.training for m in digits_model.modules())
        assert all(not e.mask.hard for e in sparsify_fx.masks(digits_model))
        after = digits_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        digits_model.eval()


def test_plain_model_without_masks_exports_dense(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(width=4, hidden=16).eval()
    x = torch.randn(3, 1, 8, 8)
    result = sparsify_fx.export_onnx(model, x, tmp_path / "plain.onnx")
    assert result.sparse_names == [] and result.bytes == result.dense_bytes
    np.testing.assert_allclose(result.run(x), model(x).detach().numpy(), rtol=RTOL, atol=ATOL)
    assert "BatchNormalization" not in op_types(result.path)


def test_batch_one_example_still_exports_dynamic_batch(digits_model, tmp_path):
    result = sparsify_fx.export_onnx(digits_model, torch.randn(1, 1, 8, 8), tmp_path / "b1.onnx",
                                     latency_runs=0)
    dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    assert result.run(torch.randn(5, 1, 8, 8)).shape == (5, 10)


# -- verification failures leave nothing behind ------------------------------------------
def test_tampered_model_fails_verification_and_leaves_no_file(digits_model, tmp_path):
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), sparsify_fx.hard_masks(digits_model):
        reference = digits_model(x)
    tampered = sparsify_fx.fold(digits_model)
    with torch.no_grad():  # weights changed after the reference outputs were taken
        tampered.get_submodule("classifier.3").weight.mul_(1.5)
    path = tmp_path / "tampered.onnx"
    with pytest.raises(ExportError, match="max abs diff"):
        sparsify_fx.export_onnx(tampered, x, path, reference_outputs=reference)
    assert os.listdir(tmp_path) == []  # neither the file nor the staging directory


def test_unwritable_paths_raise_clear_errors(digits_model, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="does not exist"):
        sparsify_fx.export_onnx(digits_model, x, blocker / "m.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        sparsify_fx.export_onnx(digits_model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        sparsify_fx.export_onnx(digits_model, x, tmp_path)
    with pytest.raises(InputError, match="example_inputs"):
        sparsify_fx.export_onnx(digits_model, [1, 2], tmp_path / "m.onnx")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux procfs")
def test_directory_nobody_can_write_into(digits_model):
    """/proc refuses new files even to root (the case the permission test below skips)."""
    with pytest.raises(ExportError, match="cannot write ONNX"):
        sparsify_fx.export_onnx(digits_model, torch.randn(2, 1, 8, 8), "/proc/m.onnx")
    assert not os.path.exists("/proc/m.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory(digits_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ExportError, match="not writable"):
        sparsify_fx.export_onnx(digits_model, torch.randn(2, 1, 8, 8), locked / "m.onnx")


def test_reload_in_fresh_process(digits_export, tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", digits_export.run(x))
    script = (
        "import sys, numpy as np, onnx, onnxruntime as ort\n"
        "m = onnx.load(sys.argv[1]); onnx.checker.check_model(m)\n"
        "assert len(m.graph.sparse_initializer) > 0\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "y = s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0]\n"
        "np.testing.assert_allclose(y, np.load(sys.argv[3]), rtol=1e-5, atol=1e-6)\n"
        "print('ok', y.shape)\n")
    done = subprocess.run([sys.executable, "-c", script, str(digits_export.path),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok (6, 10)" in done.stdout


# -- storage options -----------------------------------------------------------------------
def test_threshold_sparse_false_and_external_data(digits_model, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    dense = sparsify_fx.export_onnx(digits_model, x, tmp_path / "dense.onnx", sparse=False,
                                    external_data=True, latency_runs=0)
    assert dense.sparse_names == [] and dense.external_data is not None
    assert dense.external_data.is_file() and dense.external_data.parent == tmp_path
    assert dense.bytes == dense.path.stat().st_size + dense.external_data.stat().st_size
    np.testing.assert_allclose(run_onnx(dense.path, x), dense.run(x))
    strict = sparsify_fx.export_onnx(digits_model, x, tmp_path / "strict.onnx", min_sparsity=0.95,
                                     latency_runs=0)
    assert strict.sparse_names == []  # ~90 % sparse layers stay dense under a 0.95 threshold
    assert sorted(os.listdir(tmp_path)) == ["dense.onnx", "dense.onnx.data", "strict.onnx"]


def _toy_graph(arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])
    names = list(arrays)
    nodes = [helper.make_node("MatMul", ["x", names[0]], ["h0"])]
    for i, name in enumerate(names[1:], 1):
        nodes.append(helper.make_node("MatMul", [f"h{i - 1}", name], [f"h{i}"]))
    nodes.append(helper.make_node("Identity", [f"h{len(names) - 1}"], ["y"]))
    inits = [numpy_helper.from_array(a, name=n) for n, a in arrays.items()]
    info = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [4, 4]) for n in names]
    graph = helper.make_graph(nodes, "toy", [x], [y], inits, value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sparsify_initializers_rules_and_roundtrip():
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in ("a", "b", "c")}
    w["a"].reshape(-1)[rng.permutation(16)[:14]] = 0  # 87.5 %: COO smaller -> sparse
    w["b"].reshape(-1)[rng.permutation(16)[:10]] = 0  # 62.5 %: over 0.5, but COO larger
    model = _toy_graph(w)
    bound = coo_lower_bound(model)
    report = {r.name: r for r in sparsify_initializers(model, 0.5)}
    assert [report[n].storage for n in "abc"] == ["sparse", "dense", "dense"]
    assert report["b"].reason == "COO would be larger" and report["c"].sparsity == 0.0
    assert report["a"].bytes == 2 * 12 and report["a"].dense_bytes == 64
    (sp,) = model.graph.sparse_initializer
    assert sp.values.name == "a" and list(sp.dims) == [4, 4]
    assert sp.indices.data_type == onnx.TensorProto.INT64 and list(sp.indices.dims) == [2]
    dense = np.zeros(16, np.float32)
    dense[numpy_helper.to_array(sp.indices)] = numpy_helper.to_array(sp.values)
    np.testing.assert_array_equal(dense.reshape(4, 4), w["a"])
    assert [v.name for v in model.graph.value_info] == ["b", "c"]
    assert bound < model.ByteSize() + 64  # the bound stores "a" as COO too
    onnx.checker.check_model(model)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w["a"] @ w["b"] @ w["c"],
                               rtol=1e-5, atol=1e-6)
    forced = _toy_graph(w)
    sparsify_initializers(forced, 0.5, only_if_smaller=False)
    assert sorted(s.values.name for s in forced.graph.sparse_initializer) == ["a", "b"]


# -- resnet18 at 64x64 (default run) and the zoo (slow) ------------------------------------
def test_resnet18_random_90_percent(resnet_export):
    gm, result = resnet_export
    assert result.max_abs_diff <= result.tolerance
    assert result.ratio <= 0.31, result.summary()
    ops = op_types(result.path)
    assert not ops & {"Sigmoid", "BatchNormalization", "Mul"}, ops
    masked = {e.name for e in sparsify_fx.masks(gm)}
    assert set(result.sparse_names) == masked
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        expected = gm(x).numpy()
    got = result.run(x)
    assert np.abs(got - expected).max() <= ATOL + RTOL * np.abs(expected).max()
    assert result.latency_ms is not None  # its value: test_latency_is_the_median_run


def test_latency_is_the_median_run(monkeypatch) -> None:
    """export_onnx's latency is the median of the timed runs (after one warm-up), in ms."""
    from sparsify_fx.export import onnx_export

    class Session:
        calls = 0

        def get_inputs(self):
            return [type("I", (), {"name": "x"})()]

        def run(self, _out, _feed):
            Session.calls += 1
            return [np.zeros(1)]

    durations = iter([0.0, 0.004, 1.0, 1.001, 2.0, 2.009, 3.0, 3.002, 4.0, 4.003])
    monkeypatch.setattr(onnx_export.time, "perf_counter", lambda: next(durations))
    ms = onnx_export._latency(Session(), (torch.zeros(1),), 5)
    assert ms == pytest.approx(3.0)  # median of 4, 1, 9, 2, 3 ms
    assert Session.calls == 6  # one warm-up run, then five timed
    assert onnx_export._latency(Session(), (torch.zeros(1),), 0) is None


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  for n in ZOO if n != "resnet18"])
def test_zoo_exports_and_verifies(name, tmp_path):
    model, x = build(name)
    gm = random_mask(sparsify_fx.transform(model, method="cs"))
    result = sparsify_fx.export_onnx(gm, x, tmp_path / f"{name}.onnx", latency_runs=1)
    assert result.max_abs_diff <= result.tolerance
    # the exporter may rename weights it rewrites (transposes, q/k/v slices): count them
    assert len(result.sparse_names) >= 0.9 * len(sparsify_fx.masks(gm)), result.initializers
    assert result.ratio < 0.5, result.summary()
    bn_nodes = sum(n.op_type == "BatchNormalization"
                   for n in onnx.load(str(result.path)).graph.node)
    if name in ("maxvit_t", "densenet121"):  # pre-activation BatchNorm precedes its conv
        assert bn_nodes < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    else:
        assert bn_nodes == 0
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        expected = first_tensor(gm(x)).numpy()
    got = result.run(x)
    assert np.abs(got - expected).max() <= ATOL + RTOL * np.abs(expected).max()


# -- command line ---------------------------------------------------------------------------
def test_cli_export(digits_model, tmp_path, capsys):
    saved = tmp_path / "model.pt"
    torch.save(digits_model, saved)
    out, report = tmp_path / "cli.onnx", tmp_path / "cli.json"
    code = cli_main([str(saved), "-o", str(out), "--input-shape", "2,1,8,8",
                     "--json", str(report), "--trust-pickle"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(report.read_text())
    assert record["bytes"] == out.stat().st_size and record["ratio"] < 1.0
    assert record["max_abs_diff"] <= record["tolerance"]
    assert "sparse" in capsys.readouterr().out
    assert cli_main([str(tmp_path / "nope.pt"), "-o", str(out), "--input-shape", "1"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main([str(saved), "-o", str(out), "--input-shape", "a,b"]) == 2
    assert cli_main(["--help"]) == 0


class _Attention(nn.Module):
    """nn.MultiheadAttention is a leaf: its weights are masked through parametrize."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_parametrized_masks_export_and_model_survives(tmp_path):
    torch.manual_seed(0)
    gm = random_mask(sparsify_fx.transform(_Attention().eval(), method="cs"))
    assert any(e.route == "parametrize" for e in sparsify_fx.masks(gm))
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        before = gm(x)
    # TorchScript exporter: ~1 s here against ~15 s for torch.export (fold is the same)
    result = sparsify_fx.export_onnx(gm, x, tmp_path / "attn.onnx", latency_runs=0,
                                     dynamo=False)
    assert result.max_abs_diff <= result.tolerance
    assert len(result.sparse_names) >= 2, result.initializers
    with torch.no_grad(), sparsify_fx.hard_masks(gm):  # the input model still works
        torch.testing.assert_close(gm(x), before)
    assert any(e.route == "parametrize" for e in sparsify_fx.masks(gm))  # masks still there


class _Similarity(nn.Module):
    """Output (N, M): a similarity matrix between two batches."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(6, 8), nn.Linear(5, 8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fa(a) @ self.fb(b).T


def test_output_following_two_inputs_batches_verifies_at_a_new_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Similarity().eval()
    a, b = torch.randn(3, 6), torch.randn(3, 5)
    assert model(a, b).std() > 0.1
    result = sparsify_fx.export_onnx(model, (a, b), tmp_path / "sim.onnx")
    assert result.max_abs_diff < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "sim.onnx"))
    a5, b5 = torch.randn(5, 6), torch.randn(5, 5)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {names[0]: a5.numpy(), names[1]: b5.numpy()})[0]
    assert got.shape == (5, 5)
    assert np.abs(got - model(a5, b5).detach().numpy()).max() < 1e-4
