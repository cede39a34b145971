"""Mixtures: exact per-source counts for weights and samples, seeded draws, and what preparation
reports and trains on (the bundled tiny model's tokenizer and tasks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_MOE, TINY_TASKS, write_jsonl

from finetune.data import mixture
from finetune.data.prep import build_datasets
from finetune.errors import UserError
from finetune.modeling import load_tokenizer
from finetune.recipe import DataSection, DataSource, ModelSection


def specs(*settings: dict) -> list[DataSource]:
    return [DataSource(path=f"s{i}.jsonl", **s) for i, s in enumerate(settings)]


@pytest.mark.parametrize("sizes, settings, want", [
    ([10, 30], [{"weight": 2}, {"weight": 1}], [10, 5]),           # the first runs out: 15 rows, 2:1
    ([10, 30], [{"weight": 1}, {"weight": 3}], [10, 30]),
    ([10, 20, 7], [{"weight": 1}] * 3, [7, 7, 7]),
    ([5, 5], [{"weight": 1}, {"weight": 2}], [2, 5]),               # 7 rows: 2.33 + 4.67, largest remainder
    ([10, 4], [{"weight": 0}, {"weight": 1}], [0, 4]),
    ([10, 20], [{"samples": 4}, {"samples": 50, "replace": True}], [4, 50]),
    ([10, 20], [{"weight": 1}, {"samples": 3}], [10, 3]),
    ([10, 20], [{}, {"samples": 20}], [10, 20]),
])
def test_counts_are_exact(sizes, settings, want):
    assert mixture.counts(sizes, specs(*settings), "data.train") == want


def test_samples_beyond_a_source_without_replacement_is_an_error():
    with pytest.raises(UserError) as info:
        mixture.counts([10, 20], specs({"samples": 4}, {"samples": 25}), "data.train")
    assert [str(p) for p in info.value.problems] == [(
        "data.train[1].samples: 25 rows asked of s1.jsonl, which has 20 usable row(s); lower samples, or set "
        "replace: true to draw with replacement")]


def test_draws_are_seeded_and_without_replacement_unless_asked():
    mix = specs({"samples": 6}, {"samples": 40, "replace": True}, {"weight": 1})
    a, b = mixture.draw([10, 20, 8], mix, 0, "data.train"), mixture.draw([10, 20, 8], mix, 0, "data.train")
    c = mixture.draw([10, 20, 8], mix, 1, "data.train")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert len(a[0]) == len(set(a[0].tolist())) == 6 and a[0].max() < 10
    assert len(a[1]) == 40 and len(set(a[1].tolist())) < 20  # 40 draws of 20 rows repeat some
    assert a[2].tolist() == list(range(8))  # a weighted source that gives every row keeps its order
    # a source's draw depends on its place and the seed, not on the sources after it
    assert np.array_equal(mixture.draw([10], mix[:1], 0, "data.train")[0], a[0])


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(ModelSection(name_or_path=str(TINY_MOE)))


def test_prepared_mixture_trains_on_the_counted_rows(tmp_path, tiny_tokenizer):
    rows = [json.loads(line) for line in (TINY_TASKS / "sft.jsonl").read_text().splitlines()]
    a_rows, b_rows = rows[:20], rows[1000:1040]
    a, b = write_jsonl(tmp_path / "a.jsonl", a_rows), write_jsonl(tmp_path / "b.jsonl", b_rows)

    def prepare(seed, *entries):
        train, _, report = build_datasets(DataSection(train=list(entries), max_length=224), tiny_tokenizer, "sft", seed)
        return [tuple(ids) for ids in train["input_ids"]], report

    only_a = set(prepare(0, str(a))[0])
    only_b = set(prepare(0, str(b))[0])
    assert not only_a & only_b
    mix = (DataSource(path=str(a), weight=1), DataSource(path=str(b), weight=3))
    got, report = prepare(0, *mix)
    assert sum(r in only_a for r in got) == 13 and sum(r in only_b for r in got) == 40  # 53 rows: 13.25 + 39.75
    assert [(s["where"], s["usable"], s["used"], s["weight"]) for s in report.sources] == [
        ("data.train[0]", 20, 13, 1.0), ("data.train[1]", 40, 40, 3.0)]
    assert prepare(0, *mix)[0] == got and prepare(1, *mix)[0] != got  # seeded: same seed same rows
    got, report = prepare(0, DataSource(path=str(a), samples=50, replace=True), str(b))
    assert len(got) == 90 and sum(r in only_a for r in got) == 50 and len(set(got) & only_a) < 20
    assert report.sources[0] | {"source": ""} == {"split": "train", "where": "data.train[0]", "source": "",
                                                  "format": "messages", "rows_read": 20, "usable": 20, "used": 50,
                                                  "samples": 50, "replace": True}
