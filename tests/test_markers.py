"""The markers tests/conftest.py sets: `subprocess` on tests that start the console script (found by
reading the code a test and its fixtures run), `interpreter` on the Triton kernel tests."""

from __future__ import annotations

import pytest

import conftest
from clirun import run_pti


def _version():  # a helper of tests/ between the test and run_pti
    return run_pti("--version")


def _through_a_helper():
    return _version().stdout


def _no_script(x):
    return [y * 2 for y in range(x)]


@pytest.fixture(scope="module")
def version_line():
    return _version().stdout.strip()


def test_reaches_sees_the_console_script_through_helpers_and_nested_code() -> None:
    assert conftest.reaches(_version) and conftest.reaches(_through_a_helper)
    assert conftest.reaches(lambda: [run_pti for _ in ()])  # named in a comprehension, never run
    assert not conftest.reaches(_no_script) and not conftest.reaches(len)


def test_a_test_that_starts_the_console_script_is_marked(request) -> None:
    assert run_pti("--version").returncode == 0
    assert request.node.get_closest_marker("subprocess") is not None


def test_a_fixture_that_starts_it_marks_the_tests_that_use_it(request, version_line) -> None:
    assert version_line.startswith("pti ")
    assert request.node.get_closest_marker("subprocess") is not None


def test_a_test_that_starts_nothing_is_not_marked(request) -> None:
    assert request.node.get_closest_marker("subprocess") is None
    assert request.node.get_closest_marker("interpreter") is None


def test_the_triton_kernel_tests_are_marked_interpreter() -> None:
    assert conftest.INTERPRETER_FILES == (
        "test_kernels.py",
        "test_kernels_bias_act.py",
        "test_kernels_precision.py",
        "test_kernels_upfirdn.py",
    )
    assert all((conftest.TESTS / name).is_file() for name in conftest.INTERPRETER_FILES)
