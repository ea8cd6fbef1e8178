"""Tests for harness/flags.py: a dataclass's fields become flags with their defaults written once,
and number flags refuse what would run wrongly."""
import argparse
from dataclasses import dataclass

import pytest

from harness.flags import add_flags, count, count0, fits, flag, from_args, number, positive, positive0


@dataclass
class Example:
    seq_len: int = flag(2048, "tokens per sequence (paper: 65536)", type=count)
    lengths: list = flag([4, 8], "lengths", type=int, nargs="+")
    rate: float | None = flag(None, "a rate (default: chosen by the run)", type=positive)
    fast: bool = flag(False, "go fast")
    guide: bool = flag(True, "with the guide sentence")
    name: str = flag("x", "a name", choices=("x", "y"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Example)
    return p


def test_every_field_is_a_flag_with_the_dataclass_default():
    cfg = from_args(Example, parser().parse_args([]))
    assert cfg == Example()
    cfg = from_args(Example, parser().parse_args(
        ["--seq-len", "16", "--lengths", "1", "2", "3", "--rate", "0.5", "--fast", "--no-guide",
         "--name", "y"]))
    assert cfg == Example(seq_len=16, lengths=[1, 2, 3], rate=0.5, fast=True, guide=False, name="y")


def test_list_defaults_are_not_shared_between_configs():
    a, b = Example(), Example()
    a.lengths.append(99)
    assert b.lengths == [4, 8]


def test_help_shows_each_default_once_inside_a_closing_parenthesis():
    text = " ".join(parser().format_help().split())
    assert "tokens per sequence (paper: 65536; default: 2048)" in text
    assert "lengths (default: 4 8)" in text
    assert "a rate (default: chosen by the run)" in text  # None: the help says it
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--no-guide" in text


def test_choices_refuse_other_values(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--name", "z"])
    assert "invalid choice: 'z'" in capsys.readouterr().err


@pytest.mark.parametrize("parse, text, ok", [
    (positive, "2e-5", True), (positive, "0", False), (positive, "nan", False),
    (positive, "inf", False), (positive0, "0", True), (positive0, "-1", False),
    (count, "3", True), (count, "0", False), (count, "-1", False), (count, "1.5", False),
    (count0, "0", True), (count0, "-2", False), (count, "abc", False),
    (number(float, 0, False, 1), "1", True), (number(float, 0, False, 1), "1.5", False),
    (number(float, 0, False, 1), "1e308", False),
])
def test_number_flags_refuse_what_would_run_wrongly(parse, text, ok):
    if ok:
        assert parse(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_an_upper_bound_is_said_in_the_message():
    with pytest.raises(argparse.ArgumentTypeError, match="must be above 0 and at most 1, got 2"):
        number(float, 0, False, 1)("2")


@pytest.mark.parametrize("value, annotation, ok", [
    (512, int, True), ("512", int, False), (True, int, False), (512.0, int, False),
    (None, int | None, True), (None, int, False), (2, float, True), (True, float, False),
    (2e-5, float | None, True), ("2e-5", float | None, False), (False, bool, True),
    (0, bool, False), ("eod", str, True), (3, str, False),
])
def test_fits_tells_a_saved_value_of_the_wrong_type(value, annotation, ok):
    """Values read back from JSON: a count must not be a string nor true, a rate may be 2."""
    assert fits(value, annotation) is ok
