"""NER and QA: alignment, IOB2 checks, entity grouping, windows, the SQuAD metric, fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tokenizer

from bertedge.errors import BertedgeError
from bertedge.runtime.features import load_tokenizer
from bertedge.runtime.tasks import NER, QA, DecodeOptions, QaExamples, ner, qa
from bertedge.toolchain.finetune import FinetuneArgs, finetune

LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return load_tokenizer(folder / "tokenizer.json")


def conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in s) + "\n" for s in sentences), encoding="utf-8")
    return path


NER_SENTENCES = [
    [("john", "B-PER"), ("smith", "I-PER"), ("lives", "O"), ("in", "O"), ("paris", "B-LOC")],
    [("acme", "B-ORG"), ("corp", "I-ORG"), ("is", "O"), ("in", "O"), ("france", "B-LOC")],
    [("the", "O"), ("team", "O"), ("works", "O"), ("at", "O"), ("acme", "B-ORG")],
    [("john", "B-PER"), ("was", "O"), ("born", "O"), ("in", "O"), ("paris", "B-LOC"), (".", "O")],
]


def test_subword_alignment_labels_first_piece_only(tok) -> None:  # type: ignore[no-untyped-def]
    ex = ner.NerExamples([["zzq", "paris"]], [[5, 1]], LABELS, "t", [1])
    f = ner.encode_words(tok, ex, 32)
    enc, target = f.encodings[0], f.targets[0]  # type: ignore[index]
    assert enc.tokens[:5] == ["[CLS]", "z", "##z", "##q", "paris"]
    assert target == [-100, 5, -100, -100, 1, -100]


def test_iob2_validation_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("john\tB-PER\nsmith\tI-PER\n\nparis\tI-LOC\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match=r"line 4: tag 'I-LOC' follows 'O'"):
        ner.read_ner(bad)
    bad.write_text("john\tB-PER\nsmith\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match=r"line 2: expected `token<TAB>tag`"):
        ner.read_ner(bad)
    bad.write_text("john\tPERSON\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match="not IOB2"):
        ner.read_ner(bad)
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match="line 1: 2 tokens but 1 tags"):
        ner.read_ner(jl)


def _logits_for(tags_per_token: list[str]) -> np.ndarray:
    out = np.full((len(tags_per_token), len(LABELS)), -5.0)
    for i, t in enumerate(tags_per_token):
        out[i, LABELS.index(t)] = 5.0
    return out


@pytest.mark.parametrize("strategy", list(ner.Aggregation))
def test_entities_map_to_character_spans(tok, strategy: ner.Aggregation) -> None:  # type: ignore[no-untyped-def]
    text = "Jöhn  Smith lives in Pâris,  France!"
    tok.enable_truncation(64)
    features = NER.encode_items(tok, [(text, None)], 10_000)
    tok.no_truncation()
    enc = features.encodings[0]
    per_word = {0: "B-PER", 1: "I-PER", 4: "B-LOC", 5: "B-LOC"}  # whitespace words: ... in pâris, france!
    token_tags = ["O" if w is None else per_word.get(w, "O") for w in enc.word_ids]
    # with `simple`, later sub-words of a word carry an I- tag of their own; otherwise they
    # repeat the word's tag, so every strategy sees a confident word
    for t in range(1, len(token_tags) if strategy is ner.Aggregation.SIMPLE else 0):
        w = enc.word_ids[t]
        if w is not None and w == enc.word_ids[t - 1] and token_tags[t].startswith("B-"):
            token_tags[t] = "I-" + token_tags[t][2:]
    entities = NER.decode([(text, None)], features, [{"logits": _logits_for(token_tags)}], LABELS,
                          DecodeOptions(aggregation=strategy))[0]["entities"]
    # punctuation stuck to a word is trimmed from the entity ("Pâris," -> "Pâris")
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Jöhn  Smith", 0, 11), ("LOC", "Pâris", 21, 26), ("LOC", "France", 29, 35)]
    assert all(0.9 < e["score"] <= 1.0 for e in entities)


def test_entity_scores_known_case() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    s = ner.entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["per_type"]["LOC"]["recall"] == 0.0 and s["per_type"]["PER"]["f1"] == 1.0


def test_squad_metric_known_cases() -> None:
    ex = [qa.QaExample("1", "q", "c", [("Denver Broncos", 0), ("the Denver Broncos", 0)]),
          qa.QaExample("2", "q", "c", [("in 1990", 0)])]
    s = qa.squad_scores(["denver broncos.", "1990"], ex)
    assert s["exact_match"] == 0.5 and s["f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_qa_answer_in_second_window(tok) -> None:  # type: ignore[no-untyped-def]
    filler = "the film was very good and the plot was fun . " * 6
    context = filler + "john smith lives in paris ."
    start = context.index("paris")
    qa.configure_windows(tok, 48, 16)
    f = qa.encode_qa(tok, ["where does john live ?"], [context], [("paris", start)])
    tok.no_truncation()
    assert len(f) >= 3 and set(f.example_index) == {0}
    hits = [w for w, t in enumerate(f.targets) if t != (0, 0)]  # type: ignore[arg-type]
    assert hits and hits[0] >= 1  # the answer is not in the first window
    # fake logits pointing at the answer in its window, noise elsewhere; the question is never an answer
    windows = []
    for w, enc in enumerate(f.encodings):
        s_log, e_log = np.zeros(len(enc.ids)), np.zeros(len(enc.ids))
        s_log[1] = e_log[1] = 50.0  # a question token: must be ignored
        if w == hits[0]:
            s, e = f.targets[w]  # type: ignore[index]
            s_log[s], e_log[e] = 9.0, 9.0
        windows.append((enc, s_log, e_log))
    best = qa.best_spans(windows, context, top_k=2)
    assert best[0]["text"] == "paris" and best[0]["start"] == start and best[0]["window"] == hits[0]
    assert len(best) == 2 and best[0]["score"] > best[1]["score"]


def test_qa_reader_checks_offsets(tmp_path: Path) -> None:
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 3}]}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(BertedgeError, match=r"id a\): answer 'France' is not at offset 3"):
        qa.read_squad(path)
    jl = tmp_path / "qa.jsonl"
    jl.write_text(json.dumps({"question": "", "context": "x", "answers": []}) + "\n", encoding="utf-8")
    with pytest.raises(BertedgeError, match="line 1: empty question"):
        qa.read_squad(jl)


def squad_doc(n_articles: int) -> dict:
    people = ["john", "smith", "acme"]
    places = ["paris", "france", "city"]
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(6):
            who, where = people[(a + p) % 3], places[(a * 2 + p) % 3]
            ctx = f"the film was good . {who} lives in {where} and works at the team ."
            paras.append({"context": ctx, "qas": [
                {"id": f"{a}-{p}-w", "question": f"where does {who} live ?",
                 "answers": [{"text": where, "answer_start": ctx.index(f" in {where}") + 4}]},
                {"id": f"{a}-{p}-h", "question": f"who lives in {where} ?",
                 "answers": [{"text": who, "answer_start": ctx.index(who)}]}]})
        data.append({"title": f"article{a}", "paragraphs": paras})
    return {"data": data, "version": "1.1"}


def test_finetune_ner_and_qa_tiny(tmp_path: Path) -> None:
    from tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "base", arch="bert")
    train = conll(tmp_path / "train.txt", NER_SENTENCES * 15)
    r = finetune(FinetuneArgs(model=str(model), train=train, eval=conll(tmp_path / "dev.txt", NER_SENTENCES),
                              out=tmp_path / "ner", task="ner", epochs=8, lr=5e-3, layer_lr_decay=1.0,
                              batch_size=8, progress=False, patience=0))
    assert r.metrics["eval"]["f1"] >= 0.5  # random guessing is far below
    meta = json.loads((tmp_path / "ner" / "bertedge.json").read_text())
    assert meta["task"] == "ner" and meta["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    config = json.loads((tmp_path / "ner" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]

    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(squad_doc(5)), encoding="utf-8")
    r = finetune(FinetuneArgs(model=str(model), train=squad, out=tmp_path / "qa", task="qa", epochs=1,
                              max_length=32, stride=8, progress=False, eval_fraction=0.2))
    data = r.metrics["data"]
    assert data["eval_rows_used"] == 12 and data["train_rows_used"] == 48  # one of five articles held out
    assert 0.0 <= r.metrics["eval"]["f1"] <= 1.0 and "exact_match" in r.metrics["eval"]
    assert json.loads((tmp_path / "qa" / "bertedge.json").read_text())["task"] == "qa"


def test_task_records_are_complete() -> None:
    for task in (NER, QA):
        assert task.per_token_outputs and task.metric == "f1"
    assert QA.output_names == ("start_logits", "end_logits")
    assert len(QaExamples([], "x")) == 0


def _cli(*argv: str) -> str:
    from click.testing import CliRunner

    from bertedge.cli import cli

    result = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_ner_cli_end_to_end(tmp_path: Path) -> None:
    """finetune -> export (entity-F1 budget) -> package -> predict, on a tiny random BERT."""
    from tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base", arch="distilbert")
    train = conll(tmp_path / "train.txt", NER_SENTENCES * 10)
    dev = conll(tmp_path / "dev.txt", NER_SENTENCES)
    _cli("finetune", "--task", "ner", "--model", str(base), "--train", str(train), "--eval", str(dev),
         "--out", str(tmp_path / "m"), "--epochs", "4", "--lr", "5e-3", "--batch-size", "8", "--no-progress")
    _cli("export", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--eval", str(dev))
    report = json.loads((tmp_path / "x" / "export-report.json").read_text())
    fp32 = next(a for a in report["artifacts"] if a["name"] == "fp32")
    assert fp32["passed"] and fp32["max_abs_diff_real"] < 1e-3 and fp32["metric"]["name"] == "f1"
    _cli("package", str(tmp_path / "x"), "--out", str(tmp_path / "b"), "--artifact", "fp32")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "John Smith lives in Paris ."}\n\n{"text": "acme corp"}\n', encoding="utf-8")
    lines = [json.loads(x) for x in _cli("predict", str(tmp_path / "b"), "-i", str(inp), "-q",
                                         "--aggregation", "average").splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3] and "error" in lines[1]
    for rec, text in ((lines[0], "John Smith lives in Paris ."), (lines[2], "acme corp")):
        for e in rec["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["type"] in ("PER", "LOC", "ORG")


def test_qa_cli_end_to_end_matches_pytorch(tmp_path: Path) -> None:
    """QA through every stage; the bundle's answers equal span search on PyTorch logits."""
    import torch
    from tiny import make_tiny_model
    from transformers import AutoModelForQuestionAnswering

    from bertedge.runtime import Predictor

    base = make_tiny_model(tmp_path / "base", arch="bert")
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(squad_doc(5)), encoding="utf-8")
    _cli("finetune", "--task", "qa", "--model", str(base), "--train", str(squad), "--out", str(tmp_path / "m"),
         "--epochs", "1", "--max-length", "32", "--stride", "8", "--no-progress")
    _cli("export", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--eval", str(squad), "--max-eval-rows", "20")
    _cli("package", str(tmp_path / "x"), "--out", str(tmp_path / "b"), "--artifact", "fp32")
    context = "the film was good . " * 4 + "john lives in paris and works at the team ."
    question = "where does john live ?"
    got = Predictor(tmp_path / "b").predict([{"question": question, "context": context}])[0]
    assert got["windows"] >= 2 and context[got["start"]:got["end"]] == got["answer"]

    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "m").eval()
    tok = load_tokenizer(tmp_path / "m" / "tokenizer.json")
    qa.configure_windows(tok, 32, 8)
    f = qa.encode_qa(tok, [question], [context])
    windows = []
    for enc in f.encodings:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([enc.ids]), token_type_ids=torch.tensor([enc.type_ids]))
        windows.append((enc, out.start_logits[0].numpy(), out.end_logits[0].numpy()))
    want = qa.best_spans(windows, context)[0]
    assert (got["start"], got["end"]) == (want["start"], want["end"])
    inp = tmp_path / "q.jsonl"
    inp.write_text(json.dumps({"question": question, "context": context}) + "\n"
                   + json.dumps({"question": "who ?", "context": ""}) + "\n", encoding="utf-8")
    lines = [json.loads(x) for x in _cli("predict", str(tmp_path / "b"), "-i", str(inp), "-q",
                                         "--top-k", "2").splitlines()]
    assert lines[0]["answer"] == got["answer"] and "error" in lines[1]
    assert len(lines[0]["answers"]) == 2 and lines[0]["answers"][0]["text"] == got["answer"]


