"""Every CLI case of ``cases.yaml``: the stage refuses the input with the promised exit status,
says on stderr which variable, file or row is wrong, and leaves no file behind.

Cases that expose a stage bug are strict xfails naming the bug (see ``tests/fixtures/bad_input_cases.py``).
"""

from __future__ import annotations

import pytest

from tests.fixtures.bad_input_cases import (
    FAST_CPU_SECONDS,
    FAST_WALL_SECONDS,
    RUN_RECORDS,
    STAGE_DEFAULTS,
    expand,
    load_cases,
    placeholders,
    stage_env,
    write_files,
)
from tests.fixtures.stage_runs import RUN_TIMEOUT, files_under, run_stage

CLI_CASES = load_cases(lambda stage: stage != "api")


def params():
    for case in CLI_CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        if not case.fast:
            marks.append(pytest.mark.slow)
        yield pytest.param(case, id=case.id, marks=marks)


def resolve_inputs(case, request, case_dir) -> dict[str, str]:
    """The session-built inputs this case names, and its own folder as ``{tmp}``."""
    used = placeholders([case.raw, STAGE_DEFAULTS.get(case.stage, {})]) - {"tmp"}
    inputs = {name: request.getfixturevalue(name) for name in sorted(used)}
    inputs["tmp"] = str(case_dir)
    return inputs


def assert_error_lines(run, expected) -> None:
    lines = run.error_lines()
    assert lines, f"no 'error:' line on stderr:\n{run.stderr[-3000:]}"
    for item in expected or []:
        fragments = [item] if isinstance(item, str) else item
        assert any(all(f in line for f in fragments) for line in lines), (
            f"no error line contains all of {fragments}; error lines:\n" + "\n".join(lines)
        )


@pytest.mark.parametrize("case", list(params()))
def test_bad_input_is_refused_clearly(case, request, case_dir):
    inputs = resolve_inputs(case, request, case_dir)
    write_files(case_dir, case.files, inputs)
    before = files_under(case_dir)

    timeout = FAST_WALL_SECONDS if case.fast else RUN_TIMEOUT
    run = run_stage(case.stage, expand(case.args or [], inputs), stage_env(case, inputs), case_dir, timeout)

    shown = f"exit {run.exit} after {run.seconds:.1f} s ({run.cpu_seconds:.1f} s CPU)\n--- stdout\n{run.stdout[-2000:]}\n--- stderr\n{run.stderr[-4000:]}"
    assert run.exit == case.exit, shown
    if case.exit == 2:
        # A user's mistake is a sentence, never a traceback.
        assert "Traceback" not in run.stderr, shown
        assert_error_lines(run, case.errors)
    left = files_under(case_dir) - before - RUN_RECORDS
    assert not left, f"files left behind: {sorted(left)}\n{shown}"
    if case.fast:
        assert run.cpu_seconds < FAST_CPU_SECONDS, f"something heavy was loaded first\n{shown}"
