"""Each script's options, as in nanoGPT: a block of named defaults, overridden first by config files
(`python train.py config/cpu.py`) and then by `--name=value`.

An Option holds its default, the values it accepts and whether `--resume` may change it, so that adding a setting
is one line in a block. Every mistake is a DataError of one line, raised before any data is read.
"""
import ast
import os
from types import SimpleNamespace

from utils import DataError


class Option:
    """A setting: its default; its types (those of the default unless `kind` says, as for a None default), with None
    accepted where the default is None or nullable=True; an optional range (at_least, above, below, at_most) or set of
    choices; and resumable=True where --resume may change it because it cannot change what is learnt."""

    def __init__(self, default, kind=None, at_least=None, above=None, below=None, at_most=None, choices=None,
                 resumable=False, nullable=False):
        self.default, self.resumable, self.choices = default, resumable, choices
        self.nullable = nullable or default is None  # None accepted: "not set"
        self.kind = kind if isinstance(kind, tuple) else (kind,) if kind else (type(default),)
        self.at_least, self.above, self.below, self.at_most = at_least, above, below, at_most

    def accepted(self):
        """The range or choices in words, or None."""
        if self.choices:
            return " or ".join(map(str, self.choices))
        words = [f"at least {self.at_least}" if self.at_least is not None else None,
                 "positive" if self.above == 0 else f"above {self.above}" if self.above is not None else None,
                 f"below {self.below}" if self.below is not None else None,
                 f"at most {self.at_most}" if self.at_most is not None else None]
        words = [w for w in words if w]
        return " and ".join(words) if words else None

    def check(self, name, value, text=None):
        """value, converted where an int stands for a float; raises DataError if its type or range is wrong."""
        if float in self.kind and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is None and not self.nullable or value is not None and not (
                isinstance(value, self.kind) and (bool in self.kind or not isinstance(value, bool))):
            want = "/".join(t.__name__ for t in self.kind)
            raise DataError(f"--{name}={value if text is None else text}: expected {want}, got {type(value).__name__}")
        if value is not None and not self.in_range(value):
            raise DataError(f"--{name}={value} must be {self.accepted()}")
        return value

    def in_range(self, v):
        if self.choices:
            return v in self.choices
        return ((self.at_least is None or v >= self.at_least) and (self.above is None or v > self.above)
                and (self.below is None or v < self.below) and (self.at_most is None or v <= self.at_most))


def parse(block, argv):
    """The block's defaults, then each config file (a .py of plain assignments), then each --name=value, in the
    order given -> a namespace with one attribute per option. A bool option given as a bare --name means True."""
    values = {k: o.default for k, o in block.items()}
    for arg in argv:
        if arg.startswith("--"):
            name, eq, text = arg[2:].partition("=")
            known(block, name, arg)
            value = literal(text) if eq else True
            values[name] = block[name].check(name, value, text if eq else None)
        elif arg.endswith(".py"):
            for name, value in read_config(arg).items():
                known(block, name, f"{arg}: {name}")
                values[name] = block[name].check(name, value)
        else:
            raise DataError(f"unexpected argument {arg!r}; use a config file (config/NAME.py) or --name=value")
    return SimpleNamespace(**values)


def known(block, name, where):
    if name not in block:
        raise DataError(f"unknown option --{name} ({where}); known: {', '.join(sorted(block))}")


def literal(text):
    """A Python literal (number, bool, None, quoted string), else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_config(path):
    """A config file's settings: the names it assigns, with their values."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: config file not found")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), {}, scope)
    except Exception as e:
        raise DataError(f"{path}: not a config file of plain assignments ({type(e).__name__}: {e})") from None
    return {k: v for k, v in scope.items() if not k.startswith("_")}