def lenient_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities over words as the runtime groups them: B-X starts, I-X continues an open X,
    any other I-X starts one, O closes."""
    spans: list[list] = []  # type: ignore[type-arg]
    open_kind = None
    for i, tag in enumerate(tags):
        kind = tag[2:] if tag != "O" else None
        if kind and tag.startswith("I-") and open_kind == kind:
            spans[-1][2] = i
            continue
        open_kind = kind
        if kind:
            spans.append([kind, i, i])
    return [tuple(s) for s in spans]  # type: ignore[misc]


def test_runtime_ner_matches_the_training_path_on_joined_words(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`predict` on a whitespace-joined sentence gives the entities the training / eval path
    gives on its words, also for words the pre-tokenizer would split ("u.s.", "john-smith")."""
    import bisect
    import random

    from test_matrix import task_bundle

    from bertedge.runtime import Predictor

    root = tmp_path_factory.getbasetemp() / "task-bundles"
    root.mkdir(exist_ok=True)
    bundle = task_bundle(root, "ner")
    p = Predictor(bundle, threads=1)
    rng = random.Random(0)
    pool = ["john", "smith", "paris", "u.s.", "john-smith", "paris,", "1-0", "(acme)", "corp.", "france!",
            "lives", "in", "the", "team", "a.b.c", "o'neil"]
    sentences = [[rng.choice(pool) for _ in range(rng.randint(3, 8))] for _ in range(30)]
    labels = list(p.labels)
    tok = load_tokenizer(bundle / "tokenizer.json")
    features = NER.encode(tok, ner.NerExamples(sentences, None, labels, "t", [1] * len(sentences)), p.max_length, 0)
    outputs = [{"logits": p.run_encodings([enc])["logits"][0][: len(enc.ids)]} for enc in features.encodings]
    trained = NER.predict(outputs, features, ner.NerExamples(sentences, None, labels, "t", [0] * len(sentences)), labels)
    served = p.predict([" ".join(words) for words in sentences])
    for words, tags, result in zip(sentences, trained, served, strict=True):
        text = " ".join(words)
        starts = ner.split_words(text)[1]
        got = [(e["type"], bisect.bisect_right(starts, e["start"]) - 1, bisect.bisect_right(starts, e["end"] - 1) - 1)
               for e in result["entities"]]
        assert got == lenient_spans(tags), text
    assert any(lenient_spans(tags) for tags in trained)  # the comparison is not vacuous
