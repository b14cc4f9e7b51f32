"""``sparsify-fx prune hf:DIR --task T``: a Hugging Face checkpoint folder as MODEL.

:func:`load_hf` loads ``AutoModelFor<Task>.from_pretrained(DIR, local_files_only=True)``
and the folder's tokenizer (``AutoTokenizer``) or image processor
(``AutoImageProcessor``); nothing downloads. The job runs the model through
:class:`TaskAdapter` (one input tensor in, logits out), which ``transform``
captures with torch.export, so training, the exact cut, reports and the ONNX
export are the job's own. :func:`hf_data` builds the task's DATA and
:class:`~sparsify_fx.prune.task.Task`; :func:`save_pruned` folds the trained
masks back onto a copy of the source model (by parameter name) and writes it
with ``save_pretrained`` beside the tokenizer / processor files.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sparsify_fx.errors import ConfigError, ExportError, InputError
from sparsify_fx.prune.datasets import Data, imagefolder_data
from sparsify_fx.prune.task import Task
from sparsify_fx.prune.text_data import PadBatch, classification_data, lm_data

PREFIX = "hf:"
#: --task -> the transformers Auto class that loads the folder
TASKS = {"sequence-classification": "AutoModelForSequenceClassification",
         "causal-lm": "AutoModelForCausalLM",
         "image-classification": "AutoModelForImageClassification"}
#: granularities the job runs on hf: models; "channel" cuts uniform widths (every layer's
#: attention keeps the same KV groups, every MLP the same units) so the shrunk model's
#: config describes it and ``save_pretrained`` / ``from_pretrained`` round-trip
GRANULARITIES = ("element", "channel", "2:4", "4:8")
DEFAULT_MAX_LENGTH = DEFAULT_BLOCK_SIZE = 128
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model")
_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")
#: the adapter holds the HF model under this name: masked weights are ``model.<HF name>``
ATTRIBUTE = "model"


def is_hf(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


class TaskAdapter(nn.Module):
    """An HF model as the prune job runs it: one tensor in, plain logits out.

    sequence-classification: ``x`` is ``(B, k, L)`` long, row ``j`` the input
    ``input_names[j]``; returns ``(B, num_labels)``. causal-lm: ``x`` is
    ``input_ids (B, T)``; returns ``(B, V, T)`` (cross-entropy's layout against
    next tokens ``(B, T)``). image-classification: ``pixel_values``.
    """

    def __init__(self, model: nn.Module, task: str, input_names: list[str]) -> None:
        super().__init__()
        setattr(self, ATTRIBUTE, model)
        self.task, self.input_names = task, list(input_names)
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def keywords(self, x: Tensor) -> dict[str, Tensor]:
        """The one place the job's input tensor becomes the model's keyword tensors."""
        if self.task == "sequence-classification":
            return {name: x[:, i] for i, name in enumerate(self.input_names)}
        return {self.input_names[0]: x}

    def forward(self, x: Tensor) -> Tensor:
        out = getattr(self, ATTRIBUTE)(**self.keywords(x), **self.extra)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.transpose(1, 2) if self.task == "causal-lm" else logits


@dataclass
class HFModel:
    """A loaded checkpoint folder: ``source`` (never trained), its ``adapter``, the
    tokenizer or image processor, the model inputs the adapter packs."""

    folder: str
    task: str
    source: nn.Module
    adapter: TaskAdapter
    preprocessor: Any
    input_names: list[str]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("hf:DIR models need the transformers package; pip install "
                         "'sparsify-fx[hf]' (or transformers)") from None
    return transformers


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' loading / writing bars off (a refused run prints one line)."""
    hub = _transformers().utils.logging
    was = hub.is_progress_bar_enabled()
    hub.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hub.enable_progress_bar()


