"""Structure on torch.export captures: heads, KV groups, MLP units (issue 22).

Tiny random-weight configs (2 layers, hidden 64). For each: transform with
``granularity="channel"``, two CS epochs on synthetic data, the exact cut at
``target_macs=0.5``, ``shrink`` into the source class; outputs equal the
hard-masked capture at two batch sizes and two sequence lengths.
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import sparsify_fx as sf
from sparsify_fx.mask_index import hard_masks
from sparsify_fx.passes.shrink.to_source import config_cannot_hold, fold_to_source

transformers = pytest.importorskip("transformers")
VOCAB = 96


class FusedBlock(nn.Module):
    """One fused q/k/v Linear (chunked) and one fused gate/up Linear (chunked)."""

    def __init__(self, d: int = 64, heads: int = 4, inter: int = 96) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.gate_up = nn.Linear(d, 2 * inter, bias=False)
        self.down = nn.Linear(inter, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, -1, 16).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, s, -1))
        g, u = self.gate_up(self.norm2(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(g) * u)


class FusedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64)
        self.blocks = nn.ModuleList([FusedBlock(), FusedBlock()])
        self.head = nn.Linear(64, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


def _decoder(family: str = "Llama", hidden: int = 64, inter: int = 96, layers: int = 2,
             heads: int = 4, kv_heads: int = 2) -> nn.Module:
    """A random ``<family>ForCausalLM`` with grouped-query attention."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        use_cache=False)
    return getattr(transformers, f"{family}ForCausalLM")(config)


def _llama() -> nn.Module:
    return _decoder("Llama")


def _qwen2() -> nn.Module:
    return _decoder("Qwen2")


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False))


def _bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=3))


def _roberta() -> nn.Module:
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=70, num_labels=3))


def _vit() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=5))


def _phi3() -> nn.Module:
    """One fused q/k/v Linear sliced by offsets, one fused gate/up Linear chunked, and
    attention code that reads ``self.config.num_attention_heads`` in ``forward``."""
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, use_cache=False)
    return transformers.Phi3ForCausalLM(config)


def _falcon() -> nn.Module:
    """``FalconLinear`` computes ``x @ self.weight.T`` (a transposed weight in matmul)."""
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=False, multi_query=False, use_cache=False))


MODELS = {"llama_gqa": (_llama, "lm"), "qwen2": (_qwen2, "lm"), "gpt2": (_gpt2, "lm"),
          "bert": (_bert, "cls"), "roberta": (_roberta, "cls"), "vit": (_vit, "image"),
          "fused": (FusedLM, "lm"), "phi3": (_phi3, "lm"), "falcon": (_falcon, "lm")}
DECODERS = ("llama_gqa", "qwen2", "gpt2", "phi3", "falcon")


def _inputs(kind: str, batch: int, seq: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if kind == "cls":
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -2:] = 0
        return ids, mask
    return (ids,)


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if "logits" in out else out.last_hidden_state


def _dynamic(kind: str) -> tuple:
    if kind == "image":
        return ({0: Dim.AUTO},)
    spec = {0: Dim.AUTO, 1: Dim.AUTO}
    return (spec, spec) if kind == "cls" else (spec,)


