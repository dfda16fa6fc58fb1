"""The PyTorch side of export: the source model, and the real inputs every artifact is checked on.

Real inputs are batched exactly as `predict` and `serve` batch them (length-sorted groups of
`--batch-size`, padded to their longest): --eval rows encoded by the task record, --calibration
texts, --agreement-data texts, or a few built-in sentences when neither file is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.data import BadRows, load_text_classification, seeded_indices
from bertedge.runtime.features import (
    Features,
    length_sorted_batches,
    load_tokenizer,
    pad_batch,
    pad_id,
)
from bertedge.runtime.meta import ModelMeta, read_model_meta
from bertedge.runtime.predictor import CHARS_PER_TOKEN_CAP
from bertedge.runtime.records import Pair
from bertedge.runtime.tasks import CLASSIFICATION, MARGIN_MASK, Task
from bertedge.toolchain.export.args import ExportArgs
from bertedge.toolchain.export.compare import Feeds, Outputs, Run, feed
from bertedge.toolchain.families import FAMILIES, family
from bertedge.toolchain.models import load_pretrained

# config model_type -> onnxruntime optimizer type, for every family in bertedge.toolchain.families
SUPPORTED_MODEL_TYPES = {f.model_type: f.optimizer_type for f in FAMILIES if f.exportable}
# Used for label agreement when the user gives neither --eval nor --calibration.
BUILTIN_SENTENCES = (
    "The service was quick and the staff were friendly.", "I would not recommend this to anyone.",
    "It arrived late and the box was damaged.", "An absolute delight from start to finish.",
    "The plot was thin but the acting saved it.", "Battery life is shorter than advertised.",
    "What time does the museum open on Sundays?", "She moved to Berlin in 2019 to work at Siemens.",
    "Terrible sound quality, returned it the next day.", "A solid, dependable choice for the price.",
    "The meeting has been moved to Thursday afternoon.", "Honestly the best pizza I have had in years.",
    "The instructions were confusing and incomplete.", "Paris is the capital of France.",
    "Not bad, though the sequel was better.", "The update fixed every crash I had seen.",
)


@dataclass
class Source:
    """The PyTorch side: model, tokenizer and what the graph's inputs are."""

    info: ModelMeta
    model: Any  # transformers.PreTrainedModel, in eval mode
    tokenizer: Any  # tokenizers.Tokenizer from tokenizer.json: the runtime's own tokenization
    input_names: list[str]
    stride: int  # QA window overlap, from bertedge.json (finetune writes it)


def load_source(model_dir: Path) -> Source:
    """Load model and tokenizer from a model folder, turning every failure into a BertedgeError."""
    if not model_dir.is_dir():
        raise BertedgeError(f"model folder '{model_dir}' does not exist", "pass the --out folder of `bertedge finetune`")
    info = read_model_meta(model_dir)
    found = family(info.model_type, str(model_dir / "config.json"))
    if not found.exportable:
        raise BertedgeError(f"{found.name} cannot be exported to ONNX: {found.blocker}",
                            f"export one of: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if not (model_dir / "tokenizer.json").is_file():
        raise BertedgeError(
            f"'{model_dir}' has no tokenizer.json (the runtime needs the fast tokenizer file)",
            "re-save the tokenizer with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`",
        )
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    model = load_pretrained(model_dir, info.task.hf_auto_class).eval()
    return Source(info, model, tokenizer, _input_names(model), info.stride)


def _input_names(model: Any) -> list[str]:
    """The graph inputs: the family's signature, less anything this forward() does not accept.

    DistilBERT, MPNet and ModernBERT take no token_type_ids; RoBERTa / XLM-R (one token type)
    and DeBERTa-v3 (none) accept them but ignore them, so the graph leaves them out.
    """
    import inspect

    accepted = inspect.signature(model.forward).parameters
    wanted = family(model.config.model_type).input_names(int(getattr(model.config, "type_vocab_size", 0) or 0))
    return [n for n in wanted if n in accepted]


def tokenize(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int,
             batch_size: int, margin: Task | None = None) -> list[Feeds]:
    """Tokenize (truncating to max_length) into int64 batches, each padded to its longest row
    (with `margin`'s MARGIN_MASK, see `runtime_batches`)."""
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts))
    tokenizer.no_truncation()
    return runtime_batches(encodings, pad_id(tokenizer), batch_size, margin)[0]


