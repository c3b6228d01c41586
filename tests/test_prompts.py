"""Prompt files: cleaning is reported, not hidden; real CompBench quirks are handled."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mitune.models.builders import tiny_tokenizer
from mitune.prompts.sources import (
    COMPBENCH_CATEGORIES,
    compbench_file,
    load_compbench,
    load_prompts,
    over_length,
    read_prompt_file,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "t2i-compbench"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/t2i-compbench not present")


def test_blank_and_duplicate_lines_are_reported_and_removed(tmp_path, caplog):
    f = tmp_path / "p.txt"
    f.write_bytes("a red cat\r\n\r\n  a blue dog \r\na red cat\r\nun caf\u00e9 vert".encode())
    with caplog.at_level(logging.WARNING):
        ps = read_prompt_file(f)
    assert ps.prompts == ["a red cat", "a blue dog", "un caf\u00e9 vert"]
    assert ps.duplicates == {"a red cat": 2}
    assert ps.blank_lines == 1
    assert "1 blank line" in caplog.text and "1 duplicate line" in caplog.text
    # Said as what was dropped and what is left ("of 1 prompt(s)" read as if every prompt was dropped).
    assert "removed 1 duplicate line; 3 prompts kept (e.g. 'a red cat' was repeated)" in caplog.text


@pytest.mark.parametrize("content", ["", "\n \r\n\t\n"])
def test_empty_file_is_an_error_naming_it(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match="empty.txt has no prompts"):
        read_prompt_file(f)


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


def test_inline_prompts_and_limit():
    assert load_prompts(prompts=["b", "a", "b", "c"], limit=2).prompts == ["b", "a"]
    with pytest.raises(ValueError, match="exactly one"):
        load_prompts()
    with pytest.raises(ValueError, match="data.limit must be an integer >= 1 or null, got 0"):
        load_prompts(prompts=["a"], limit=0)


def test_unknown_category_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown T2I-CompBench category 'colour'"):
        compbench_file("colour")
    with pytest.raises(FileNotFoundError, match="make data"):
        compbench_file("color", data_dir=str(tmp_path))


@needs_shared
@pytest.mark.parametrize("category", COMPBENCH_CATEGORIES)
def test_compbench_files_load_with_unique_prompts(category):
    raw = [line.strip() for line in (SHARED / f"{category}_train.txt").read_text("utf-8").splitlines()]
    ps = load_compbench(category, "train", data_dir=str(SHARED))
    assert len(ps.prompts) == len(set(ps.prompts)) == len({r for r in raw if r})
    assert all(p == p.strip() and p for p in ps.prompts)
    assert not any("\r" in p for p in ps.prompts)


@needs_shared
def test_compbench_documented_duplicates_are_found():
    # ../shared's README documents 21 / 15 / 5 repeated lines in these train files.
    for category, extra in [("color", 21), ("shape", 15), ("texture", 5)]:
        ps = load_compbench(category, "train", data_dir=str(SHARED))
        assert sum(ps.duplicates.values()) - len(ps.duplicates) == extra


def test_over_length_prompts_are_warned(caplog):
    tok = tiny_tokenizer(["a", "red", "cat"], max_length=6)
    with caplog.at_level(logging.WARNING):
        long = over_length(tok, ["a red cat", "a red cat a red cat a red cat"])
    assert long == ["a red cat a red cat a red cat"]
    assert "truncated" in caplog.text


def test_fixture_category_file_with_crlf_and_duplicate():
    fixtures = Path(__file__).parent / "fixtures" / "compbench"
    ps = load_compbench("color", "train", data_dir=str(fixtures))
    assert ps.prompts == ["a red book and a blue cup", "a green apple and a yellow car"]
    assert ps.duplicates == {"a red book and a blue cup": 2}


def test_toy_prompt_sets_are_balanced_and_disjoint():
    from mitune.toy.prompts import load_toy
    from mitune.toy.world import CATEGORIES, category_of

    train, val = load_toy("train", 3).prompts, load_toy("val", 3).prompts
    assert [category_of(p) for p in train] == [c for c in CATEGORIES for _ in range(3)]
    assert [category_of(p) for p in val] == [c for c in CATEGORIES for _ in range(3)]
    assert not set(train) & set(val)
    assert load_toy("train", 5).prompts[:3] == train[:3]  # a larger set extends a smaller one
    unseen = load_toy("train", 2, skip=3).prompts  # in distribution, and none of the first 3 per category
    assert [category_of(p) for p in unseen] == [c for c in CATEGORIES for _ in range(2)]
    assert not set(unseen) & (set(train) | set(val))
    assert load_toy("train", 5).prompts[3:5] == unseen[:2]
    with pytest.raises(ValueError, match=r"too few train prompts for 20 skipped \+ 6 per category: \{'shape': 25\}"):
        load_toy("train", 6, skip=20)
    with pytest.raises(ValueError, match="unknown toy split 'test'; expected one of \\('train', 'val'\\)"):
        load_toy("test")