def _prune(name: str, seed: int = 0, lr: float = 1e-3, config_widths: bool = False):
    """``config_widths``: keep whole what the HF config could not describe once shrunk
    (``config_cannot_hold``, as the ``hf:`` prune job does)."""
    build, kind = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    x = _inputs(kind, 2, 8)
    options = dict(method="cs", granularity="channel", target_macs=0.5, example_inputs=x,
                   capture="export", dynamic_shapes=_dynamic(kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(model, **options)
        if config_widths:
            gm = sf.transform(model, exclude=config_cannot_hold(gm), **options)
    gm.train()
    opt = torch.optim.Adam(sf.param_groups(gm, lr=lr, mask_lr=1e-3), lr=lr)
    cs = sf.CSScheduler(gm, epochs=2)
    for epoch in range(2):
        for step in range(3):
            xb = _inputs(kind, 2, 8, seed=100 + 3 * epoch + step)
            out = _logits(gm(*xb))
            target = torch.randint(0, out.shape[-1], out.shape[:-1])
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
            opt.zero_grad()
            (loss + cs.penalty()).backward()
            opt.step()
        cs.step()
    gm.eval()
    return model, gm, kind


@functools.lru_cache(maxsize=None)
def _pruned(name: str):
    """``_prune(name)`` once per session (tests that change masks take a deep copy)."""
    return _prune(name)


def _masked(gm, x) -> torch.Tensor:
    with torch.no_grad(), hard_masks(gm):
        return _logits(gm(*x))


@pytest.mark.parametrize("name", list(MODELS))
def test_shrink_of_export_capture_equals_hard_masked(name: str) -> None:
    model, gm, kind = _pruned(name)
    small = sf.shrink(gm)
    assert type(small) is type(model)
    shapes = [(1, 8), (3, 8)] if kind == "image" else [(1, 8), (3, 8), (1, 13), (3, 13)]
    for batch, seq in shapes:
        x, other = _inputs(kind, batch, seq, seed=1), _inputs(kind, batch, seq, seed=2)
        ref = _masked(gm, x)
        assert (ref - _masked(gm, other)).abs().max() > 1e-3  # the output follows the input
        with torch.no_grad():
            got = _logits(small(*x))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())


def _generate(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False,
                              pad_token_id=0)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_shrinks_to_its_class_and_generates_the_hard_masked_tokens(name: str) -> None:
    _, gm, _ = _pruned(name)
    small = sf.shrink(gm)
    prompt = _inputs("lm", 1, 6, seed=3)[0]
    reference = fold_to_source(gm)  # the hard-masked model as the source class
    assert type(reference) is type(small)
    tokens = _generate(reference, prompt)
    assert tokens.shape[1] == prompt.shape[1] + 5
    assert torch.equal(_generate(small, prompt), tokens)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "phi3"])
def test_uniform_widths_round_trip_through_save_pretrained(name: str, tmp_path) -> None:
    model, gm, _ = _pruned(name)
    gm = copy.deepcopy(gm)
    from sparsify_fx.budgets.exact_cut import apply_budget
    apply_budget(gm, target_macs=0.5, uniform=True)
    small = sf.shrink(gm)
    assert small.config.num_key_value_heads < model.config.num_key_value_heads or \
        small.config.intermediate_size < model.config.intermediate_size
    small.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
    x = _inputs("lm", 2, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x).logits, small(*x).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small(*x).logits, _masked(gm, x), rtol=1e-4, atol=1e-4)


def test_gpt2_keeps_heads_whole_and_round_trips_with_fewer_mlp_units(tmp_path) -> None:
    """GPT-2's config derives ``head_dim = n_embd / n_head``, so it cannot describe fewer
    heads: ``config_cannot_hold`` names the attention weights, they stay whole, the MLP
    units are cut with one width (``n_inner``) and the model round-trips."""
    model = _gpt2()
    named = config_cannot_hold(sf.transform(
        model, granularity="channel", example_inputs=_inputs("lm", 2, 8), capture="export",
        dynamic_shapes=_dynamic("lm")))
    assert any("c_attn" in n for n in named) and not any("mlp" in n for n in named)
    model, gm, _ = _prune("gpt2", config_widths=True)
    from sparsify_fx.budgets.exact_cut import apply_budget
    apply_budget(gm, target_macs=0.5, uniform=True)
    small = sf.shrink(gm)
    assert small.config.n_head == model.config.n_head
    assert small.config.n_inner < 4 * model.config.n_embd
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    small.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
    x, other = _inputs("lm", 2, 9, seed=4), _inputs("lm", 2, 9, seed=6)
    ref = _masked(gm, x)
    assert (ref - _masked(gm, other)).abs().max() > 1e-3  # the output follows the input
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x).logits, small(*x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small(*x).logits, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(_generate(loaded, x[0][:1, :6]), _generate(fold_to_source(gm), x[0][:1, :6]))


@pytest.mark.parametrize("name", [
    "llama_gqa", "bert", *(pytest.param(n, marks=pytest.mark.slow)
                           for n in ("qwen2", "gpt2", "roberta", "vit", "fused", "phi3", "falcon"))])
def test_shrunk_export_verifies_in_onnxruntime(name: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    _, gm, kind = _pruned(name)
    small = sf.shrink(gm)
    x = _inputs(kind, 2, 8, seed=5)
    done = sf.export_onnx(small, x, tmp_path / "small.onnx")  # raises unless it verifies
    assert done.max_abs_diff is not None and done.max_abs_diff <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_blocks_keep_at_most_052_of_their_macs_and_report_shows_it(name: str) -> None:
    model, gm, kind = _pruned(name)
    x = _inputs(kind, 2, 8)
    rep = sf.report(gm, x)
    assert rep.blocks is not None and rep.blocks["layers"]
    assert rep.blocks["fraction"] <= 0.52
    assert rep.blocks["model_fraction"] <= 0.5 + 1e-9
    assert "pruned blocks" in str(rep)
    # the shrunk model's own count agrees: its block layers' MACs over the dense model's
    small = sf.shrink(gm)
    dense_rows = {r.name: r.dense_macs for r in sf.report(model, x).rows}
    small_rows = {r.name: r.dense_macs for r in sf.report(small, x).rows}
    linear = [n for n in rep.blocks["layers"] if n in dense_rows]
    assert linear
    assert sum(small_rows[n] for n in linear) <= 0.52 * sum(dense_rows[n] for n in linear)


def _llama_mid() -> nn.Module:
    return _decoder("Llama", hidden=256, inter=688, layers=4, heads=8, kv_heads=4)


def _bert_base() -> nn.Module:
    """BERT-base's encoder (its hidden states: a random pooler + classifier at half width
    gives nearly the same logits for every input, which would prove nothing)."""
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64))