def runtime_batches(encodings: Sequence[Any], pad: int, batch_size: int,
                    margin: Task | None = None) -> tuple[list[Feeds], list[list[int]]]:
    """Batches exactly as `predict` and `serve` build them: length-sorted, padded to their longest.

    Validating any other batching would validate something the runtime never runs: dynamic
    INT8's scales, and so its answers, depend on a text's batch mates and padding. With a task in
    `margin`, each batch also carries the task's MARGIN_MASK (the tokens a cascade's margin looks
    at, as the Predictor feeds it); graphs never read it.
    """
    order = list(length_sorted_batches([len(e.ids) for e in encodings], batch_size))
    batches = [pad_batch([encodings[i] for i in idx], pad) for idx in order]
    if margin is not None:
        batches = [{**b, MARGIN_MASK: margin.margin_mask([encodings[i] for i in idx], b["input_ids"].shape[1])}
                   for b, idx in zip(batches, order, strict=True)]
    return batches, order


def random_batches(vocab_size: int, max_length: int, seed: int) -> list[Feeds]:
    """Random token ids with ragged attention masks: inputs no tokenizer would make."""
    rng = np.random.default_rng(seed)
    batches = []
    for batch, seq in ((4, 16), (2, min(max_length, 64))):
        lengths = rng.integers(2, seq + 1, size=batch)
        lengths[0] = seq  # one full row so the padded length is really `seq`
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64) * mask
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids)})
    return batches


@dataclass
class EvalSet:
    """Labelled --eval rows, encoded by the task into model windows and padded batches."""

    examples: Any  # the task's examples (TextExamples, NerExamples, QaExamples, ...)
    features: Features  # one window per row (QA: per context window)
    batches: list[Feeds]  # the windows in the runtime's length-sorted batches of batch_size
    order: list[list[int]]  # window indices of each batch
    rows: int
    source: str


def load_eval(args: ExportArgs, source: Source) -> EvalSet | None:
    """The --eval set read and encoded by the task record, or None without --eval."""
    if args.eval_file is None:
        return None
    task, info = source.info.task, source.info
    examples = task.load(args.eval_file, args.columns, list(info.labels) or None, BadRows.ERROR)
    if 0 < args.max_eval_rows < len(examples):
        examples = examples.subset(seeded_indices(len(examples), args.max_eval_rows, args.seed))
    features = task.encode(source.tokenizer, examples, info.max_length, source.stride)
    batches, order = runtime_batches(features.encodings, pad_id(source.tokenizer), args.batch_size, task)
    return EvalSet(examples, features, batches, order, len(examples), str(args.eval_file))


def _windows(outputs: Sequence[Outputs], batches: Sequence[Feeds], order: Sequence[list[int]],
             per_token: bool) -> list[Outputs]:
    """Batched outputs -> one dict per window in window order, per-token outputs cut to length."""
    windows: list[Outputs] = [{} for _ in range(sum(len(i) for i in order))]
    for out, batch, idx in zip(outputs, batches, order, strict=True):
        for row, (i, length) in enumerate(zip(idx, batch["attention_mask"].sum(axis=1), strict=True)):
            windows[i] = {k: v[row, :length] if per_token else v[row] for k, v in out.items()}
    return windows


def evaluate(outputs: Sequence[Outputs], eval_set: EvalSet, task: Task, labels: Sequence[str]) -> float:
    """The task's headline metric (0..1) from outputs on `eval_set.batches`: predict, then score.

    Uses the task record's own `predict` and `score`, so classification accuracy, NER entity
    F1 and QA SQuAD F1 all flow through here unchanged.
    """
    predictions = example_predictions(outputs, eval_set, task, labels)
    return float(task.score(predictions, eval_set.examples, labels)[task.metric])


