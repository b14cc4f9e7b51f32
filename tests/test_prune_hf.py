"""``sparsify-fx prune hf:DIR --task ...`` (issue 24) on folders written by save_pretrained.

Every model is a tiny random-weight config (2 layers, hidden 32) with a
tokenizer trained here on a few lines (``tokenizers``), saved with
``save_pretrained`` into a tmp folder: nothing downloads. Sparsity is counted
from the tensors ``from_pretrained`` loads back; the ONNX file runs in
onnxruntime.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from sparsify_fx.cli.prune import main as prune_main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOOD = "bright calm clean clear fine fresh glad gold kind neat nice pure rich safe warm".split()
BAD = "bleak cold damp dark dirty dull gray grim harsh numb poor rough sad sour weak".split()
FILLER = ("the a this that one day room road house tree river cloud city garden morning "
          "evening window door table street").split()


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` short texts; label 1 when the adjective is from GOOD, else 0 (learnable)."""
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = list(g.choice(FILLER, size=int(g.integers(3, 9))))
        words.insert(int(g.integers(0, len(words) + 1)), str(g.choice(GOOD if label else BAD)))
        rows.append((" ".join(words), label))
    return rows


def _word_piece(lines: list[str], vocab: int) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=vocab,
                                                             special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _byte_bpe(lines: list[str], vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>")


def bert_folder(path: pathlib.Path, hidden: int = 32, layers: int = 2, vocab: int = 300,
                lines: list[str] | None = None, intermediate: int | None = None) -> pathlib.Path:
    """A random BertForSequenceClassification + WordPiece tokenizer, save_pretrained."""
    lines = lines or [t for t, _ in sentences(200)]
    tok = _word_piece(lines, vocab)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=64,
        num_labels=2, pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gpt2_folder(path: pathlib.Path, lines: list[str], hidden: int = 32, layers: int = 2,
                vocab: int = 300) -> pathlib.Path:
    """A random GPT2LMHeadModel + byte-level BPE tokenizer, save_pretrained."""
    tok = _byte_bpe(lines, vocab)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=2, n_positions=64,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_csv(path: pathlib.Path, rows: list[tuple[str, int]]) -> pathlib.Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def lm_text(n_docs: int = 30) -> str:
    """Documents separated by form-feed lines (the convention of ../shared/data/text)."""
    docs = [" ".join(f"{t}." for t, _ in sentences(12, seed=d)) for d in range(n_docs)]
    return "\n\n\f\n\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("hfcls")
    return {"model": bert_folder(root / "bert"),
            "data": write_csv(root / "reviews.csv", sentences(240, seed=1)), "root": root}


def _cls_args(setup: dict[str, pathlib.Path], out: pathlib.Path, *extra: str) -> list[str]:
    return [f"hf:{setup['model']}", "--task", "sequence-classification",
            "--data", f"text:{setup['data']}", "-o", str(out), "--target-sparsity", "0.5",
            "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "32", "--lr", "0.1",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def cls_run(cls_setup: dict[str, pathlib.Path]) -> pathlib.Path:
    out = cls_setup["root"] / "run"
    assert prune_main(_cls_args(cls_setup, out)) == 0
    return out


def _masked_names(out: pathlib.Path) -> list[str]:
    """HF names of the masked weights, from the run's report (``model.`` stripped)."""
    rep = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in rep["layers"] if row["masked"]]
    assert names and all(n.startswith("model.") for n in names), names
    return [n[len("model."):] + ("" if n.endswith(".weight") else ".weight") for n in names]


def _zeros(model: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


def test_sequence_classification_saves_a_pruned_hf_model(cls_run: pathlib.Path,
                                                         cls_setup: dict[str, pathlib.Path]
                                                         ) -> None:
    import onnxruntime as ort

    hf = cls_run / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).is_file(), name
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf, local_files_only=True).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    zeros, total = _zeros(model, _masked_names(cls_run))
    assert zeros == round(0.5 * total)  # exact to one weight, counted from the loaded tensors
    source = transformers.AutoModelForSequenceClassification.from_pretrained(
        cls_setup["model"], local_files_only=True)
    assert _zeros(source, _masked_names(cls_run))[0] == 0  # the user's folder is untouched
    summary = json.loads((cls_run / "summary.json").read_text())
    metric = summary["metric"]
    assert metric["name"] == "accuracy" and summary["task"] == "sequence-classification"
    assert {"before", "after", "onnx"} <= set(summary["accuracy"])
    assert abs(metric["after"] - metric["onnx"]) <= metric["tolerance"]
    assert metric["onnx_within_tolerance"] is True

    # the saved model and the ONNX file score the validation rows as the summary says
    tok = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    rows = sentences(240, seed=1)
    order = torch.randperm(240, generator=torch.Generator().manual_seed(0)).tolist()
    val = [rows[i] for i in order[:24]]  # val_fraction 0.1, seed 0: the job's split
    enc = tok([t for t, _ in val], padding=True, return_tensors="pt")
    labels = np.array([y for _, y in val])
    with torch.no_grad():
        logits = model(**enc).logits.numpy()
    acc = 100.0 * float((logits.argmax(1) == labels).mean())
    assert acc == pytest.approx(metric["after"], abs=1e-6)
    session = ort.InferenceSession(str(cls_run / "model.onnx"), providers=["CPUExecutionProvider"])
    # the job pads every evaluation batch to the longest validation text, as here; its
    # input rows are in the order of BertForSequenceClassification.forward
    packed = torch.stack([enc[n] for n in ("input_ids", "attention_mask", "token_type_ids")], 1)
    onnx_logits = session.run(None, {session.get_inputs()[0].name: packed.numpy()})[0]
    assert np.abs(onnx_logits - logits).max() < 1e-4
    from sparsify_fx.prune import load_pruned
    assert type(load_pruned(cls_run / "model.pt")).__name__ == "BertForSequenceClassification"


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("hflm")
    text = lm_text()
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    return {"model": gpt2_folder(root / "gpt2", text.splitlines()), "data": root / "corpus.txt",
            "root": root}