MODELS.update({"llama_mid": (_llama_mid, "lm"), "bert_base": (_bert_base, "cls")})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_mid", "bert_base"])
def test_mid_size_models_shrink_to_half_their_block_macs(name: str) -> None:
    # weights barely move (random targets would otherwise flatten a deep random net's
    # outputs to a constant); the CS scores learn at the usual rate
    model, gm, kind = _prune(name, lr=1e-6)
    x = _inputs(kind, 2, 8)
    rep = sf.report(gm, x)
    assert rep.blocks["fraction"] <= 0.52
    small = sf.shrink(gm)
    assert type(small) is type(model)
    for batch, seq in ((1, 8), (3, 13)):
        xb, other = _inputs(kind, batch, seq, seed=1), _inputs(kind, batch, seq, seed=2)
        ref = _masked(gm, xb)
        assert (ref - _masked(gm, other)).abs().max() > 1e-4
        with torch.no_grad():
            torch.testing.assert_close(_logits(small(*xb)), ref, rtol=1e-4, atol=1e-4)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass that also applies the activation (as some vision libraries do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class OwnModulesNet(nn.Module):
    """Conv blocks built from their own module classes (no torchvision layers)."""

    def __init__(self, norm: type[nn.Module] = BatchNormAct) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 32, 3, padding=1, bias=False), norm(32)
        self.c1, self.bn1 = nn.Conv2d(32, 64, 3, padding=1, bias=False), norm(64)
        self.se = SqueezeExcite(64)
        self.c2, self.bn2 = nn.Conv2d(64, 32, 3, padding=1, bias=False), norm(32)
        self.pool, self.fc = MeanPool(), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.stem(x))
        x = x + self.bn2(self.c2(self.se(self.bn1(self.c1(x)))))
        return self.fc(self.pool(x))


def test_own_module_classes_get_channel_structure_through_the_aten_graph() -> None:
    torch.manual_seed(0)
    model = OwnModulesNet().eval()
    with torch.no_grad():  # non-trivial statistics, so a wrong BN slice would show
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(model, method="cs", granularity="channel", target_macs=0.5,
                          example_inputs=(x,), capture="export")
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import channel_l1_scores
    apply_budget(gm, target_macs=0.5, scores=channel_l1_scores(gm))
    gm.eval()
    rep = sf.report(gm, x)
    assert rep.blocks["fraction"] <= 0.52
    small = sf.shrink(gm)
    assert type(small) is OwnModulesNet and small.bn1.num_features < 64
    dense_macs = sf.report(model, x).total_dense_macs
    assert sf.report(small, x).total_dense_macs <= 0.52 * dense_macs
    for batch in (1, 3):
        xb, other = torch.randn(batch, 3, 8, 8), torch.randn(batch, 3, 8, 8)
        ref = _masked(gm, (xb,))
        assert (ref - _masked(gm, (other,))).abs().max() > 1e-3
        with torch.no_grad():
            torch.testing.assert_close(small(xb), ref, rtol=1e-4, atol=1e-5)