def check_recipe(recipe: dict[str, Any]) -> None:
    """ConfigError / InputError for hf-only keys on other models and bad keys on hf: ones."""
    task, model = recipe.get("task"), recipe.get("model")
    if not is_hf(model):
        if task is not None:
            raise ConfigError(f"--task {task} applies to hf:DIR models only; drop it, or pass "
                              "MODEL as hf:DIR (a save_pretrained folder)")
        return
    if task is None:
        raise ConfigError(f"{model} needs --task: one of {', '.join(TASKS)} (the "
                          "AutoModelFor<Task> class that loads the folder)")
    if task not in TASKS:
        close = difflib.get_close_matches(task, list(TASKS), n=1)
        raise ConfigError(f"--task {task!r} is not a task; use one of {', '.join(TASKS)}"
                          + (f" (did you mean {close[0]}?)" if close else ""))
    if recipe.get("granularity") not in GRANULARITIES:
        raise ConfigError(f"granularity {recipe.get('granularity')!r} on hf: models needs "
                          "structured shrinking of Hugging Face models (issue 22), not in the "
                          f"prune job yet; use --granularity {' or '.join(GRANULARITIES)}")
    if recipe.get("weights") is not None:
        raise InputError(f"--weights does not apply to {model}: the weights are the folder's; "
                         "save them into it with save_pretrained")


