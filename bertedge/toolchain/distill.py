"""Distillation: a student with fewer layers, trained on a fine-tuned teacher, within a budget.

`distill(DistillArgs(...))` takes a model folder from `bertedge finetune` (the teacher) and writes
a normal model folder (config.json, model.safetensors, tokenizer files, labels.json,
bertedge.json, metrics.json, args.json) that `export`, `bench`, `package` and `predict` take
unchanged. Recipe:

* the student copies the teacher's config with fewer layers and the teacher's own weights:
  embeddings, head and evenly spaced layers ending at the top one (layers 1, 3, 5 of 6);
* its loss mixes the teacher's temperature-scaled soft targets (KL x T^2, weight `alpha`) with
  the gold labels (weight 1 - alpha), plus optional hidden-state matching (MSE between each
  student layer and the teacher layer it was copied from);
* every task goes through its task record: classification (logits), NER (per-token logits,
  positions with label -100 and padding ignored), QA (start / end distributions over the window);
* unlabelled texts, when given, get the teacher's predictions as labels and join the training set;
* the student's eval metric must stay within `max_accuracy_drop` points of the teacher's, or no
  folder is written; `layers="auto"` tries 4, 3, 2 layers and keeps the smallest that passes.

Data loading, the optimizer groups, length-grouped batches, the training loop and the folder
writer are finetune's own: the distillation loss is computed by a wrapper module the finetune
trainer drives like any model, so the two commands cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bertedge.errors import BertedgeError
from bertedge.runtime import meta as model_meta
from bertedge.runtime.data import (
    TextExamples,
    load_text_classification,
    seeded_subset,
)
from bertedge.runtime.features import IGNORE, Features, load_tokenizer, pad_id, run_windows
from bertedge.runtime.tasks import NER, QA, Task, ner
from bertedge.toolchain.finetune import (
    FinetuneArgs,
    FinetuneResult,
    TrainingRecipe,
    _encode,
    _load_data,
    _load_hf_tokenizer,
    _load_model,
    _pick_device,
    _save,
    _seed_everything,
    _Trainer,
)

AUTO_LAYERS = (4, 3, 2)  # the --layers auto search, largest first
_LAYER_KEY = re.compile(r"(^|\.)layer\.(\d+)\.")  # bert: encoder.layer.3. ; distilbert: transformer.layer.3.


@dataclass
class DistillArgs(TrainingRecipe):
    """Everything `bertedge distill` takes: finetune's shared recipe plus the teacher and student."""

    teacher: Path
    """A fine-tuned model folder (the --out of `bertedge finetune`)."""
    train: Path
    """Labelled training file, in the format the teacher's task reads."""
    out: Path
    """Output model folder (must not exist unless `overwrite`)."""
    unlabelled: Path | None = None
    """Texts the teacher labels for extra training data: a CSV/TSV/JSONL text column
    (classification, NER) or SQuAD JSON / JSONL questions with contexts (QA)."""
    layers: str = "3"
    """Student encoder layers, or `auto` to try 4, 3, 2 and keep the smallest within budget."""
    max_accuracy_drop: float = 1.0
    """Budget: how many points of the task metric the student may lose against the teacher."""
    temperature: float = 2.0
    """Softmax temperature of the soft targets (the KL term is scaled by T^2)."""
    alpha: float = 0.5
    """Weight of the soft-target loss; the gold-label loss gets 1 - alpha."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE against the teacher's copied layers (0 = off; on runs
    the teacher at every step)."""
    max_unlabelled_rows: int = 0
    """Seeded random subset of the unlabelled rows (0 = all)."""
    epochs: float = field(default=3.0, kw_only=True)
    """Passes over the training data."""
    layer_lr_decay: float = field(default=1.0, kw_only=True)
    """LR factor per layer going down (1.0 = off: every copied layer must adapt to its new neighbours)."""

    def __post_init__(self) -> None:
        self.teacher, self.train, self.out = Path(self.teacher), Path(self.train), Path(self.out)
        problems = self.recipe_problems()
        if self.layers != "auto" and not (self.layers.isdigit() and int(self.layers) >= 1):
            problems.append(f"--layers must be a positive integer or 'auto' (got '{self.layers}')")
        if not all(np.isfinite(v) for v in (self.max_accuracy_drop, self.temperature, self.alpha, self.hidden_weight)):
            problems.append("numeric options must be finite numbers")
        if not self.max_accuracy_drop >= 0:
            problems.append("--max-accuracy-drop must be >= 0")
        if not self.temperature > 0:
            problems.append("--temperature must be > 0")
        if not 0 <= self.alpha <= 1:
            problems.append("--alpha must be in [0, 1]")
        if not self.hidden_weight >= 0:
            problems.append("--hidden-weight must be >= 0")
        if self.max_unlabelled_rows < 0:
            problems.append("--max-unlabelled-rows must be >= 0")
        if problems:
            raise BertedgeError("bad distill options: " + "; ".join(problems), "see `bertedge distill --help`")


