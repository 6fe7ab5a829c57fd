"""GSM8K scoring compares the final number an answer commits to, by value."""

from decimal import Decimal

import pytest

from evals.gsm8k import exact_match, extract_final_number, find_numbers, format_number, load_gsm8k
from evals.settings import EvalError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,200", "1200"),
        ("The total is 1,234,567 apples.", "1234567"),
        ("She owes -15 dollars.", "-15"),
        ("#### -3", "-3"),
        ("It costs $18.", "18"),
        ("It costs $1,050.50 in all.", "1050.5"),
        ("The answer is 72.", "72"),
        ("The answer is 72.00", "72"),
        ("The answer is 0.5", "0.5"),
        ("He lost $-7 overall", "-7"),
        ("About 50% of them.", "50"),
        ("First 3 then 4 then 10", "10"),
        ("Pages 3-4 were torn", "4"),
        ("Step 1: 5 + 7 = 12\n#### 12 cookies", "12"),
        ("I think 9 #### 10 #### 11", "11"),
        ("5 apples then #### 8, not 5", "8"),
    ],
)
def test_extracts_the_committed_number(text, expected):
    assert format_number(extract_final_number(text)) == expected


@pytest.mark.parametrize("text", ["", "no number here", "#### ", "there were 12 before #### none after"])
def test_no_committed_number_gives_none(text):
    assert extract_final_number(text) is None


def test_commas_only_group_thousands():
    # "1,2,3" is a list, not one number; "10,000" is one number.
    assert find_numbers("1,2,3 and 10,000") == [Decimal(1), Decimal(2), Decimal(3), Decimal(10000)]


def test_words_with_digits_are_not_numbers():
    assert find_numbers("use the A4 paper and 3 pens") == [Decimal(3)]


@pytest.mark.parametrize(
    "prediction, reference, hit",
    [
        ("So the answer is 72.", "48/2 = 24\n#### 72", True),
        ("#### 72.0", "#### 72", True),
        ("$1,200", "#### 1200", True),
        ("#### 71", "#### 72", False),
        ("I am not sure.", "#### 72", False),
        ("-5", "#### 5", False),
    ],
)
def test_exact_match(prediction, reference, hit):
    assert exact_match(prediction, reference) is hit


def test_a_reference_without_a_number_never_matches():
    assert exact_match("0", "no answer") is False


def test_load_gsm8k_names_the_bad_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(EvalError, match=r"g.jsonl:2: .*'question' and 'answer'"):
        load_gsm8k(path)


def test_load_gsm8k_reads_rows(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n', encoding="utf-8")
    assert load_gsm8k(path) == [{"question": "1+1?", "answer": "#### 2"}]