def _input_names(model: nn.Module, tokenizer: Any) -> list[str]:
    """The tokenizer's outputs the model takes, in the order of ``model.forward``."""
    produced = set(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
    names = [n for n in inspect.signature(model.forward).parameters if n in produced]
    if "input_ids" not in names:
        raise InputError(f"{type(model).__name__}.forward takes no input_ids from the "
                         "tokenizer; sequence-classification needs a text model")
    return names


def load_hf(spec: str, task: str) -> HFModel:
    """Load ``hf:DIR`` for ``task`` (checked by :func:`check_recipe`); InputError naming
    a missing folder, config.json, tokenizer or image processor."""
    from sparsify_fx.hf.checkpoint_files import from_pretrained_options, resolve_checkpoint
    path = spec[len(PREFIX):]
    if not path or not os.path.exists(path):
        raise InputError(f"{spec}: folder not found; pass hf:DIR with DIR a folder written by "
                         "save_pretrained (config.json, weights, tokenizer files), or "
                         "hf:FILE.gguf")
    try:
        resolved, gguf_file = resolve_checkpoint(path)
    except InputError as exc:
        raise InputError(f"{spec}: {exc}") from None
    folder = os.fspath(resolved)
    load_options = from_pretrained_options(gguf_file)
    tf = _transformers()
    if gguf_file is not None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise InputError(f"{spec}: a GGUF checkpoint needs the gguf package; pip install "
                             "'sparsify-fx[pretrained]'") from None
    image = task == "image-classification"
    wanted = _PROCESSOR_FILES if image else _TOKENIZER_FILES
    if gguf_file is None and not any(os.path.isfile(os.path.join(folder, n)) for n in wanted):
        what = "image processor (preprocessor_config.json)" if image else \
            "tokenizer (tokenizer.json or tokenizer_config.json)"
        saver = "image_processor" if image else "tokenizer"
        raise InputError(f"{spec}: no {what} in {folder}; save it there with "
                         f"{saver}.save_pretrained(DIR)")
    auto = getattr(tf, TASKS[task])
    try:
        with _no_progress_bars():
            source = auto.from_pretrained(folder, **load_options).eval()
            loader = tf.AutoImageProcessor if image else tf.AutoTokenizer
            pre = loader.from_pretrained(folder, **{k: v for k, v in load_options.items()
                                                    if k != "dtype"})
    except (OSError, ValueError, KeyError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise InputError(f"{spec}: cannot load it as {TASKS[task]} ({type(exc).__name__}: "
                         f"{first}); check --task and the folder's files") from None
    names = ["pixel_values"] if image else (
        ["input_ids"] if task == "causal-lm" else _input_names(source, pre))
    return HFModel(folder, task, source, TaskAdapter(source, task, names), pre, names)


def _positions(model: nn.Module, wanted: int | None, default: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    n = wanted or default
    return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n


def _image_size(proc: Any) -> int:
    for attr in (("crop_size", "size") if getattr(proc, "do_center_crop", False) else ("size",)):
        s = getattr(proc, attr, None)
        if isinstance(s, int):
            return s
        for k in ("height", "shortest_edge"):  # a dict, or transformers' SizeDict
            v = s.get(k) if isinstance(s, dict) else getattr(s, k, None)
            if isinstance(v, int):
                return v
    raise InputError("the folder's image processor gives no image size (size: height or "
                     "shortest_edge); set it in preprocessor_config.json")


def hf_data(hf: HFModel, recipe: dict[str, Any]) -> tuple[Data, Task]:
    """DATA and :class:`Task` of ``hf`` on ``recipe['data']`` (see the module docs)."""
    spec, seed, frac = recipe.get("data"), int(recipe["seed"]), float(recipe["val_fraction"])
    kind, _, path = (spec or "").partition(":")
    auto = torch.export.Dim.AUTO
    if hf.task == "image-classification":
        proc = hf.preprocessor
        data = imagefolder_data(spec or "", seed, frac, _image_size(proc),
                                getattr(proc, "image_mean", None) or (0.5, 0.5, 0.5),
                                getattr(proc, "image_std", None) or (0.5, 0.5, 0.5))
        base = getattr(data.train, "dataset", data.train)
        classes, labels = len(getattr(base, "classes", [])), hf.source.config.num_labels
        if classes > labels:
            raise InputError(f"--data {spec} has {classes} classes but the model has "
                             f"num_labels={labels}; set num_labels in config.json")
        example = torch.stack([data.val[i][0] for i in range(min(2, len(data.val)))])
        return data, Task("accuracy", example=example, capture="export",
                          dynamic_shapes=({0: auto},))
    if kind != "text" or not path:
        raise InputError(f"--data {spec!r}: {hf.task} reads text:FILE (see docs/cli.md)")
    tok = hf.preprocessor
    if hf.task == "sequence-classification":
        length = _positions(hf.source, recipe.get("max_length"), DEFAULT_MAX_LENGTH)
        cfg = hf.source.config
        train, val, desc = classification_data(path, tok, hf.input_names, length, seed, frac,
                                               dict(cfg.label2id or {}), int(cfg.num_labels))
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        pads = [pad_id if n == "input_ids" else 0 for n in hf.input_names]
        fixed = max(2, val.longest())  # every evaluation batch (PyTorch and ONNX) this long
        eval_collate = PadBatch(pads, fixed)
        example = eval_collate([val[i] for i in range(min(2, len(val)))])[0]
        if example.shape[0] < 2:
            example = example.repeat(2, 1, 1)
        return Data(train, val, desc), Task("accuracy", collate=PadBatch(pads),
                                            eval_collate=eval_collate, example=example,
                                            capture="export",
                                            dynamic_shapes=({0: auto, 2: auto},))
    block = _positions(hf.source, recipe.get("block_size"), DEFAULT_BLOCK_SIZE)
    train, val, desc = lm_data(path, tok, block, frac)
    example = torch.stack([val[i % len(val)][0] for i in range(2)])
    vocab = int(getattr(hf.source.config, "vocab_size", 0) or 0)
    return Data(train, val, desc), Task("perplexity", example=example, capture="export",
                                        eval_batch_size=lm_eval_batch(block, vocab),
                                        dynamic_shapes=({0: auto, 1: auto},))


#: float32 logits one causal-lm evaluation batch may hold (batch x block x vocab): 256 MB
LOGIT_BUDGET = 1 << 26


def lm_eval_batch(block: int, vocab: int, most: int = 256) -> int:
    """Blocks per causal-lm evaluation batch: at most ``most``, and no more than keep the
    batch's logits within :data:`LOGIT_BUDGET` floats (a 49k vocabulary at 256 tokens: 5
    blocks; 256 blocks held 4.5 GB of logits and the softmax as much again)."""
    return max(1, min(most, LOGIT_BUDGET // max(1, block * vocab)))


def save_pruned(hf: HFModel, final: nn.Module, folder: os.PathLike | str,
                example: Tensor) -> nn.Module:
    """Write ``final`` (the folded adapter) as the source HF class into ``folder``.

    Every tensor of ``final`` is mapped by name onto a deep copy of ``hf.source``
    (masks are folded in already); the copy must reproduce ``final`` on ``example``
    (ExportError otherwise) before ``save_pretrained`` writes it and the
    tokenizer / processor files. ``hf.source`` is never changed. Returns the model
    written (the pruned source class, eval mode).
    """
    if isinstance(final, TaskAdapter):  # channel: shrink returned the (smaller) source class
        if not final.__dict__.get("sparsify_uniform_widths", False):
            raise ExportError("the shrunk model's layers keep different widths, which a "
                              f"{type(hf.source).__name__} config cannot describe; "
                              "cut with uniform widths (the prune job does for hf: models)")
        model = copy.deepcopy(getattr(final, ATTRIBUTE)).eval()
        _check_and_save(hf, model, final, example, folder)
        return model
    prefix = getattr(final, "logical_name_prefix", "") + ATTRIBUTE + "."
    state = {k[len(prefix):]: v for k, v in final.state_dict().items() if k.startswith(prefix)}
    model = copy.deepcopy(hf.source).eval()
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ExportError(f"the pruned model has tensors the {type(model).__name__} lacks "
                          f"({', '.join(unknown[:3])}); cannot save it with save_pretrained")
    model.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    lost = [k for k, t in model.state_dict().items() if k not in state
            and t.data_ptr() not in loaded]  # tied weights (lm_head = embeddings) share one
    if lost:
        raise ExportError(f"the pruned model has no tensor for {', '.join(lost[:3])} of "
                          f"{type(model).__name__}; cannot save it with save_pretrained")
    _check_and_save(hf, model, final, example, folder)
    return model


def _check_and_save(hf: HFModel, model: nn.Module, final: nn.Module, example: Tensor,
                    folder: os.PathLike | str) -> None:
    """``model`` (the HF class) must reproduce ``final`` on ``example``; then write it."""
    with torch.no_grad():
        want = final.eval()(example)
        got = TaskAdapter(model, hf.task, hf.input_names).eval()(example)
    diff = float((got - want).abs().max())
    if diff > 1e-4 * float(want.abs().max()) + 1e-5:
        raise ExportError(f"the saved {type(model).__name__} differs from the pruned model by "
                          f"{diff:.3g} on the example input; not written")
    drop_dequantized_gguf(model)
    with _no_progress_bars():
        model.save_pretrained(folder)
        hf.preprocessor.save_pretrained(folder)


def drop_dequantized_gguf(model: nn.Module) -> bool:
    """Mark a model loaded from GGUF (transformers de-quantizes it to float tensors but keeps
    its ``GgufHfQuantizer``, and ``save_pretrained`` then refuses: "quantized with gguf and
    is not serializable") as the plain float model it is. Mutates ``model`` (and its config);
    True when it did; False for any other model (left as is)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return False
    if any(not t.is_floating_point() for t in model.state_dict().values()):
        return False  # something still packed: leave transformers' refusal in place
    quantizer.remove_quantization_config(model)  # transformers' own undoing of the marks
    return True


def load_saved(folder: os.PathLike | str, task: str) -> nn.Module:
    """``AutoModelFor<task>.from_pretrained(folder, local_files_only=True)`` in eval mode."""
    with _no_progress_bars():
        return getattr(_transformers(), TASKS[task]).from_pretrained(
            os.fspath(folder), local_files_only=True).eval()
