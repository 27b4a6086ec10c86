"""Classification tasks (wiki-pair, wiki-topic, mrpc), heads for every family, and exact accuracy/F1."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from evaluation_fixtures import accuracy_and_f1, predictions_one_by_one, save_tiny, spy_on

from sparselm.data import wiki_split_of
from sparselm.errors import SparselmError
from sparselm.evaluation import evaluate
from sparselm.evaluation import run as run_module
from sparselm.evaluation.classification import MeanPooledClassifier, load_classifier, scores
from sparselm.evaluation.tasks import CLASSIFICATION_TASKS, classification_task, first_sentence, topic_labels


def test_wiki_pair_is_balanced_deterministic_and_split_by_title_hash():
    task = classification_task("wiki-pair")
    test = task.examples("test")
    assert test == task.examples("test")
    assert Counter(e.label for e in test) == {0: len(test) // 2, 1: len(test) // 2}
    assert task.num_labels == 2 and task.pair


def test_wiki_pair_negatives_share_the_topic_and_split_but_not_the_article():
    from sparselm.data import wiki_articles

    by_sentence = {first_sentence(a["extract"]): a for a in wiki_articles()}
    rows = classification_task("wiki-pair").examples("validation")[:200]
    for positive, negative in zip(rows[::2], rows[1::2], strict=True):
        article, other = by_sentence[positive.text_pair], by_sentence[negative.text_pair]
        assert (positive.label, negative.label) == (1, 0) and positive.text == negative.text == article["description"]
        assert article["topic"] == other["topic"] != "Uncategorized" and article["title"] != other["title"]
        assert wiki_split_of(article["title"]) == wiki_split_of(other["title"]) == "validation"


def test_wiki_topic_has_eleven_topics_without_uncategorized():
    labels = topic_labels()
    assert len(labels) == 11 and "Uncategorized" not in labels
    rows = classification_task("wiki-topic").examples("test")
    assert set(Counter(e.label for e in rows)) == set(range(11))
    assert all(e.text_pair is None for e in rows)


def test_scores_are_exact():
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    result = scores(preds, refs, 2)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    multi = scores([0, 1, 2, 2], [0, 2, 2, 1], 3)
    per_class = [1.0, 0.0, 2 * 1 / (2 * 1 + 1 + 1)]
    assert multi["f1"] == pytest.approx(sum(per_class) / 3)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "bert", "roberta", "bart", "t5", "pegasus"])
def test_every_family_gets_a_classification_number(family, tmp_path, monkeypatch):
    """Accuracy and F1 of the batched, padded pass equal those recomputed one example at a time from the logits."""
    model_dir = save_tiny(tmp_path / family, family)
    calls = spy_on(monkeypatch, run_module, "classify")
    result = evaluate(str(model_dir), "wiki-pair", max_examples=8, batch_size=4)
    assert 0.0 <= result.metrics.accuracy <= 1.0 and result.metrics.examples == 8
    model, tokenizer, examples = calls[0]["args"][:3]
    assert examples == classification_task("wiki-pair").examples("test")[:8]
    predictions = predictions_one_by_one(model, tokenizer, examples)
    accuracy, f1 = accuracy_and_f1(predictions, [ex.label for ex in examples], 2)
    assert (result.metrics.accuracy, result.metrics.f1) == (pytest.approx(accuracy, abs=1e-12), pytest.approx(f1, abs=1e-12))
    assert result.settings["head"] == ("mean-pooled" if family == "pegasus" else "sequence-classification")
    assert not result.settings["head_trained"] and "randomly initialised" in result.notes[0]


def test_mean_pooled_head_ignores_padding(tmp_path):
    loaded = load_classifier(str(save_tiny(tmp_path / "p", "pegasus")), classification_task("wiki-topic"))
    model = loaded.model
    assert isinstance(model, MeanPooledClassifier) and model.classifier.out_features == 11
    ids = torch.tensor([[10, 11, 12, 2]])
    padded = torch.tensor([[10, 11, 12, 2, 1, 1]])
    with torch.inference_mode():
        a = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = model(input_ids=padded, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_a_model_without_any_text_head_fails_clearly(tmp_path):
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(SparselmError, match="no sequence-classification head and no text encoder"):
        evaluate(str(tmp_path / "vit"), "wiki-topic", max_examples=4)


def test_mrpc_offline_says_how_to_provide_it():
    with pytest.raises(SparselmError, match="--data-dir"):
        classification_task("mrpc").examples("test")


def test_mrpc_reads_glue_files(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (tmp_path / "dev.tsv").write_text(header + "1\t1\t2\tThe cat sat.\tA cat was sitting.\n0\t3\t4\tIt rained.\tPrices rose.\n")
    rows = classification_task("mrpc").examples("test", tmp_path)
    assert [(r.text, r.label, r.text_pair) for r in rows] == [
        ("The cat sat.", 1, "A cat was sitting."), ("It rained.", 0, "Prices rose."),
    ]
    assert classification_task("mrpc").split_used("test") == "validation"
    with pytest.raises(SparselmError, match="train.tsv"):
        classification_task("mrpc").examples("train", tmp_path)


def test_registry_names():
    assert set(CLASSIFICATION_TASKS) == {"mrpc", "wiki-pair", "wiki-topic"}
