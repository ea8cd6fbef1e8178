"""
flags.py: a configuration is a dataclass, and its command-line flags are its fields.

Harness, not part of the paper. Each field is declared once with `flag(default, help, ...)`;
`add_flags` turns the fields into argparse flags of the same names (`seq_len` -> `--seq-len`)
and appends the default to the help, so a default is written in exactly one place. Number
types refuse nan, inf and negatives with one line (`count` and `positive` zero too), and
`number(..., highest=)` values beyond what a run can use. `fits` checks a value read back
from a file (a saved run's flags) against its field's type.
"""
import argparse
import math
import typing
from dataclasses import MISSING, field, fields


def flag(default=None, help: str = "", setting: bool = True, **argparse_options):
    """A dataclass field that is also a flag; argparse_options go to add_argument (type,
    choices, nargs, metavar). setting=False marks a flag that does not change a result (where
    a cache lives, which cells to run): a rerun or a resumed run may change it."""
    kind = {"default_factory": lambda: list(default)} if isinstance(default, list) else \
        {"default": default}
    return field(**kind, metadata={"help": help, "setting": setting, **argparse_options})


def setting_names(config_class) -> tuple[str, ...]:
    """config_class's flags that change a result (setting=True), in their order."""
    return tuple(f.name for f in fields(config_class) if f.init and f.metadata.get("setting", True))


def settings_of(config_class, cfg) -> dict:
    """The values of config_class's flags that change a result."""
    return {name: getattr(cfg, name) for name in setting_names(config_class)}


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def add_flags(parser, config_class) -> None:
    """One flag per field of config_class (fields declared with init=False are not flags)."""
    for f in fields(config_class):
        if not f.init:
            continue
        options = dict(f.metadata)
        options.pop("setting", None)
        help_text, default = options.pop("help", ""), default_of(f)
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):  # switches: --x, or --x / --no-x when on by default
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(name, action=action, default=default, help=help_text)
            continue
        if default is not None and default != []:
            if isinstance(default, list):
                shown = " ".join(map(str, default))
            elif isinstance(default, str) and default.strip() != default:
                shown = repr(default)  # spaces at an end would be invisible
            else:
                shown = default
            # "... (paper: 65536)" becomes "... (paper: 65536; default: 2048)"
            help_text = help_text[:-1] + f"; default: {shown})" if help_text.endswith(")") \
                else help_text + f" (default: {shown})"
        # argparse reads % as a format character in help text
        parser.add_argument(name, default=default, help=help_text.replace("%", "%%"), **options)


def from_args(config_class, args: argparse.Namespace):
    """The dataclass holding the parsed flags (fields that are not flags keep their defaults)."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)
                           if f.init and hasattr(args, f.name)})


def number(kind, lowest: float, inclusive: bool, highest: float | None = None):
    """An argparse type: a finite number above `lowest` (or at least it, if inclusive), and
    at most `highest` if given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or value < lowest or (value == lowest and not inclusive) \
                or (highest is not None and value > highest):
            upper = "" if highest is None else f" and at most {highest:g}"
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'above'} {lowest:g}{upper}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def fits(value, annotation) -> bool:
    """Whether `value` (from JSON) is of a field's type: `int`, `float | None`, ... An int is
    a float too, but true is not a number."""
    kinds = typing.get_args(annotation) or (annotation,)
    return any(value is None if k is type(None) else
               type(value) in (int, float) if k is float else type(value) is k for k in kinds)


def finite_number(value) -> bool:
    """A number read from JSON that a computation can use: not true, not NaN or infinite."""
    return fits(value, float) and math.isfinite(value)


def utf8_path(text: str) -> str:
    """An argparse type: a path whose bytes are UTF-8. Python keeps other bytes as lone
    surrogates, and safetensors cannot open such a path: a checkpoint written there would
    never load."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8, which safetensors cannot "
                                         f"open; pass another path") from None
    return text


count = number(int, 0, inclusive=False)  # 1, 2, 3, ...
count0 = number(int, 0, inclusive=True)  # 0, 1, 2, ...
positive = number(float, 0, inclusive=False)  # a finite number above 0
positive0 = number(float, 0, inclusive=True)  # a finite number, at least 0
