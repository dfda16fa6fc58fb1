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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bertedge import __version__
from bertedge.data import (
    BadRows,
    Columns,
    TextExamples,
    check_trainable,
    load_text_classification,
    seeded_split,
    seeded_subset,
)
from bertedge.errors import BertedgeError
from bertedge.metrics import classification_metrics
from bertedge.models import resolve_model
from bertedge.tasks import CLASSIFICATION


@dataclass
class FinetuneArgs:
    """Everything `bertedge finetune` takes."""

    model: str
    """Registry short name (e.g. `minilm`) or a local Hugging Face model folder."""
    train: Path
    """Training file: .csv, .tsv or .jsonl."""
    out: Path
    """Output folder (must not exist unless `overwrite`)."""
    eval: Path | None = None
    """Evaluation file; without it a seeded `eval_fraction` of train is held out."""
    task: str = "classification"
    """Task name (see bertedge.tasks)."""
    columns: Columns = field(default_factory=Columns)
    """Text / text-pair / label column names."""
    label_names: tuple[str, ...] = ()
    """Label names in index order; integer labels in the file index into them."""
    max_train_rows: int = 0
    """Seeded random subset of the training rows (0 = all)."""
    eval_fraction: float = 0.1
    """Held-out share of train when no eval file is given."""
    max_length: int = 128
    """Token limit per example; longer inputs are truncated (and counted)."""
    epochs: float = 2.0
    """Passes over the training data (fractions allowed)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate of the top encoder layer."""
    head_lr: float | None = None
    """Learning rate of the new classification head (default: lr)."""
    layer_lr_decay: float = 0.9
    """Each lower layer gets this factor times the LR of the layer above (1.0 = off)."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many lowest encoder layers."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm)."""
    warmup_ratio: float = 0.06
    """Share of steps spent warming the LR up linearly."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    eval_every: int = 0
    """Evaluate every N steps (0 = once per epoch)."""
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

    def __post_init__(self) -> None:
        problems = []
        if self.epochs <= 0:
            problems.append("--epochs must be > 0")
        if self.batch_size < 1:
            problems.append("--batch-size must be >= 1")
        if not 0 < self.lr < 1:
            problems.append("--lr must be in (0, 1)")
        if not 0 < self.layer_lr_decay <= 1:
            problems.append("--layer-lr-decay must be in (0, 1]")
        if not 8 <= self.max_length <= 4096:
            problems.append("--max-length must be in [8, 4096]")
        if not 0 < self.eval_fraction < 1:
            problems.append("--eval-fraction must be in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append("--device must be auto, cpu or cuda")
        if problems:
            raise BertedgeError("bad finetune options: " + "; ".join(problems), "see `bertedge finetune --help`")


@dataclass
class FinetuneResult:
    """Where the model went and how well it did."""

    out: Path
    metrics: dict[str, Any]


def finetune(args: FinetuneArgs) -> FinetuneResult:
    """Fine-tune, evaluate, and write the model folder atomically."""
    if args.task != CLASSIFICATION.name:
        raise BertedgeError(f"task '{args.task}' is not available in finetune yet", "use --task classification")
    if args.out.exists() and not args.overwrite:
        raise BertedgeError(f"output folder {args.out} already exists", "choose another --out or pass --overwrite")
    model_dir = resolve_model(args.model)
    train, evalset, data_report = _load_data(args)
    _seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _pick_device(args.device)

    tokenizer = _load_tokenizer(model_dir)
    model = _load_model(model_dir, train.label_names).to(device)
    train_enc = _Encoded.build(tokenizer, train, args.max_length)
    eval_enc = _Encoded.build(tokenizer, evalset, args.max_length)

    started = time.perf_counter()
    history = _train(model, train_enc, eval_enc, args, device, train.label_names)
    train_seconds = time.perf_counter() - started
    final = _evaluate(model, eval_enc, device, train.label_names, args.batch_size * 2)

    metrics = {
        "task": CLASSIFICATION.name,
        "eval": final,
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "data": data_report | {"train_truncated": train_enc.truncated, "eval_truncated": eval_enc.truncated},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    _save(args, model, tokenizer, model_dir, train.label_names, metrics)
    return FinetuneResult(args.out, metrics)


def _load_data(args: FinetuneArgs) -> tuple[TextExamples, TextExamples, dict[str, Any]]:
    names = args.label_names or None
    full = load_text_classification(args.train, args.columns, names, bad_rows=args.bad_rows)
    train = seeded_subset(full, args.max_train_rows, args.seed)
    if args.eval is not None:
        evalset = load_text_classification(args.eval, args.columns, train.label_names, bad_rows=args.bad_rows)
    else:
        train, evalset = seeded_split(train, args.eval_fraction, args.seed)
    check_trainable(train)
    report = {
        "train_file": str(args.train),
        "train_rows_in_file": full.rows_read,
        "train_rows_skipped": [asdict(s) for s in full.skipped],
        "train_rows_used": len(train),
        "eval_file": str(args.eval) if args.eval else f"{args.eval_fraction:.0%} of train (seed {args.seed})",
        "eval_rows_used": len(evalset),
        "eval_rows_skipped": [asdict(s) for s in evalset.skipped] if args.eval else [],
    }
    for key in ("train_rows_skipped", "eval_rows_skipped"):
        if report[key]:
            print(f"warning: {len(report[key])} rows skipped ({key}); see metrics.json", file=sys.stderr)
    return train, evalset, report


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


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not tokenizer.is_fast:
        raise BertedgeError(
            f"{model_dir} has no fast tokenizer (tokenizer.json)",
            "the runtime needs tokenizer.json; use a model folder that ships one",
        )
    return tokenizer


def _load_model(model_dir: Path, labels: list[str]) -> nn.Module:
    import transformers
    from transformers import logging as hf_logging

    auto = getattr(transformers, CLASSIFICATION.hf_auto_class)
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    try:
        return auto.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BertedgeError(f"cannot load the model in {model_dir}: {first}", "re-create or re-install the model folder") from None
    finally:
        hf_logging.set_verbosity_warning()


@dataclass
class _Encoded:
    """Token ids per example (unpadded) and labels."""

    ids: list[list[int]]
    type_ids: list[list[int]]
    labels: np.ndarray
    truncated: int

    @classmethod
    def build(cls, tokenizer: Any, ex: TextExamples, max_length: int) -> _Encoded:
        enc = tokenizer(ex.texts, ex.pairs, truncation=True, max_length=max_length,
                        return_overflowing_tokens=False, return_length=True)
        full = tokenizer(ex.texts, ex.pairs, truncation=False, return_length=True, verbose=False)
        truncated = int(sum(n > max_length for n in full["length"]))
        if truncated:
            print(f"warning: {truncated} of {len(ex)} examples in {ex.source} exceed {max_length} tokens "
                  "and were truncated (raise --max-length to keep more)", file=sys.stderr)
        type_ids = enc.get("token_type_ids") or [[0] * len(i) for i in enc["input_ids"]]
        assert ex.labels is not None
        return cls(list(enc["input_ids"]), list(type_ids), np.asarray(ex.labels, dtype=np.int64), truncated)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in indices)
        ids = torch.zeros((len(indices), width), dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            ids[row, :n] = torch.tensor(self.ids[i])
            types[row, :n] = torch.tensor(self.type_ids[i])
            mask[row, :n] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "token_type_ids": types.to(device)}


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
    for key in ("layer",):  # bert: encoder.layer.3 ; distilbert: transformer.layer.3
        if key in parts:
            idx = parts.index(key) + 1
            if idx < len(parts) and parts[idx].isdigit():
                return int(parts[idx]) + 1
    return None


def _train(model: nn.Module, train: _Encoded, evalset: _Encoded, args: FinetuneArgs,
           device: torch.device, labels: list[str]) -> list[dict[str, Any]]:
    """The training loop: returns the evaluation history and leaves the best weights loaded."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = max(1, int(round(steps_per_epoch * args.epochs)))
    optimizer = torch.optim.AdamW(_param_groups(model, args))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * args.warmup_ratio), total_steps)
    eval_every = args.eval_every or steps_per_epoch
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    uses_type_ids = "token_type_ids" in model.forward.__code__.co_varnames
    rng = random.Random(args.seed)

    history: list[dict[str, Any]] = []
    best_score, best_state, bad_evals, step = -1.0, None, 0, 0
    bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not args.progress, file=sys.stderr)
    while step < total_steps:
        for idx in _length_grouped_batches(train, args.batch_size, rng):
            if step >= total_steps:
                break
            model.train()
            batch = train.batch(idx, device)
            if not uses_type_ids:
                batch.pop("token_type_ids")
            target = torch.from_numpy(train.labels[idx]).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = nn.functional.cross_entropy(model(**batch).logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[-1]:.1e}")
            if step % eval_every == 0 or step == total_steps:
                m = _evaluate(model, evalset, device, labels, args.batch_size * 2)
                history.append({"step": step, "epoch": round(step / steps_per_epoch, 2), "loss": round(loss.item(), 4),
                                "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
                bar.write(f"step {step}: eval accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f}")
                if m[CLASSIFICATION.metric] > best_score:
                    best_score, bad_evals = m[CLASSIFICATION.metric], 0
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


def _length_grouped_batches(data: _Encoded, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Random batches of similar length (less padding), in random order.

    Shuffle, cut into windows of 50 batches, sort each window by length, slice it into
    batches, shuffle the batches: the same idea as Hugging Face's group_by_length.
    """
    order = list(range(len(data)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(data.ids[i]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def _evaluate(model: nn.Module, data: _Encoded, device: torch.device, labels: list[str],
              batch_size: int) -> dict[str, Any]:
    model.eval()
    uses_type_ids = "token_type_ids" in model.forward.__code__.co_varnames
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))  # length-sorted: less padding
    preds = np.zeros(len(data), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = data.batch(idx, device)
        if not uses_type_ids:
            batch.pop("token_type_ids")
        preds[idx] = model(**batch).logits.argmax(-1).cpu().numpy()
    return classification_metrics(data.labels.tolist(), preds.tolist(), labels)


def _save(args: FinetuneArgs, model: nn.Module, tokenizer: Any, base_dir: Path, labels: list[str],
          metrics: dict[str, Any]) -> None:
    """Write everything into a temp folder beside --out, then move it into place."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = args.max_length
        tokenizer.save_pretrained(tmp)
        (tmp / "labels.json").write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")
        meta = {"task": CLASSIFICATION.name, "labels": labels, "max_length": args.max_length,
                "base_model": args.model, "base_model_dir": str(base_dir), "bertedge_version": __version__,
                "columns": asdict(args.columns)}
        (tmp / "bertedge.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        (tmp / "args.json").write_text(json.dumps(asdict(args), indent=1, default=str) + "\n", encoding="utf-8")
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
