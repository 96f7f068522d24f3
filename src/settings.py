"""What each field of a config dataclass (TrainConfig, EvalConfig) accepts: its type and range or choices,
declared once in a table next to the dataclass and checked generically by make_config / make_eval_config.

The scripts build their config before any model loads, so a bad flag fails there in one line (a BadInput: exit 2
through src.cli.run) instead of as the optimizer's traceback after the model loaded (`--lr -1`), or as a silent
fallback (`--rows 0` read every test row).
"""
import math
import numbers
from dataclasses import dataclass, fields

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


def check_config(config, settings: dict):
    """`config` (a dataclass instance) once every field passed its Setting in `settings`. A field without one is a
    bug of the code, not of the input (TypeError): every field must say what it accepts."""
    undeclared = [f.name for f in fields(config) if f.name not in settings]
    if undeclared:
        raise TypeError(f"{type(config).__name__} field(s) {', '.join(undeclared)} have no Setting: declare them")
    for f in fields(config):
        settings[f.name].check(f.name, getattr(config, f.name))
    return config


DATA = Setting(str, choices=("local", "hub"))   # src.data.load_split's sources
# torch's generators take any 64-bit seed, but training derives seed * 1000 + epoch from it: the usual 32-bit range
SEED = Setting(int, low=0, high=2 ** 32 - 1)