def _lm_args(setup: dict[str, pathlib.Path], out: pathlib.Path, *extra: str) -> list[str]:
    return [f"hf:{setup['model']}", "--task", "causal-lm", "--data", f"text:{setup['data']}",
            "-o", str(out), "--target-sparsity", "0.5", "--block-size", "32", "--epochs", "2",
            "--finetune-epochs", "1", "--batch-size", "16", "--lr", "0.05", "--quiet", *extra]


@pytest.fixture(scope="module")
def lm_run(lm_setup: dict[str, pathlib.Path]) -> pathlib.Path:
    out = lm_setup["root"] / "run"
    assert prune_main(_lm_args(lm_setup, out)) == 0
    return out


@pytest.mark.slow
def test_causal_lm_exactly_half_zeros_and_perplexity_in_onnxruntime(lm_run: pathlib.Path
                                                                    ) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_run / "hf",
                                                              local_files_only=True).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    names = _masked_names(lm_run)
    assert "lm_head.weight" not in names  # tied to the embeddings: never masked
    zeros, total = _zeros(model, names)
    assert zeros * 2 == total  # exactly 50 % over the masked weights
    summary = json.loads((lm_run / "summary.json").read_text())
    ppl = summary["perplexity"]
    assert summary["metric"]["name"] == "perplexity"
    assert ppl["after"] < ppl["before"]  # training helped even at 50 %
    assert abs(ppl["onnx"] - ppl["after"]) <= 1e-3 * ppl["after"]
    assert summary["metric"]["onnx_within_tolerance"] is True


