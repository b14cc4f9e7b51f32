"""Wanda, SparseGPT and CS on causal LMs (issue 23): tiny random HF configs, nothing downloads.

Llama with GQA (4 query heads, 2 KV heads) and GPT-2 (Conv1D: ``(in, out)`` weights, the
input dimension is dim 0) are captured with torch.export; a one-layer fx model checks
SparseGPT against a direct optimal-brain-surgeon computation written here.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import sparsify_fx
from sparsify_fx.baselines.layer_inputs import rows_of, watch_inputs
from sparsify_fx.baselines.mask_init import init_cs_from_masks
from sparsify_fx.errors import ConfigError, InputError, SparsifyError
from sparsify_fx.granularity import parse_granularity
from sparsify_fx.mask_index import hard_masks

transformers = pytest.importorskip("transformers")

AUTO = torch.export.Dim.AUTO
VOCAB = 96


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, tie_word_embeddings=True)).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0)).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}


@pytest.fixture(scope="module")
def sources() -> dict[str, nn.Module]:
    return {k: build() for k, build in MODELS.items()}


@pytest.fixture(scope="module")
def calibrated(sources):
    """``get(name, method, gran) -> (model, CalibrationResult)``, each built once per module
    (later tests only read them: fold and export work on copies)."""
    cache: dict[tuple[str, str, str], tuple[nn.Module, object]] = {}

    def get(name: str, method: str, gran: str):
        key = (name, method, gran)
        if key not in cache:
            gm = _transform(sources[name], method=method, granularity=gran,
                            target_sparsity=0.5 if gran == "element" else None)
            assert sparsify_fx.sparsity(gm) == 0.0  # untouched until calibrated
            with pytest.raises(sparsify_fx.TargetNotAppliedError):
                sparsify_fx.fold(gm)
            cache[key] = (gm, sparsify_fx.calibrate(gm, _batches()))
        return cache[key]
    return get


def _batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (4, 16), generator=g),) for _ in range(n)]


def _transform(source: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify_fx.transform(source, example_inputs=_batches(1)[0],
                                     dynamic_shapes=({0: AUTO, 1: AUTO},), **kw)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _canon(entry, tensor: torch.Tensor) -> torch.Tensor:
    """(out, in) view of a weight-shaped tensor (GPT-2 Conv1D weights are (in, out))."""
    return tensor.t() if entry.kind == "matmul" else tensor


CASES = [("llama", "wanda", "element"), ("llama", "sparsegpt", "2:4"),
         ("gpt2", "sparsegpt", "element"), ("gpt2", "wanda", "4:8")]


@pytest.mark.parametrize("name,method,gran", CASES)
def test_exact_cut_pattern_and_fold(sources, calibrated, name, method, gran, tmp_path):
    source = sources[name]
    gm, result = calibrated(name, method, gran)
    entries = sparsify_fx.masks(gm)
    if name == "llama":  # q/k/v and gate/up read one input each: they share one statistic
        assert [len(g) for g in result.groups] == [3, 1, 2, 1] * 2
    zeros = total = 0
    for e in entries:  # counted from the mask tensors
        keep = _canon(e, e.mask.hard_mask())
        zeros += int((~keep).sum())
        total += keep.numel()
        if gran == "element":  # Wanda / SparseGPT: every layer at the target
            assert int((~keep).sum()) == keep.numel() // 2
        else:
            n, m = map(int, gran.split(":"))
            assert keep.shape[1] % m == 0
            assert (keep.reshape(keep.shape[0], -1, m).sum(-1) == n).all()
    assert zeros / total == 0.5 == sparsify_fx.sparsity(gm) == result.sparsity
    gm.eval()
    a, b = _batches(2, seed=7)
    with torch.no_grad():
        assert (_logits(source(*a)) - _logits(source(*b))).abs().max() > 1e-3  # not a dead net
        with hard_masks(gm):
            hard = _logits(gm(*a))
        assert (hard - _logits(source(*a))).abs().max() > 1e-4  # the cut changed the model
        plain = sparsify_fx.fold(gm)
        torch.testing.assert_close(_logits(plain(*a)), hard, rtol=0, atol=1e-5)
    folded = plain.state_dict()
    prefix = getattr(plain, "logical_name_prefix", "")
    for e in entries:  # the folded weights hold the zeros
        assert int((folded[prefix + e.name] == 0).sum()) == int((~e.mask.hard_mask()).sum())
    if name == "llama" and method == "sparsegpt":
        res = sparsify_fx.export_onnx(gm, a, tmp_path / "llama.onnx", latency_runs=0)
        assert res.max_abs_diff is not None and res.max_abs_diff <= res.tolerance
        assert res.sparse_names


def _magnitude_keep(w: torch.Tensor, gran: str) -> torch.Tensor:
    """Per-layer magnitude keep mask of an (out, in) weight: half the weights, or 2:4."""
    if gran == "2:4":
        return parse_granularity(gran).pattern_keep(w.abs())
    flat = w.abs().reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, flat.numel() // 2).indices] = True
    return keep.reshape(w.shape)


@pytest.mark.parametrize("gran", ["element", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(sources, calibrated, gran):
    source = sources["llama"]
    gm, _ = calibrated("llama", "sparsegpt", gran)
    batches = _batches()
    entries = sparsify_fx.masks(gm)
    inputs: dict[str, list[torch.Tensor]] = {}
    gm.eval()
    with torch.no_grad(), watch_inputs(entries, lambda n, x: inputs.setdefault(n, []).append(x)):
        for (ids,) in batches:  # each layer's input as SparseGPT saw it (earlier layers pruned)
            gm(ids)
    for e in entries:
        x = torch.cat([rows_of(t, e.mask.weight_shape[1], e.name) for t in inputs[e.name]])
        dense = source.get_parameter(e.name).detach().double()
        pruned = (e.weight.detach() * e.mask.fold_factor()).double()
        mag = dense * _magnitude_keep(dense, gran)
        err_sgpt = (x @ (dense - pruned).t()).pow(2).sum()
        err_mag = (x @ (dense - mag).t()).pow(2).sum()
        assert err_sgpt < err_mag, e.name


def _direct_obs(w: torch.Tensor, h: torch.Tensor, nm: tuple[int, int] | None,
                prune: int = 0) -> torch.Tensor:
    """Unblocked optimal brain surgeon, one weight at a time per row, columns left to right:
    pruning column j of a row moves the row's not-yet-processed weights by
    ``-w_j / [Hj^-1]_00 * [Hj^-1]_0,:`` with ``Hj = H[j:, j:]`` (explicit inverses).
    Selection: N:M at each group's first column by ``w_k^2 / [Hk^-1]_00`` on the current
    weights; unstructured: the ``prune`` lowest of that score on the initial weights."""
    w = w.double().clone()
    rows, cols = w.shape
    inv = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    sal = torch.tensor([float(inv[j][0, 0]) for j in range(cols)], dtype=torch.float64)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is None:
        pruned.view(-1)[torch.argsort((w.pow(2) / sal).reshape(-1))[:prune]] = True
    for r in range(rows):
        for j in range(cols):
            if nm is not None and j % nm[1] == 0:
                score = w[r, j:j + nm[1]].pow(2) / sal[j:j + nm[1]]
                pruned[r, j + torch.argsort(score)[:nm[1] - nm[0]]] = True
            if pruned[r, j]:
                w[r, j:] -= w[r, j] / inv[j][0, 0] * inv[j][0, :]
    return w


@pytest.mark.parametrize("gran,blocksize", [("2:4", 8), ("element", 128)])
def test_sparsegpt_equals_direct_obs(gran, blocksize):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 6, bias=False))
    gm = sparsify_fx.transform(model, method="sparsegpt", granularity=gran, blocksize=blocksize,
                               target_sparsity=0.5 if gran == "element" else None)
    batches = [(torch.randn(40, 16) + torch.randn(16),) for _ in range(3)]
    sparsify_fx.calibrate(gm, batches)
    x = torch.cat([b[0] for b in batches]).double()
    h = x.t() @ x / x.shape[0]
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(16, dtype=torch.float64)
    want = _direct_obs(model[0].weight.detach(), h, (2, 4) if gran == "2:4" else None, 48)
    (entry,) = sparsify_fx.masks(gm)
    got = entry.weight.detach().double() * entry.mask.fold_factor().double()
    assert torch.equal(got != 0, want.abs() > 1e-12)  # the same weights pruned
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gran", ["element", "2:4"])
def test_wanda_scores_per_output_row(gran):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 5))
    gm = sparsify_fx.transform(model, method="wanda", granularity=gran,
                               target_sparsity=0.5 if gran == "element" else None)
    batches = [(torch.randn(30, 12) * torch.linspace(0.1, 3, 12),) for _ in range(2)]
    sparsify_fx.calibrate(gm, batches)
    x = torch.cat([b[0] for b in batches])
    score = model[0].weight.detach().abs() * x.pow(2).sum(0).sqrt()
    if gran == "element":  # each row keeps its own 6 best
        want = torch.zeros_like(score, dtype=torch.bool)
        want.scatter_(1, torch.topk(score, 6, dim=1).indices, True)
    else:  # the 2 best of every 4 consecutive inputs
        top = torch.topk(score.reshape(5, 3, 4), 2, dim=-1).indices
        want = torch.zeros(5, 3, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(5, 12)
    (entry,) = sparsify_fx.masks(gm)
    assert torch.equal(entry.mask.hard_mask(), want)
    assert torch.equal(entry.weight, model[0].weight)  # Wanda does not update weights


def test_calibrate_refusals(sources):
    mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    mag = sparsify_fx.transform(mlp, method="magnitude", target_sparsity=0.5)
    with pytest.raises(ConfigError, match="'magnitude' needs no calibration.*sparsegpt"):
        sparsify_fx.calibrate(mag, [(torch.randn(2, 16),)])
    with pytest.raises(InputError, match="sparsify_fx.transform"):
        sparsify_fx.calibrate(mlp, [(torch.randn(2, 16),)])
    gm = sparsify_fx.transform(mlp, method="wanda", target_sparsity=0.5)
    with pytest.raises(InputError, match="empty iterable"):
        sparsify_fx.calibrate(gm, iter([]))
    with pytest.raises(InputError, match="iterable of batches"):
        sparsify_fx.calibrate(gm, torch.randn(2, 16))
    with pytest.raises(InputError, match="batch 1 .*does not run through"):
        sparsify_fx.calibrate(gm, [(torch.randn(2, 16),), (torch.randn(2, 7),)])
    assert sparsify_fx.sparsity(gm) == 0.0  # a refused calibration cut nothing
    llama = _transform(sources["llama"], method="sparsegpt", target_sparsity=0.5)
    with pytest.raises(InputError, match="batch 0 .*does not match the capture.*int64"):
        sparsify_fx.calibrate(llama, [(torch.rand(4, 16),)])
    with pytest.raises(InputError, match="keyword 'labels'"):
        sparsify_fx.calibrate(llama, [{"input_ids": _batches(1)[0][0], "labels": torch.ones(2)}])
    result = sparsify_fx.calibrate(llama, [{"input_ids": b[0]} for b in _batches()])
    assert result.sparsity == 0.5 and issubclass(InputError, SparsifyError)


@pytest.mark.parametrize("gran", ["element", "2:4"])  # from a Wanda / a SparseGPT mask
def test_cs_on_causal_lm_from_oneshot_mask(sources, calibrated, gran):
    source = sources["llama"]
    target = 0.5 if gran == "element" else None
    oneshot, _ = calibrated("llama", "wanda" if gran == "element" else "sparsegpt", gran)
    cs = _transform(source, method="cs", granularity=gran, target_sparsity=target,
                    s_init=2.0, per_layer=True)
    assert init_cs_from_masks(cs, oneshot) == len(sparsify_fx.masks(cs))
    for a, b in zip(sparsify_fx.masks(cs), sparsify_fx.masks(oneshot)):
        assert torch.equal(a.mask.learned_keep(), b.mask.hard_mask())
    steps = 4
    sched = sparsify_fx.CSScheduler(cs, epochs=1, per_step=True, steps_per_epoch=steps)
    opt = torch.optim.Adam(sparsify_fx.param_groups(cs, lr=1e-3, mask_lr=1e-2))
    cs.train()
    for (ids,) in _batches(steps, seed=5):  # a few steps of the LM loss
        logits = _logits(cs(ids))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                           ids[:, 1:].reshape(-1)) + sched.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert sched.cut is not None  # the completing step cut exactly
    assert sparsify_fx.sparsity(cs) == 0.5
    if gran == "2:4":
        for e in sparsify_fx.masks(cs):
            keep = e.mask.hard_mask()
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
    assert math.isfinite(float(loss.detach()))


def test_cs_init_refusals():
    mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    oneshot = sparsify_fx.transform(mlp, method="wanda", target_sparsity=0.5)
    sparsify_fx.calibrate(oneshot, [(torch.randn(8, 16),)])
    with pytest.raises(ConfigError, match="s_init > 0"):
        init_cs_from_masks(sparsify_fx.transform(mlp, method="cs", target_sparsity=0.5), oneshot)
    partial = sparsify_fx.transform(mlp, method="wanda", target_sparsity=0.5,
                                    include=["0.weight"])
    with pytest.raises(ConfigError, match="no mask on 2.weight"):
        init_cs_from_masks(sparsify_fx.transform(mlp, method="cs", s_init=1.0), partial)
    with pytest.raises(ConfigError, match="method='cs'"):
        init_cs_from_masks(oneshot, oneshot)


def test_cs_channel_groups_start_from_the_l1_cut(sources):
    """Channel CS on a GQA Llama capture starts from the one-shot L1 channel cut: every
    group's hard mask equals the L1 model's before training, so a cut at the same MACs
    keeps every slot the L1 cut kept (and may add cheap ones the L1 prefix left out)."""
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    source = sources["llama"]
    oneshot = _transform(source, method="magnitude", granularity="channel")
    apply_budget(oneshot, target_macs=0.7, scores=channel_l1_scores(oneshot, per_weight=True))
    cs = _transform(source, method="cs", granularity="channel", target_macs=0.7, s_init=1.0,
                    rescale=False)
    assert init_cs_from_masks(cs, oneshot) == len(group_masks(cs)) > 0
    theirs = group_masks(oneshot)
    kept = {k: m.learned_keep() for k, m in group_masks(cs).items()}
    assert all(torch.equal(kept[k], theirs[k].hard_mask()) for k in kept)
    assert any(not bool(v.all()) for v in kept.values())
    apply_budget(cs, target_macs=0.7)
    for k, m in group_masks(cs).items():
        assert bool((m.hard_mask() | ~theirs[k].hard_mask()).all()), k
    assert sparsify_fx.report(cs, _batches(1)[0]).blocks["model_fraction"] <= 0.7 + 1e-9
    with pytest.raises(ConfigError, match="s_init > 0"):
        init_cs_from_masks(_transform(source, method="cs", granularity="channel"), oneshot)


@pytest.mark.slow
def test_gpt2_calibrated_exports_to_onnx(calibrated, tmp_path):
    gm, _ = calibrated("gpt2", "wanda", "4:8")
    res = sparsify_fx.export_onnx(gm, _batches(1, seed=9)[0], tmp_path / "gpt2.onnx",
                                  latency_runs=0)
    assert res.max_abs_diff is not None and res.max_abs_diff <= res.tolerance
    assert res.sparse_names