def example_predictions(outputs: Sequence[Outputs], eval_set: EvalSet, task: Task, labels: Sequence[str]) -> list[Any]:
    """The task's prediction per --eval example (a label, entities, an answer) from batch outputs."""
    windows = _windows(outputs, eval_set.batches, eval_set.order, task.per_token_outputs)
    return list(task.predict(windows, eval_set.features, eval_set.examples, labels))


def read_items(path: Path, args: ExportArgs, task: Task) -> list[Pair]:
    """A --calibration or --agreement-data file as the runtime's input items (text, pair).

    The task's own labelled format is read first (CoNLL for NER, SQuAD for QA, a labelled table
    for classification: labels read, then unused), else plain text columns without labels, so
    the same train file that fine-tuned a model can feed its export.
    """
    try:
        items = task.items(task.load(path, args.columns, None, BadRows.SKIP))
        as_task = f"no {task.name} examples"
    except BertedgeError as e:
        items, as_task = [], e.problem
    if items:
        return items
    try:
        return CLASSIFICATION.items(load_text_classification(path, args.columns, require_labels=False))
    except BertedgeError as as_text:
        raise BertedgeError(f"{path}: not {task.name} data ({as_task}) nor text columns ({as_text.problem})",
                            as_text.fix) from None


def load_calibration(args: ExportArgs, source: Source) -> list[Feeds]:
    """Up to --calibration-rows texts (and pairs) from --calibration, tokenized; labels not needed.

    Calibration only needs realistic activations, so each text (QA: question and context) is
    simply cut to the model's length.
    """
    if args.calibration is None:
        return []
    items = read_items(args.calibration, args, source.info.task)
    items = [items[i] for i in seeded_indices(len(items), args.calibration_rows, args.seed)]
    pairs = [p or "" for _, p in items] if any(p is not None for _, p in items) else None
    return tokenize(source.tokenizer, [t for t, _ in items], pairs, source.info.max_length, args.batch_size)


def load_agreement_texts(args: ExportArgs, source: Source) -> list[Feeds]:
    """Up to --agreement-rows texts of --agreement-data, encoded and batched as `predict` does.

    A small eval set measures agreement coarsely (872 rows: one answer is 0.11%), so a static
    INT8 recipe can pass or miss by its calibration draw's luck. Unlabelled texts sharpen it at
    no labelling cost. From the --calibration file itself, the rows calibration drew are left
    out: agreement on the texts the scales were fitted to would flatter static INT8. Each text
    goes through the task's runtime encoding (`Task.encode_items`: NER's word split, QA's windows
    over the whole context), items the runtime would refuse left out.
    """
    if args.agreement_data is None:
        return []
    task = source.info.task
    items = read_items(args.agreement_data, args, task)
    same_file = args.calibration is not None and args.calibration.resolve() == args.agreement_data.resolve()
    if same_file and 0 < args.calibration_rows < len(items):
        drawn = set(seeded_indices(len(items), args.calibration_rows, args.seed))  # load_calibration's rows
        items = [item for i, item in enumerate(items) if i not in drawn]
    elif same_file:
        raise BertedgeError(f"--agreement-data is the --calibration file and calibration uses all its "
                            f"{len(items)} rows", "give --agreement-data other texts, or lower --calibration-rows")
    items = [items[i] for i in seeded_indices(len(items), args.agreement_rows, args.seed + 1)]
    items = [item for item in items if task.check_item(item) is None]
    tokenizer = Tokenizer.from_str(source.tokenizer.to_str())  # the runtime's settings, on a copy
    task.setup_tokenizer(tokenizer, source.info.max_length, source.stride)
    features = task.encode_items(tokenizer, items, source.info.max_length * CHARS_PER_TOKEN_CAP)
    return runtime_batches(features.encodings, pad_id(tokenizer), args.batch_size, task)[0]


def torch_runner(source: Source) -> Run:
    """Run the PyTorch model on a feed, returning the task's outputs as numpy."""
    import torch

    names = source.info.task.output_names

    def run(feeds: Feeds) -> Outputs:
        with torch.no_grad():
            out = source.model(**{n: torch.from_numpy(feed(feeds, n)) for n in source.input_names})
        return {n: getattr(out, n).numpy() for n in names}

    return run