@pytest.mark.slow
def test_causal_lm_sparsegpt_2_4_calibrates_and_saves(lm_setup: dict[str, pathlib.Path],
                                                      tmp_path: pathlib.Path) -> None:
    """--method sparsegpt --granularity 2:4: calibrated one-shot cut (no mask training),
    exactly 2 of every 4 inputs zero in the reloaded folder, ONNX perplexity equal."""
    out = tmp_path / "sgpt"
    args = [a for a in _lm_args(lm_setup, out) if a not in ("--target-sparsity", "0.5")]
    assert prune_main([*args, "--method", "sparsegpt", "--granularity", "2:4",
                       "--calibration-samples", "32"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf",
                                                              local_files_only=True).eval()
    names = _masked_names(out)
    assert names
    for name in names:
        w = model.get_parameter(name).detach()
        w = w.T if type(model.get_submodule(name.rsplit(".", 1)[0])).__name__ == "Conv1D" else w
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()), name
    summary = json.loads((out / "summary.json").read_text())
    ppl = summary["perplexity"]
    assert abs(ppl["onnx"] - ppl["after"]) <= 1e-3 * ppl["after"]
    assert any("sparsegpt: calibrated" in n for n in summary.get("notes", [])), summary


KILL_SCRIPT = """
import os, signal, sys, threading, time
target, argv = sys.argv[1], sys.argv[2:]
def watch():
    while not os.path.exists(target):
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from sparsify_fx.cli import main
sys.exit(main(["prune", *argv]))
"""


@pytest.mark.slow
def test_kill_after_epoch_one_then_resume_is_bit_identical(lm_run: pathlib.Path,
                                                           lm_setup: dict[str, pathlib.Path],
                                                           tmp_path: pathlib.Path) -> None:
    out = tmp_path / "killed"
    args = _lm_args(lm_setup, out)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT,
                           str(out / "checkpoints" / "train.pt"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "resume" in proc.stderr
    assert torch.load(out / "checkpoints" / "train.pt", weights_only=False)["epoch"] == 0
    assert not any((out / n).exists() for n in ("hf", "model.onnx", "summary.json"))
    assert prune_main(args) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    from safetensors.torch import load_file
    resumed = load_file(out / "hf" / "model.safetensors")
    straight = load_file(lm_run / "hf" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert [k for k in straight if not torch.equal(resumed[k], straight[k])] == []


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # drop what building the folder printed
    assert prune_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case, words", [
    ("missing-folder", ["folder not found"]),
    ("no-config", ["no config.json"]),
    ("no-tokenizer", ["no tokenizer", "save_pretrained"]),
    ("unknown-task", ["'translation' is not a task", "causal-lm"]),
    ("no-task", ["needs --task", "sequence-classification"]),
    ("task-without-hf", ["--task", "hf:DIR models only"]),
    ("bad-data", ["reads text:FILE"]),
])
def test_refusals_are_one_named_line(case: str, words: list[str], tmp_path: pathlib.Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "m"
    data = write_csv(tmp_path / "d.csv", sentences(20))
    if case in ("no-tokenizer", "bad-data"):
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16)
        transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
        if case == "bad-data":
            _word_piece(["a b c"], 40).save_pretrained(folder)
    elif case != "missing-folder":
        folder.mkdir()
    argv = [f"hf:{folder}", "--task", "sequence-classification", "--data", f"text:{data}",
            "-o", str(tmp_path / "out"), "--target-sparsity", "0.5", "--quiet"]
    if case == "unknown-task":
        argv[2] = "translation"
    elif case == "no-task":
        argv = argv[:1] + argv[3:]
    elif case == "task-without-hf":
        argv[0] = "tests.test_prune:tiny_cnn"
    elif case == "bad-data":
        argv[4] = "digits"
    err = _refused(argv, capsys)
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sequence_classification_channel_cs_target_macs(cls_setup: dict[str, pathlib.Path],
                                                        tmp_path: pathlib.Path) -> None:
    # BERT's config derives head_dim from hidden / heads, so it cannot hold fewer heads: the
    # job keeps heads (and the pooler) whole and prunes MLP units; a wide MLP and short
    # texts leave them enough of the MACs for 0.5
    folder = bert_folder(tmp_path / "wide", intermediate=512)
    out = tmp_path / "channel"
    args = [a for a in _cls_args(cls_setup, out) if a not in ("--target-sparsity", "0.5")]
    args[0] = f"hf:{folder}"
    assert prune_main(args + ["--granularity", "channel", "--target-macs", "0.5",
                              "--max-length", "16"]) == 0  # cs_start: l1 by default
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs"]["ratio"] <= 0.5 + 1e-6
    assert any("cs_start l1" in n for n in summary["notes"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        out / "hf", local_files_only=True).eval()
    assert model.config.intermediate_size < 512
    assert sum(p.numel() for p in model.parameters()) < summary["params"]["before"]
    metric = summary["metric"]
    assert metric["onnx_within_tolerance"] and abs(metric["after"] - metric["onnx"]) <= 0.02


@pytest.mark.slow
def test_image_classification_with_the_folders_image_processor(tmp_path: pathlib.Path) -> None:
    from PIL import Image

    g = np.random.default_rng(0)
    for c in ("plain", "striped"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(20):
            a = (g.random((40, 40, 3)) * 255).astype("uint8")
            a[:, :20] = 255 if c == "striped" else a[:, :20]
            Image.fromarray(a).save(tmp_path / "imgs" / c / f"{i}.png")
    torch.manual_seed(0)
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=2)).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32},
                                   image_mean=[0.4] * 3).save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    assert prune_main([f"hf:{tmp_path / 'vit'}", "--task", "image-classification", "--data",
                       f"imagefolder:{tmp_path / 'imgs'}", "--target-sparsity", "0.5",
                       "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "8",
                       "--quiet", "-o", str(out)]) == 0
    assert (out / "hf" / "preprocessor_config.json").is_file()
    model = transformers.AutoModelForImageClassification.from_pretrained(
        out / "hf", local_files_only=True)
    zeros, total = _zeros(model, _masked_names(out))
    assert zeros == round(0.5 * total)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"]["onnx_within_tolerance"] is True
    assert summary["macs"]["input_shape"] == [2, 3, 32, 32]  # the processor's size, not 224


