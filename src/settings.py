"""What each field of a config dataclass (TrainConfig, EvalConfig) accepts: its type and range or choices, declared
once with the field itself (`setting(default, accepts, help)`), checked generically by make_config /
make_eval_config, and turned into the scripts' flags (`add_flags`). Merge parameters (src/registry.py's Param) use
the same range check.

The scripts build their config before any model loads, so a bad flag fails there in one line (a BadInput: exit 2
through src.cli.run) instead of as the optimizer's traceback after the model loaded (`--lr -1`), or as a silent
fallback (`--rows 0` read every test row).
"""
import argparse
import math
import numbers
from dataclasses import MISSING, dataclass, field, fields

from .errors import BadInput


@dataclass(frozen=True)
class Setting:
    kind: type                  # int, float, bool, str, tuple (of names) or dict
    low: float | None = None    # numbers: the range, both ends included unless `open` names them
    high: float | None = None
    open: str = ""              # "low", "high" or "low,high": the ends excluded
    choices: tuple = ()         # str: the accepted values (empty: any non-empty string)
    none_ok: bool = False       # None is a value (EvalConfig.merge_params: nothing fixed)
    note: str = ""              # what a special value means ("0: no limit"), for the message

    def accepts(self) -> str:
        """What the setting accepts, in words, for the message."""
        if self.kind is str:
            text = f"one of {', '.join(self.choices)}" if self.choices else "a non-empty string"
        elif self.kind is tuple:
            text = "a non-empty list of distinct names"
        elif self.kind is dict:
            text = "a dict"
        elif self.kind is bool:
            text = "true or false"
        else:
            bounds = [f"{'>' if 'low' in self.open else '>='} {_number(self.low)}"] if self.low is not None else []
            bounds += [f"{'<' if 'high' in self.open else '<='} {_number(self.high)}"] if self.high is not None else []
            text = ("a whole number" if self.kind is int else "a finite number") + "".join(
                f"{' and' if i else ''} {b}" for i, b in enumerate(bounds))
        return text + (" or None" if self.none_ok else "") + (f" ({self.note})" if self.note else "")

    def right_type(self, value) -> bool:
        # strict: a bool is not a number here (True would pass as 1), and a float is not a count (2.5 steps)
        if self.kind is int:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if self.kind is float:
            return isinstance(value, numbers.Real) and not isinstance(value, bool)
        if self.kind is tuple:
            return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
        return isinstance(value, self.kind)

    def in_range(self, value) -> bool:
        if self.kind is str:
            return bool(value.strip()) and (not self.choices or value in self.choices)
        if self.kind is tuple:
            return len(value) > 0 and all(v.strip() for v in value) and len(set(value)) == len(value)
        if self.kind in (int, float):
            return (math.isfinite(value)
                    and (self.low is None or value > self.low or (value == self.low and "low" not in self.open))
                    and (self.high is None or value < self.high or (value == self.high and "high" not in self.open)))
        return True

    def check(self, name: str, value):
        """BadInput naming the flag, the value and what the setting accepts, if `value` is not accepted."""
        if value is None and self.none_ok:
            return
        flag = "--" + name.replace("_", "-")
        if not self.right_type(value):
            raise BadInput(f"{flag} {value!r} is a {type(value).__name__}: give {self.accepts()}")
        if not self.in_range(value):
            problem = "is out of range" if self.kind in (int, float) else "is not accepted"
            raise BadInput(f"{flag} {value!r} {problem}: give {self.accepts()}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def setting(default, accepts: Setting, help: str):
    """A config field declared once: its default, what it accepts, and the help of its flag."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default would be shared between configs: use a tuple or None")
    return field(default=default, metadata={"setting": accepts, "help": help})


def settings_of(cls) -> dict:
    """{field: Setting} of a config dataclass, from its declarations."""
    return {f.name: f.metadata["setting"] for f in fields(cls) if "setting" in f.metadata}


def add_flags(parser, cls, names: list, presets: dict):
    """One flag per named field of `cls`, generated from its declaration: the type, the choices, and a help that
    gives every preset's value (a flag overrides its preset; one not given is absent from the parsed arguments).
    A tuple setting takes comma-separated names."""
    declared = {f.name: f for f in fields(cls)}
    for name in names:
        f = declared[name]
        accepts = f.metadata["setting"]
        default = f.default if f.default is not MISSING else None
        values = ", ".join(f"{p}: {_show(preset.get(name, default))}" for p, preset in presets.items())
        parser.add_argument("--" + name.replace("_", "-"), type=str if accepts.kind is tuple else accepts.kind,
                            default=argparse.SUPPRESS, choices=accepts.choices or None,   # absent: the preset's
                            help=f"{f.metadata['help']} ({values})".replace("%", "%%"))


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)


def check_config(config, settings: dict | None = None):
    """`config` (a dataclass instance) once every field passed its Setting (declared with the field, or in
    `settings`). A field without one is a bug of the code, not of the input (TypeError): every field must say what
    it accepts."""
    settings = settings_of(type(config)) if settings is None else settings
    undeclared = [f.name for f in fields(config) if f.name not in settings]
    if undeclared:
        raise TypeError(f"{type(config).__name__} field(s) {', '.join(undeclared)} have no Setting: declare them")
    for f in fields(config):
        settings[f.name].check(f.name, getattr(config, f.name))
    return config


DATA = Setting(str, choices=("local", "hub"))   # src.data.load_split's sources
# torch's generators take any 64-bit seed, but training derives seed * 1000 + epoch from it: the usual 32-bit range
SEED = Setting(int, low=0, high=2 ** 32 - 1)
