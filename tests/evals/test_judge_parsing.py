"""The judge's prompt carries the rubric and the answer; every reply maps to 1-5 or None."""

import pytest

from evals.judge import JudgeItem, JudgeVerdict, build_judge_messages, parse_judge_score, summarize_verdicts


def test_prompt_has_rubric_question_reference_and_answer():
    messages = build_judge_messages(JudgeItem("What is 2+2?", "It is 4.", reference="4"))
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    for criterion in ("correctness", "completeness", "faithfulness"):
        assert criterion in system
    assert '"score"' in system and "1 to 5" in system
    assert "What is 2+2?" in user and "Reference answer" in user and "It is 4." in user


def test_prompt_without_reference_omits_it_and_marks_empty_answers():
    user = build_judge_messages(JudgeItem("Say hi.", "  "))[1]["content"]
    assert "Reference" not in user
    assert "(empty)" in user


@pytest.mark.parametrize(
    "reply, score",
    [
        # JSON, as asked
        ('{"score": 4, "reason": "minor flaw"}', 4),
        ('{"score": 5.0}', 5),
        ('{"score": "3"}', 3),
        ('```json\n{"score": 2, "reason": "wrong"}\n```', 2),
        ('Here is my grade: {"score": 1, "reason": "empty"} Thanks!', 1),
        # JSON decides alone, even when the prose around it has other numbers
        ('Answers 1 and 2 differ. {"score": 3}', 3),
        # malformed JSON scores
        ('{"score": 7}', None),
        ('{"score": 0}', None),
        ('{"score": 4.5}', None),
        ('{"score": "four"}', None),
        ('{"score": true}', None),
        ('{"reason": "no score given"}', None),
        ('{"score": null}', None),
        # prose with a labelled score
        ("Score: 4", 4),
        ("Overall score: **5**", 5),
        ("I would give a rating of 3.", 3),
        ("4/5 - mostly right", 4),
        ("I rate it 2 out of 5", 2),
        ("Correctness 5, completeness 4. Score: 4/5", 4),
        ("Score: 9", None),
        ("score 3, and on reflection score 4", None),
        ("Score: 3.5", None),
        # prose with one bare number
        ("3", 3),
        ("I give it a 5.", 5),
        # nothing usable
        ("", None),
        ("The answer looks fine to me.", None),
        ("Correctness 5, completeness 4", None),
        ("8/10", None),
        ("6", None),
        # JSON cut short by the judge's token limit still names its score
        ('{"score": 4', 4),
        ('{"score": 2, "reason": "the answer says 3 but', 2),
    ],
)
def test_parse_judge_score(reply, score):
    assert parse_judge_score(reply) == score


def test_summary_averages_parsed_scores_and_counts_the_rest():
    verdicts = [JudgeVerdict(4, "4"), JudgeVerdict(None, "?"), JudgeVerdict(2, "2")]
    assert summarize_verdicts(verdicts) == {"judge_mean": 3.0, "judge_scored": 2, "judge_unparseable": 1}


def test_summary_of_nothing_parsed_has_no_mean():
    assert summarize_verdicts([JudgeVerdict(None, "")])["judge_mean"] is None