def test_text_data_splits(tmp_path: pathlib.Path) -> None:
    """The documented conventions: train/validation files; every 10th document held out."""
    from sparsify_fx.prune.text_data import PadBatch, classification_data, lm_data

    tok = _word_piece([t for t, _ in sentences(100)], 200)
    folder = tmp_path / "pair"
    folder.mkdir()
    write_csv(folder / "train.csv", sentences(30))
    with open(folder / "validation.jsonl", "w", encoding="utf-8") as fh:
        for t, y in sentences(7, seed=3):
            fh.write(json.dumps({"text": t, "label": y}) + "\n")
    names = ["input_ids", "token_type_ids", "attention_mask"]
    with pytest.raises(Exception, match="train.csv and validation.csv"):
        classification_data(str(folder), tok, names, 16, 0, 0.1, {}, 2)
    os.rename(folder / "validation.jsonl", folder / "validation.csv")
    write_csv(folder / "validation.csv", sentences(7, seed=3))
    train, val, _ = classification_data(str(folder), tok, names, 16, 0, 0.1, {}, 2)
    assert (len(train), len(val)) == (30, 7)
    x, y = PadBatch([0, 0, 0])([train[0], train[1], train[2]])
    assert x.shape[:2] == (3, 3) and x.shape[2] == max(train[i][0].shape[1] for i in range(3))
    assert y.tolist() == [train[i][1] for i in range(3)]
    corpus = tmp_path / "c.txt"
    corpus.write_text(lm_text(20), encoding="utf-8")
    bpe = _byte_bpe(lm_text(20).splitlines(), 300)
    train_b, val_b, desc = lm_data(str(corpus), bpe, 16, 0.1)
    assert "18 train / 2 val documents" in desc
    x, y = train_b[1]
    assert torch.equal(x[1:], y[:-1]) and torch.equal(x, train_b.ids[16:32])
