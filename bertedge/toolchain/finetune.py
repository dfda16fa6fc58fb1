"""Stage 1: fine-tune a BERT / DistilBERT encoder on the user's labelled data.

`finetune(FinetuneArgs(...))` writes a Hugging Face model folder (weights, config,
tokenizer.json) plus labels.json, bertedge.json (what later stages need), metrics.json and
args.json. Training recipe: AdamW without decay on biases and LayerNorm, linear warm-up then
decay, gradient clipping, optional frozen lower layers and layer-wise LR decay, seeded
shuffling, evaluation every epoch (or every N steps) with early stopping on the eval metric.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bertedge import __version__
from bertedge.errors import BertedgeError
from bertedge.runtime.data import BadRows, Columns, seeded_subset
from bertedge.runtime.features import Features, load_tokenizer, pad_batch, pad_id, run_windows
from bertedge.runtime.meta import (
    ModelMeta,
    check_labels,
    read_config,
    resolve_max_length,
    resolve_stride,
    write_meta,
)
from bertedge.runtime.tasks import Task, get_task
from bertedge.toolchain.families import check_exportable, family
from bertedge.toolchain.models import load_pretrained, resolve_model


@dataclass(kw_only=True)
class TrainingRecipe:
    """The data and optimisation options shared by `bertedge finetune` and `bertedge distill`."""

    eval: Path | None = None
    """Evaluation file; without it a seeded `eval_fraction` of train is held out."""
    columns: Columns = field(default_factory=Columns)
    """Text / text-pair / label column names."""
    max_train_rows: int = 0
    """Seeded random subset of the training rows (0 = all)."""
    eval_fraction: float = 0.1
    """Held-out share of train when no eval file is given."""
    max_length: int = 0
    """Token limit per window (0 = the default: the task's for finetune, the teacher's for distill;
    range: `bertedge.runtime.meta.check_max_length`); longer inputs are truncated (and counted),
    QA contexts are split into windows."""
    epochs: float = 2.0
    """Passes over the training data (fractions allowed)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate of the top encoder layer."""
    layer_lr_decay: float = 0.9
    """Each lower layer gets this factor times the LR of the layer above (1.0 = off)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm)."""
    warmup_ratio: float = 0.06
    """Share of steps spent warming the LR up linearly."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    eval_every: int = 0
    """Evaluate every N steps (0 = once per epoch); the best evaluation's weights are kept."""
    patience: int = 2
    """Stop after this many evaluations without improvement (0 = never stop early)."""
    seed: int = 42
    """Seed for sampling, shuffling and initialisation."""
    threads: int = 0
    """CPU threads for torch (0 = all cores)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    bad_rows: BadRows = BadRows.ERROR
    """What to do with rows with an empty text or label."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show a progress bar."""

    def recipe_problems(self) -> list[str]:
        """Every problem with the shared options, to be raised once with the verb's own."""
        problems = []
        for name, value in (("--epochs", self.epochs), ("--lr", self.lr), ("--weight-decay", self.weight_decay),
                            ("--warmup-ratio", self.warmup_ratio), ("--grad-clip", self.grad_clip)):
            if not math.isfinite(value):
                problems.append(f"{name} must be a finite number (got {value})")
        if not self.epochs > 0:
            problems.append(f"--epochs must be a finite number > 0 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append("--batch-size must be >= 1")
        if not 0 < self.lr < 1:
            problems.append("--lr must be in (0, 1)")
        if not 0 < self.layer_lr_decay <= 1:
            problems.append("--layer-lr-decay must be in (0, 1]")
        if not 0 < self.eval_fraction < 1:
            problems.append("--eval-fraction must be in (0, 1)")
        if self.max_train_rows < 0:
            problems.append("--max-train-rows must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append("--device must be auto, cpu or cuda")
        return problems

    def recipe(self) -> dict[str, Any]:
        """The shared options as keyword arguments (distill hands them to finetune's loop)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainingRecipe)}


@dataclass
class FinetuneArgs(TrainingRecipe):
    """Everything `bertedge finetune` takes: the shared recipe plus the base model and task."""

    model: str
    """Registry short name (e.g. `minilm`) or a local Hugging Face model folder."""
    train: Path
    """Training file: .csv, .tsv or .jsonl."""
    out: Path
    """Output folder (must not exist unless `overwrite`)."""
    task: str = "classification"
    """classification, ner (CoNLL / JSONL tokens+tags) or qa (SQuAD JSON / JSONL)."""
    label_names: tuple[str, ...] = ()
    """Label names in index order; integer labels in the file index into them."""
    stride: int = 0
    """QA: tokens shared by consecutive windows of a long context (0 = from the max length)."""
    head_lr: float | None = None
    """Learning rate of the new classification head (default: lr)."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many lowest encoder layers."""

    def __post_init__(self) -> None:
        problems = self.recipe_problems()
        if self.head_lr is not None and not (math.isfinite(self.head_lr) and self.head_lr > 0):
            problems.append(f"--head-lr must be a finite number > 0 (got {self.head_lr})")
        if problems:
            raise BertedgeError("bad finetune options: " + "; ".join(problems), "see `bertedge finetune --help`")
        check_labels(self.label_names, "--label-names", "give each label one name in --label-names")


@dataclass
class FinetuneResult:
    """Where the model went and how well it did."""

    out: Path
    metrics: dict[str, Any]


def finetune(args: FinetuneArgs) -> FinetuneResult:
    """Fine-tune, evaluate, and write the model folder atomically."""
    task = get_task(args.task)
    if args.out.exists() and not args.overwrite:
        raise BertedgeError(f"output folder {args.out} already exists", "choose another --out or pass --overwrite")
    check_writable_parent(args.out)
    model_dir = resolve_model(args.model)
    check_exportable(model_dir, task.name)  # an unshippable family fails now, not after training
    config = read_config(model_dir)
    max_length = resolve_max_length(args.max_length, task, config.max_positions)
    stride = resolve_stride(args.stride, task, max_length)
    train, evalset, data_report = _load_data(task, args)
    _seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _pick_device(args.device)

    hf_tokenizer = _load_hf_tokenizer(model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() \
        else hf_tokenizer.backend_tokenizer
    tokenizer.no_padding()
    labels = list(train.label_names)
    model = _load_model(task, model_dir, labels).to(device)
    train_f = _encode(task, tokenizer, train, max_length, stride)
    eval_f = _encode(task, tokenizer, evalset, max_length, stride)
    trainer = _Trainer(task, model, device, pad_id(tokenizer), labels)

    started = time.perf_counter()
    history = trainer.fit(train_f, eval_f, evalset, args)
    train_seconds = time.perf_counter() - started
    final = trainer.evaluate(eval_f, evalset, args.batch_size * 2)

    metrics = {
        "task": task.name,
        "eval": final,
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "data": data_report | {"train_windows": len(train_f), "eval_windows": len(eval_f),
                               "train_truncated": sum(train_f.truncated), "eval_truncated": sum(eval_f.truncated)},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    meta = ModelMeta(task=task, labels=tuple(labels), max_length=max_length, stride=stride,
                     model_type=config.model_type, max_positions=config.max_positions)
    _save(args, meta, model, hf_tokenizer, model_dir, metrics)
    return FinetuneResult(args.out, metrics)


def check_writable_parent(out: Path) -> None:
    """Fail before any work when the output folder cannot be created (read-only parent, a file...)."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BertedgeError(f"cannot write '{out}': '{parent}' is not a writable folder",
                            "choose an --out inside a folder you can write to")


def _load_data(task: Task, args: FinetuneArgs) -> tuple[Any, Any, dict[str, Any]]:
    names = args.label_names or None
    full = task.load(args.train, args.columns, names, args.bad_rows)
    train = seeded_subset(full, args.max_train_rows, args.seed)
    if args.eval is not None:
        evalset = task.load(args.eval, args.columns, train.label_names, args.bad_rows)
    else:
        train, evalset = task.split(train, args.eval_fraction, args.seed)
    task.check_train(train)
    skipped = [asdict(s) for s in getattr(full, "skipped", [])]
    eval_skipped = [asdict(s) for s in getattr(evalset, "skipped", [])] if args.eval else []
    report: dict[str, Any] = {
        "train_file": str(args.train),
        "train_rows_in_file": getattr(full, "rows_read", len(full)),
        "train_rows_skipped": skipped,
        "train_rows_used": len(train),
        "eval_file": str(args.eval) if args.eval else f"{args.eval_fraction:.0%} of train (seed {args.seed})",
        "eval_rows_used": len(evalset),
        "eval_rows_skipped": eval_skipped,
    }
    for key, rows in (("train_rows_skipped", skipped), ("eval_rows_skipped", eval_skipped)):
        if rows:
            print(f"warning: {len(rows)} rows skipped ({key}); see metrics.json", file=sys.stderr)
    return train, evalset, report


def _encode(task: Task, tokenizer: Any, examples: Any, max_length: int, stride: int) -> Features:
    features = task.encode(tokenizer, examples, max_length, stride)
    cut = sum(features.truncated)
    if cut:
        print(f"warning: {cut} of {len(examples)} examples in {examples.source} exceed {max_length} tokens "
              "and were truncated (raise --max-length to keep more)", file=sys.stderr)
    return features


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BertedgeError("--device cuda was asked for but torch sees no CUDA GPU", "use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _load_hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not tokenizer.is_fast:
        raise BertedgeError(
            f"{model_dir} has no fast tokenizer (tokenizer.json)",
            "the runtime needs tokenizer.json; use a model folder that ships one",
        )
    return tokenizer


def _load_model(task: Task, model_dir: Path, labels: list[str]) -> nn.Module:
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    model: nn.Module = load_pretrained(model_dir, task.hf_auto_class, ignore_mismatched_sizes=True, **head)
    return model


def _param_groups(model: nn.Module, args: FinetuneArgs) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise LR decay; frozen parameters are left out."""
    num_layers = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layers", 0))
    head_lr = args.head_lr or args.lr
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        depth = _layer_depth(name, num_layers)  # 0 = embeddings, 1..L = encoder layers, L+1 = head
        if args.freeze_layers and depth is not None and depth <= args.freeze_layers:
            param.requires_grad_(False)
            continue
        if depth is None or depth > num_layers:
            lr = head_lr
        else:
            lr = args.lr * args.layer_lr_decay ** (num_layers - depth)
        decay = 0.0 if (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name) else args.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]


def _layer_depth(name: str, num_layers: int) -> int | None:
    """0 for embeddings, i+1 for encoder layer i, None for the head and pooler."""
    if "embeddings" in name:
        return 0
    parts = name.split(".")
    for key in ("layer", "layers"):  # bert: encoder.layer.3 ; distilbert: transformer.layer.3 ; modernbert: model.layers.3
        if key in parts:
            idx = parts.index(key) + 1
            if idx < len(parts) and parts[idx].isdigit():
                return int(parts[idx]) + 1
    return None


class _Trainer:
    """The training loop and evaluation for one task, model and device."""

    def __init__(self, task: Task, model: nn.Module, device: torch.device, pad: int, labels: list[str]) -> None:
        self.task, self.model, self.device, self.pad, self.labels = task, model, device, pad, labels
        # The graph's own inputs: XLM-R's one token type would be indexed by the type id 1 that
        # tokenizers gives overflowing QA windows; export leaves token_type_ids out just the same.
        config: Any = model.config
        self.uses_type_ids = "token_type_ids" in model.forward.__code__.co_varnames and "token_type_ids" in \
            family(config.model_type).input_names(int(getattr(config, "type_vocab_size", 0) or 0))

    def _tensors(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if not self.uses_type_ids:
            feeds = {k: v for k, v in feeds.items() if k != "token_type_ids"}
        return {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}

    def fit(self, train: Features, eval_f: Features, evalset: Any, args: FinetuneArgs) -> list[dict[str, Any]]:
        """Train; returns the evaluation history and leaves the best weights loaded."""
        from tqdm.auto import tqdm
        from transformers import get_linear_schedule_with_warmup

        model, device = self.model, self.device
        steps_per_epoch = math.ceil(len(train) / args.batch_size)
        total_steps = max(1, int(round(steps_per_epoch * args.epochs)))
        optimizer = torch.optim.AdamW(_param_groups(model, args))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * args.warmup_ratio), total_steps)
        eval_every = args.eval_every or steps_per_epoch
        use_amp = device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        rng = random.Random(args.seed)
        lengths = [len(e.ids) for e in train.encodings]
        assert train.targets is not None

        history: list[dict[str, Any]] = []
        best_score, best_state, bad_evals, step = -1.0, None, 0, 0
        # Redrawn in place on a terminal; a line every 30 s when stderr goes to a log file.
        bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not args.progress, file=sys.stderr,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        while step < total_steps:
            for idx in _length_grouped_batches(lengths, args.batch_size, rng):
                if step >= total_steps:
                    break
                model.train()
                feeds = pad_batch([train.encodings[i] for i in idx], self.pad)
                width = feeds["input_ids"].shape[1]
                batch = self._tensors(feeds | self.task.targets([train.targets[i] for i in idx], width))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[-1]:.1e}",
                                refresh=False)  # a refresh per step floods non-terminal logs
                if step % eval_every == 0 or step == total_steps:
                    m = self.evaluate(eval_f, evalset, args.batch_size * 2)
                    score = float(m[self.task.metric])
                    history.append({"step": step, "epoch": round(step / steps_per_epoch, 2),
                                    "loss": round(loss.item(), 4), self.task.metric: score})
                    bar.write(f"step {step}: eval {self.task.metric} {score:.4f}")
                    if score > best_score:
                        best_score, bad_evals = score, 0
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    else:
                        bad_evals += 1
                        if args.patience and bad_evals >= args.patience:
                            bar.write(f"early stop: no improvement in {bad_evals} evaluations")
                            step = total_steps
                            break
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        return history

    @torch.no_grad()
    def evaluate(self, features: Features, examples: Any, batch_size: int) -> dict[str, Any]:
        """The task's metrics: windows -> model -> task.predict -> task.score."""
        self.model.eval()

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = self.model(**self._tensors(feeds))
            return {name: out[name].float().cpu().numpy() for name in self.task.output_names}

        outputs = run_windows(run, features, self.pad, self.task.per_token_outputs, batch_size)
        return self.task.score(self.task.predict(outputs, features, examples, self.labels), examples, self.labels)


def _length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Random batches of similar length (less padding), in random order.

    Shuffle, cut into windows of 50 batches, sort each window by length, slice it into
    batches, shuffle the batches: the same idea as Hugging Face's group_by_length.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _save(args: FinetuneArgs, meta: ModelMeta, model: nn.Module, tokenizer: Any, base_dir: Path,
          metrics: dict[str, Any]) -> None:
    """Write everything into a temp folder beside --out, then move it into place."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
        tokenizer.model_max_length = meta.max_length
        tokenizer.save_pretrained(tmp)
        (tmp / "labels.json").write_text(json.dumps(list(meta.labels), indent=1) + "\n", encoding="utf-8")
        write_meta(tmp, meta, base_model=args.model, base_model_dir=str(base_dir), bertedge_version=__version__,
                   columns=asdict(args.columns))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        (tmp / "args.json").write_text(json.dumps(asdict(args), indent=1, default=str) + "\n", encoding="utf-8")
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