DistillResult = FinetuneResult  # the same record: the student's folder and its metrics.json


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers a student copies: evenly spaced, ending at the top one.

    >>> layer_map(6, 3), layer_map(6, 2), layer_map(6, 4), layer_map(2, 1)
    ([1, 3, 5], [2, 5], [0, 2, 3, 5], [1])
    """
    return [(k + 1) * teacher_layers // student_layers - 1 for k in range(student_layers)]


def make_student(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of `teacher` that keeps only `layers` (teacher indices, in order), with their weights."""
    config: Any = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)  # DistilBertConfig maps this onto n_layers
    student = type(teacher)(config)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        m = _LAYER_KEY.search(name)
        if m is None:
            state[name] = tensor.clone()
        elif int(m.group(2)) in new_index:
            state[name[:m.start(2)] + str(new_index[int(m.group(2))]) + name[m.end(2):]] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student


def num_layers(model: nn.Module) -> int:
    """Encoder layers of a BERT or DistilBERT model."""
    config: Any = model.config
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layers", 0))


class Distiller(nn.Module):
    """The student plus its distillation loss, shaped like a Hugging Face model for the finetune trainer.

    With targets in the batch, `forward` returns an object whose `.loss` is
    alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * gold loss [+ w * hidden MSE];
    without, it returns the student's own outputs (evaluation). Only the student is registered
    as a submodule, so `state_dict`, `parameters` and the optimizer see the student alone. The
    teacher's outputs for every training window are computed once (`soft`, indexed by the
    `window_index` the batch carries); hidden-state matching needs the teacher at every step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, task: Task, args: DistillArgs,
                 soft: list[dict[str, np.ndarray]], layers: list[int]) -> None:
        super().__init__()
        self.student, self.task, self.soft, self.layers = student, task, soft, layers
        self.config = student.config  # finetune's optimizer groups read the layer count here
        self.temperature, self.alpha, self.hidden_weight = args.temperature, args.alpha, args.hidden_weight
        self._teacher = [teacher]  # a list keeps it out of the registered submodules
        self.student_type_ids = "token_type_ids" in student.forward.__code__.co_varnames

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, window_index: torch.Tensor | None = None,
                **targets: torch.Tensor) -> Any:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.student_type_ids:
            inputs["token_type_ids"] = token_type_ids
        if window_index is None:
            return self.student(**inputs)
        hidden = self.hidden_weight > 0
        out = self.student(**inputs, **targets, output_hidden_states=hidden)
        if hidden:
            teacher = self._teacher[0]
            with torch.no_grad():
                t_out = teacher(**{k: v for k, v in inputs.items()
                                   if k != "token_type_ids" or "token_type_ids" in teacher.forward.__code__.co_varnames},
                                output_hidden_states=True)
            t_logits = {name: t_out[name].float() for name in self.task.output_names}
        else:
            t_logits = self._cached(window_index.tolist(), input_ids.shape[1], input_ids.device)
        kl = sum(self._kl(out[name].float(), t_logits[name], attention_mask, targets)
                 for name in self.task.output_names) / len(self.task.output_names)
        loss = self.alpha * kl + (1 - self.alpha) * out.loss
        if hidden:
            loss = loss + self.hidden_weight * self._hidden_mse(out.hidden_states, t_out.hidden_states, attention_mask)
        return SimpleNamespace(loss=loss)  # all the finetune trainer reads off a training step

    def _cached(self, idx: list[int], width: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The teacher's stored outputs for these windows, right-padded to the batch width."""
        batch = {}
        for name in self.task.output_names:
            first = self.soft[idx[0]][name]
            if self.task.per_token_outputs:
                arr = np.zeros((len(idx), width, *first.shape[1:]), dtype=np.float32)
                for row, i in enumerate(idx):
                    arr[row, :len(self.soft[i][name])] = self.soft[i][name]
            else:
                arr = np.stack([self.soft[i][name] for i in idx]).astype(np.float32)
            batch[name] = torch.from_numpy(arr).to(device)
        return batch

    def _kl(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
            targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(teacher || student) at temperature T, times T^2, averaged over the valid rows.

        The distribution axis follows the output's shape: classes for (batch, classes) and
        (batch, tokens, classes) outputs, tokens for per-token scores (QA start / end).
        """
        t = self.temperature
        if student.dim() == 2 and self.task.per_token_outputs:  # over positions; padding can't be chosen
            pad = mask == 0
            student, teacher = student.masked_fill(pad, -1e4), teacher.masked_fill(pad, -1e4)
            valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
        elif student.dim() == 3:  # per token over classes; label -100 marks sub-words, specials, padding
            valid = targets["labels"] != IGNORE
        else:
            valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
        per_row = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                           reduction="none", log_target=True).sum(-1)
        return (per_row * valid).sum() / valid.sum().clamp(min=1) * t * t

    def _hidden_mse(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                    mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error of each student layer against the teacher layer it was copied from."""
        m = mask.unsqueeze(-1).float()
        total = torch.zeros((), device=mask.device)
        for k, j in enumerate(self.layers):
            diff = (student[k + 1].float() - teacher[j + 1].float()) ** 2 * m
            total = total + diff.sum() / (m.sum() * diff.shape[-1]).clamp(min=1)
        return total / len(self.layers)


def _indexed(task: Task) -> Task:
    """The task record with targets that also carry each window's index (for the teacher cache)."""
    def targets(items: list[Any], width: int) -> dict[str, np.ndarray]:
        out = task.targets([t for t, _ in items], width)
        return out | {"window_index": np.asarray([i for _, i in items], dtype=np.int64)}

    return dataclasses.replace(task, targets=targets)


# --- unlabelled data: the teacher's predictions become labels ------------------------------------

def _read_unlabelled(task: Task, tokenizer: Any, args: DistillArgs, max_length: int, stride: int,
                     train_texts: list[str]) -> tuple[Features, int]:
    """Windows of the unlabelled file, without targets, and how many rows were dropped as repeats.

    Classification and NER rows whose text (and pair) is already in the training or eval data, or
    earlier in the file, are dropped before the seeded subset is drawn, so `--unlabelled` may name
    the full training file of which `--max-train-rows` took a subset: the rest becomes
    teacher-labelled data, and no eval text is trained on. QA keeps every question (many share a
    context).
    """
    dropped = 0
    if task is QA:
        examples: Any = task.load(args.unlabelled, args.columns, None, args.bad_rows)  # type: ignore[arg-type]
    else:
        examples = load_text_classification(args.unlabelled, args.columns, require_labels=False,  # type: ignore[arg-type]
                                            bad_rows=args.bad_rows)
        seen = set(train_texts)
        keep: list[int] = []
        for i, key in enumerate(_text_keys(examples.texts, examples.pairs)):
            if key in seen:
                continue
            seen.add(key)
            keep.append(i)
        dropped = len(examples.texts) - len(keep)
        examples = examples.subset(keep)
        examples = TextExamples(examples.texts, examples.pairs, None, [], examples.source,
                                examples.skipped, examples.rows_read)
    examples = seeded_subset(examples, args.max_unlabelled_rows, args.seed)
    if task is NER:  # raw text: words come from the tokenizer's pre-tokenizer, as at predict time
        tokenizer.enable_truncation(max_length)
        features = ner.encode_texts(tokenizer, examples.texts)
        tokenizer.no_truncation()
        return features, dropped
    return _encode(task, tokenizer, examples, max_length, stride), dropped


def _text_keys(texts: list[str], pairs: list[str] | None) -> list[str]:
    """One comparable key per row: the text, or text and pair joined by a unit separator."""
    return list(texts) if pairs is None else [f"{t}\x1f{p}" for t, p in zip(texts, pairs, strict=True)]


def pseudo_targets(task: Task, features: Features, soft: list[dict[str, np.ndarray]]) -> list[Any]:
    """The teacher's argmax in the shape of each task's training targets.

    Classification: a class; NER: a class on each word's first sub-word, -100 elsewhere;
    QA: the (start, end) tokens of the teacher's best scores in the window.
    """
    if task is NER:
        return [ner.align_labels(enc.word_ids, _word_argmax(enc.word_ids, s["logits"]))
                for enc, s in zip(features.encodings, soft)]
    if task is QA:
        return [(int(s["start_logits"].argmax()), int(s["end_logits"].argmax())) for s in soft]
    return [int(s["logits"].argmax()) for s in soft]


def _word_argmax(word_ids: list[int | None], logits: np.ndarray) -> list[int]:
    """word index -> the teacher's class on that word's first sub-word."""
    tags: dict[int, int] = {}
    for t, w in enumerate(word_ids):
        if w is not None and w not in tags:
            tags[w] = int(logits[t].argmax())
    return [tags.get(w, 0) for w in range(max(tags, default=-1) + 1)]


# --- the command -----------------------------------------------------------------------------------

def distill(args: DistillArgs) -> DistillResult:
    """Distil the teacher into a smaller student; write it only when it is within the budget.

    Raises:
        BertedgeError: bad teacher folder, options or data (the same checks as finetune), or no
            student within `max_accuracy_drop` points of the teacher.
    """
    if args.out.exists() and not args.overwrite:
        raise BertedgeError(f"output folder {args.out} already exists", "choose another --out or pass --overwrite")
    meta = model_meta.read_model_meta(args.teacher)
    task = meta.task
    max_length = model_meta.resolve_max_length(args.max_length or meta.max_length, task, meta.max_positions)
    stride = meta.stride if meta.stride < max_length else model_meta.default_stride(max_length)  # a shorter student window
    ft = _finetune_args(args, task, meta.labels, max_length, stride)
    train, evalset, data_report = _load_data(task, ft)
    _seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _pick_device(args.device)

    hf_tokenizer = _load_hf_tokenizer(args.teacher)
    tokenizer = load_tokenizer(args.teacher / "tokenizer.json") if (args.teacher / "tokenizer.json").is_file() \
        else hf_tokenizer.backend_tokenizer
    tokenizer.no_padding()
    labels = list(meta.labels)
    teacher = _load_model(task, args.teacher, labels).to(device).eval()
    candidates = _candidates(args.layers, num_layers(teacher))
    pad = pad_id(tokenizer)
    train_f = _encode(task, tokenizer, train, max_length, stride)
    eval_f = _encode(task, tokenizer, evalset, max_length, stride)
    unlabelled_f, repeats = None, 0
    if args.unlabelled:
        train_keys = [] if task is QA else [k for ex in (train, evalset)  # eval rows must stay unseen
                                             for k in _text_keys(task.texts(ex), getattr(ex, "pairs", None))]
        unlabelled_f, repeats = _read_unlabelled(task, tokenizer, args, max_length, stride, train_keys)

    started = time.perf_counter()
    teacher_eval = _Trainer(task, teacher, device, pad, labels).evaluate(eval_f, evalset, args.batch_size * 2)
    train_f, soft = _with_soft_targets(task, teacher, device, pad, train_f, unlabelled_f, args)
    label_seconds = time.perf_counter() - started

    attempts: list[dict[str, Any]] = []
    kept: tuple[nn.Module, list[int], dict[str, Any], list[dict[str, Any]]] | None = None
    for n in candidates:
        _seed_everything(args.seed)
        layers = layer_map(num_layers(teacher), n)
        distiller = Distiller(make_student(teacher, layers), teacher, task, args, soft, layers).to(device)
        trainer = _Trainer(_indexed(task), distiller, device, pad, labels)
        t0 = time.perf_counter()
        history = trainer.fit(train_f, eval_f, evalset, ft)
        final = trainer.evaluate(eval_f, evalset, args.batch_size * 2)
        drop = 100.0 * (float(teacher_eval[task.metric]) - float(final[task.metric]))
        attempt = {"layers": n, "teacher_layers": layers, task.metric: float(final[task.metric]),
                   "drop_points": round(drop, 3), "within_budget": drop <= args.max_accuracy_drop,
                   "train_seconds": round(time.perf_counter() - t0, 1)}
        attempts.append(attempt)
        print(f"student {n} layers: {task.metric} {final[task.metric]:.4f} vs teacher "
              f"{teacher_eval[task.metric]:.4f} ({drop:+.2f} points drop; budget {args.max_accuracy_drop})",
              file=sys.stderr)
        if not attempt["within_budget"]:
            break
        kept = (distiller.student, layers, final, history)
    if kept is None:
        a = attempts[-1]
        raise BertedgeError(
            f"no student within the budget: {a['layers']} layers scored {a[task.metric]:.4f} {task.metric} vs the "
            f"teacher's {teacher_eval[task.metric]:.4f}, {a['drop_points']:.2f} points > --max-accuracy-drop "
            f"{args.max_accuracy_drop}",
            "keep more --layers, train longer (--epochs), add --unlabelled texts, or raise --max-accuracy-drop")

    student, layers, final, history = kept
    student_params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    metrics = {
        "task": task.name,
        "eval": final,
        "history": history,
        "distillation": {
            "metric": task.metric,
            "teacher": {"dir": str(args.teacher), task.metric: float(teacher_eval[task.metric]),
                        "layers": num_layers(teacher), "parameters": teacher_params,
                        "size_mb": _weights_mb(args.teacher)},
            "student": {task.metric: float(final[task.metric]), "layers": len(layers),
                        "teacher_layers_copied": layers, "parameters": student_params},
            "drop_points": attempts[[a["layers"] for a in attempts].index(len(layers))]["drop_points"],
            "budget_points": args.max_accuracy_drop,
            "search": attempts,
            "temperature": args.temperature, "alpha": args.alpha, "hidden_weight": args.hidden_weight,
            "teacher_seconds": round(label_seconds, 1),
        },
        "teacher_eval": teacher_eval,
        "train_seconds": round(time.perf_counter() - started, 1),
        "data": data_report | {"train_windows": len(train_f), "eval_windows": len(eval_f),
                               "unlabelled_file": str(args.unlabelled) if args.unlabelled else None,
                               "unlabelled_windows": len(unlabelled_f) if unlabelled_f is not None else 0,
                               "unlabelled_repeats_dropped": repeats},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    student_meta = model_meta.ModelMeta(task=task, labels=meta.labels, max_length=max_length, stride=stride,
                             model_type=meta.model_type, max_positions=meta.max_positions)
    _save(ft, student_meta, student, hf_tokenizer, args.teacher, metrics)
    _finish_folder(args, metrics, layers)
    return DistillResult(args.out, metrics)


def _finetune_args(args: DistillArgs, task: Task, labels: tuple[str, ...], max_length: int, stride: int) -> FinetuneArgs:
    """The finetune options the shared loader, optimizer, loop and writer read."""
    return FinetuneArgs(**{**args.recipe(), "max_length": max_length}, model=str(args.teacher), train=args.train,
                        out=args.out, task=task.name, label_names=labels, stride=stride)


def _candidates(layers: str, teacher_layers: int) -> list[int]:
    if layers == "auto":
        return [n for n in AUTO_LAYERS if n < teacher_layers] or list(range(teacher_layers - 1, 0, -1))
    if not 1 <= int(layers) < teacher_layers:
        raise BertedgeError(f"--layers {layers}: the teacher has {teacher_layers} layers",
                            f"choose 1..{teacher_layers - 1} student layers, or --layers auto")
    return [int(layers)]


def _with_soft_targets(task: Task, teacher: nn.Module, device: torch.device, pad: int, train_f: Features,
                       unlabelled_f: Features | None, args: DistillArgs
                       ) -> tuple[Features, list[dict[str, np.ndarray]]]:
    """Run the teacher once over every training window; unlabelled windows get its argmax as targets.

    Returns the training windows (labelled, then unlabelled) with (target, window index) pairs as
    targets, and the teacher's outputs per window.
    """
    from tqdm.auto import tqdm

    windows = len(train_f) + (len(unlabelled_f) if unlabelled_f is not None else 0)
    bar = tqdm(total=windows, desc="teacher", unit="window", disable=not args.progress, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    uses_type_ids = "token_type_ids" in teacher.forward.__code__.co_varnames

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = teacher(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()
                         if k != "token_type_ids" or uses_type_ids})
        bar.update(len(feeds["input_ids"]))
        return {name: out[name].float().cpu().numpy() for name in task.output_names}

    batch = args.batch_size * 2
    soft = run_windows(run, train_f, pad, task.per_token_outputs, batch)
    assert train_f.targets is not None
    targets = list(train_f.targets)
    encodings, index = list(train_f.encodings), list(train_f.example_index)
    if unlabelled_f is not None and len(unlabelled_f):
        extra = run_windows(run, unlabelled_f, pad, task.per_token_outputs, batch)
        targets += pseudo_targets(task, unlabelled_f, extra)
        encodings += unlabelled_f.encodings
        index += [len(train_f) + i for i in unlabelled_f.example_index]
        soft += extra
    bar.close()
    return Features(encodings, index, list(zip(targets, range(len(targets)))), train_f.truncated), soft


def _weights_mb(folder: Path) -> float:
    files = list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin"))
    return round(sum(f.stat().st_size for f in files) / 1e6, 2)


def _finish_folder(args: DistillArgs, metrics: dict[str, Any], layers: list[int]) -> None:
    """Distillation facts into bertedge.json (through the one metadata writer), sizes into metrics.json."""
    folder = args.out
    meta = model_meta.read_model_meta(folder)
    old = json.loads((folder / "bertedge.json").read_text(encoding="utf-8"))
    extras = {k: v for k, v in old.items() if k not in meta.to_json()}
    model_meta.write_meta(folder, meta, **extras, distilled_from=str(args.teacher), teacher_layers_copied=layers)
    metrics["distillation"]["student"]["size_mb"] = _weights_mb(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    (folder / "args.json").write_text(json.dumps(asdict(args), indent=1, default=str) + "\n", encoding="utf-8")