class TransposedLinear(nn.Linear):
    """A Linear that reads its weight as ``x @ W.T`` (``how="T"``, as ``FalconLinear``),
    ``x @ W.t()`` or ``x @ W.permute(1, 0)``."""

    def __init__(self, n_in: int, n_out: int, how: str) -> None:
        super().__init__(n_in, n_out, bias=False)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = {"T": lambda: self.weight.T, "t": self.weight.t,
             "permute": lambda: self.weight.permute(1, 0)}[self.how]()
        return x @ w


class TransposedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = TransposedLinear(16, 48, "T"), TransposedLinear(48, 32, "t")
        self.c, self.d = TransposedLinear(32, 40, "permute"), nn.Linear(40, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.d(torch.tanh(self.c(h)))


def test_weights_read_through_transposes_are_producers() -> None:
    torch.manual_seed(0)
    model = TransposedWeights().eval()
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(model, granularity="channel", target_macs=0.5, example_inputs=(x,),
                          capture="export")
    assert not [w for w in caught if "Coupling" in type(w.message).__name__]
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    assert len(group_masks(gm)) == 3  # the outputs of a, b and c: one group each
    apply_budget(gm, target_macs=0.5, scores=channel_l1_scores(gm))
    gm.eval()
    small = sf.shrink(gm)
    a, b, c, d = (getattr(small, n).weight for n in "abcd")
    assert b.shape[1] == a.shape[0] and c.shape[1] == b.shape[0] and d.shape[1] == c.shape[0]
    assert a.shape[0] + b.shape[0] + c.shape[0] < 48 + 32 + 40
    assert sf.report(small, x).total_dense_macs <= 0.5 * sf.report(model, x).total_dense_macs
    other = torch.randn(4, 16)
    ref = _masked(gm, (x,))
    assert (ref - _masked(gm, (other,))).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-5, atol=1e-5)


class ScaledWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.out = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(x @ (2.0 * self.w.weight).T))  # an op on the weight itself


def test_a_masked_weight_read_by_an_unknown_op_is_named_and_stays_whole() -> None:
    model = ScaledWeight().eval()
    x = torch.randn(3, 16)
    with pytest.warns(Warning, match=r"w\.weight"):
        gm = sf.transform(model, granularity="channel", example_inputs=(x,), capture="export")
    kept = dict(gm.named_parameters())
    assert not any("group" in n for n in kept)  # nothing left to prune: w stays whole


def test_a_shrunk_model_its_config_cannot_describe_is_refused_before_anything_is_written(
        tmp_path) -> None:
    """A Llama config that stores ``head_dim``; a ragged cut (layers keep different widths):
    ``save_pretrained`` and ``safe_save`` raise ShrinkError naming the parameter, the field
    and the fix, and write nothing; the uniform cut of the same model saves and reloads."""
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import group_masks
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(model, method="cs", granularity="channel", target_macs=0.5,
                          example_inputs=_inputs("lm", 2, 8), capture="export",
                          dynamic_shapes=_dynamic("lm"))
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    ragged = copy.deepcopy(gm)
    apply_budget(ragged, target_macs=0.5, scores=scores)
    small = sf.shrink(ragged)
    assert small.sparsify_config_gaps  # the shrink recorded what the config cannot hold
    for save in (small.save_pretrained, lambda folder: sf.safe_save(small, folder)):
        folder = tmp_path / "ragged"
        folder.mkdir(exist_ok=True)
        with pytest.raises(sf.ShrinkError, match=r"uniform=True.*config_cannot_hold"):
            save(folder)
        assert not list(folder.iterdir())
    apply_budget(gm, target_macs=0.5, scores=scores, uniform=True)
    uniform = sf.shrink(gm)
    assert not uniform.sparsify_config_gaps
    sf.safe_save(uniform, tmp_path / "uniform")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "uniform",
                                                          local_files_only=True).eval()
    x, other = _inputs("lm", 2, 9, seed=4), _inputs("lm", 2, 9, seed=5)
    with torch.no_grad():
        assert (loaded(*x).logits - loaded(*other).logits).abs().max() > 1e-3
        torch.testing.assert_close(loaded(*x).logits, uniform(*x).logits, rtol=1e-5, atol=1e-5)
