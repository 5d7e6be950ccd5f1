"""The settings of a merge, declared once.

Each setting is one :class:`Option`: its name, default, help, the check that validates it, and
how the command line and config files spell it. From :data:`MERGE` come the options of
``ctm merge`` and ``ctm plan``, the keys a config file may hold (:meth:`Options.schema`) and how
they are read, the keyword arguments of :func:`ctm_kernels.merge`, :func:`ctm_kernels.plan_merge`
and :func:`~ctm_kernels.integrations.peft.add_merged_adapter` and their validation
(:meth:`Options.validate`, once, where a merge is asked for), and the resolved config every
output carries (:meth:`Options.dump`). Inside, a merge carries the typed :class:`Settings`.

A merge rule's parameters (``top_k``, ``p``, ``seed``, ``normalize``) are declared here too, as
:class:`RuleParameter` entries that :mod:`ctm_kernels.rules` attaches to its rules; which rule
takes which, and their check against it, stay with the rules.

Imports no torch, so that ``ctm --help`` answers at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

# merge rules and dtypes by name (tests check them against ctm_kernels.RULES and the pipeline)
METHODS = ("sum", "mean", "ties", "dare", "dare_ties", "tsv", "iso_c", "iso_cts")
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64", "fp64")
STOP_TESTS = ("energy", "subspace")
FORMAT_NAMES = ("peft", "kohya")
FULL_RANK = "full"
MiB = 2**20
DEFAULT_KOHYA_PREFIX = "lora_unet"
# Input factor bytes per module group. The merge holds about 7x a group's bytes at its peak
# for bf16 factors on CPU (the group being read, the group being merged, the engine's stacked
# copy of it and its float64 working copies), so 256 MiB keeps whole-model merges near 2 GiB.
DEFAULT_GROUP_BYTES = 256 * MiB


class SettingError(ValueError):
    """A bad value of the setting ``name``."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def suggest(word: str, choices) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` (case aside: ``TIES`` is ``ties``), or ''."""
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f" (did you mean {lowered[word.lower()]}?)"
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]}?)" if close else ""


# -- checks: a value in, the value as the merge uses it out, ValueError for a bad one ---------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rank(rank) -> int | str:
    if rank == FULL_RANK:
        return rank
    if isinstance(rank, str) and rank.strip().isdigit():
        rank = int(rank)
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"rank must be a positive integer or {FULL_RANK!r}, got {rank!r}")
    return rank


def _check_method(method) -> str:
    if not isinstance(method, str) or method not in METHODS:
        hint = suggest(method, METHODS) if isinstance(method, str) else ""
        raise ValueError(f"unknown merge method {method!r}{hint}; choose one of {', '.join(METHODS)}")
    return method


def _check_weights(weights) -> list[float] | None:
    if weights is None:
        return None
    vals = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"weights must be finite, got {v}")
    return vals


def _check_float(name: str, test: Callable[[float], bool], wanted: str) -> Callable:
    """A check that the value, as a float, passes ``test``; the value is kept as given (so a
    resolved config records it as it was written)."""
    def check(v):
        try:
            ok = test(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be {wanted}, got {v!r}")
        return v
    return check


_check_beta = _check_float("beta", lambda b: 0.0 <= b <= 1.0, "in [0, 1]")
_check_scale = _check_float("scale", math.isfinite, "finite")


def check_stop(stop) -> str:
    if stop not in STOP_TESTS:
        raise ValueError(f"stop must be one of {', '.join(STOP_TESTS)}, got {stop!r}")
    return stop


def check_tol(tol) -> float | None:
    if tol is not None and not (_is_number(tol) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    return tol


def _check_int(name: str, least: int, kind: str) -> Callable:
    def check(v):
        if not _is_int(v) or v < least:
            raise ValueError(f"{name} must be a {kind} integer, got {v!r}")
        return v
    return check


# the stop settings' checks, shared with the engine's own boundary (engine.check_solver)
check_max_iter = _check_int("max_iter", 0, "non-negative")


def _check_auto(what: str, names: tuple[str, ...]) -> Callable:
    """A name among ``names`` (a torch dtype is known by its name: ``torch.float32`` is
    ``float32``); None and ``auto``: chosen by the merge."""
    def check(v):
        if v is None or v == "auto":
            return None
        name = v if isinstance(v, str) else str(v).removeprefix("torch.")
        if name not in names:
            raise ValueError(f"unknown {what} {v!r}; choose one of auto, {', '.join(names)}")
        return name
    return check


def _check_str(name: str) -> Callable:
    def check(v):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        return v
    return check


def _check_bool(name: str) -> Callable:
    def check(v):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
        return v
    return check


def _check_threads(threads) -> int | None:
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"threads must be a positive integer (or None for the default), got {threads!r}")
    return threads


def _check_output(output):
    if output is not None and not isinstance(output, (str, bytes)) and not hasattr(output, "__fspath__"):
        raise ValueError(f"output must be a path, got {type(output).__name__}")
    return output


# -- command-line text -> value --------------------------------------------------------------


def _parse_rank(text: str):
    if text == FULL_RANK:
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a positive integer or 'full', got {text!r}") from None


def _parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


# -- the model -------------------------------------------------------------------------------


REQUIRED = object()           # the default of a setting that must be given


def _always(settings) -> bool:
    """Every resolved config records the setting (an :class:`Option`'s default ``saved``)."""
    return True


@dataclass(frozen=True)
class Option:
    """One merge setting.

    ``check`` takes a given value and returns it as the merge uses it (raising ``ValueError``
    for a bad one). ``flag``: its command-line spelling (None: not on the command line), read
    by ``parse`` (argparse's ``type``); a bool is a switch. ``key``: its key in config files
    (None: not in them; a rule parameter's key is under ``parameters:``). ``unit``: command-line
    and config values are in units of this many (``--max-group-mb``: MiB). ``shown``: the default
    as the help shows it. ``saved``: when it goes into the resolved config of an output (default:
    always; None: never)."""

    name: str
    default: Any
    help: str
    type: Any = Any
    check: Callable[[Any], Any] | None = None
    flag: str | tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple | None = None
    shown: str | None = None
    key: str | None = None
    unit: int = 1
    saved: Callable[["Settings"], bool] | None = _always

    @property
    def flags(self) -> tuple[str, ...]:
        return () if self.flag is None else (self.flag,) if isinstance(self.flag, str) else self.flag

    def validate(self, value):
        try:
            return value if self.check is None else self.check(value)
        except SettingError:
            raise
        except (TypeError, ValueError) as e:
            raise SettingError(self.name, str(e)) from None


@dataclass(frozen=True)
class RuleParameter:
    """A merge rule's parameter: ``check(value)`` says whether a value is one (the rules check
    it against the rule that takes it); ``flag`` its command-line spelling, ``rules`` the rules
    that take it (for the help)."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    meaning: str
    flag: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    rules: str = ""


TOP_K = RuleParameter("top_k", 0.2, lambda v: 0.0 < float(v) <= 1.0, "share of entries each task keeps, in (0, 1]",
                      "--top-k", "F", float, "ties/dare_ties")
P = RuleParameter("p", 0.5, lambda v: 0.0 <= float(v) < 1.0, "drop probability, in [0, 1)", "--p", "F", float,
                  "dare/dare_ties")
NORMALIZE = RuleParameter("normalize", True, lambda v: isinstance(v, bool),
                          "True: each entry is the mean of the kept values that agree with its elected sign; "
                          "False: their sum (mergekit's dare_ties)", "--normalize", rules="dare_ties")
SEED = RuleParameter("seed", 0, lambda v: _is_int(v) and v >= 0, "seed of the drop masks (non-negative integer)",
                     "--seed", "N", int, "dare/dare_ties")


class Settings:
    """Validated merge settings (one typed field per :class:`Option`, and ``params``: the merge
    rule's parameters); made by :meth:`Options.validate`."""


class Options:
    """The declared merge settings and everything derived from them."""

    def __init__(self, options: list[Option], rule_parameters: list[RuleParameter]):
        self.options = list(options)
        self.rule_parameters = list(rule_parameters)
        self.by_name = {o.name: o for o in self.options}
        self.by_key = {o.key: o for o in self.options if o.key is not None}
        fields = [(o.name, o.type, field(default=None if o.default is REQUIRED else o.default)) for o in self.options]
        fields.append(("params", dict, field(default_factory=dict)))
        self.settings_type = dataclasses.make_dataclass("Settings", fields, bases=(Settings,), frozen=True)

    # -- the Python API ---------------------------------------------------------------------

    def validate(self, given: dict, problem: Callable[[SettingError], None] | None = None) -> Settings:
        """``given`` keyword arguments as :class:`Settings`. A bad value raises
        :class:`SettingError`, or with ``problem`` is handed to it (``problem(error)``) and its
        default used. Keywords that are no option are the rule's parameters (``params``,
        checked against the rule by :func:`ctm_kernels.rules.resolve_params`)."""
        values, params = {}, {}
        for o in self.options:
            if o.name not in given:
                if o.default is REQUIRED:
                    raise TypeError(f"missing required keyword argument {o.name!r}")
                values[o.name] = o.default
                continue
            try:
                values[o.name] = o.validate(given[o.name])
            except SettingError as e:
                if problem is None:
                    raise
                problem(e)
                values[o.name] = o.default if o.default is not REQUIRED else None
        for k, v in given.items():
            if k not in self.by_name:
                params[k] = v
        return self.settings_type(**values, params=params)

    def signature(self, head: list[inspect.Parameter], tail: list[inspect.Parameter] = (),
                  exclude: tuple[str, ...] = ()) -> inspect.Signature:
        """The signature of a function taking these settings as keyword arguments (but those in
        ``exclude``): ``head`` before them, ``tail`` after, the rules' parameters as ``**rule_params``."""
        kw = inspect.Parameter.KEYWORD_ONLY
        params = [*head]
        params += [inspect.Parameter(o.name, kw, default=inspect.Parameter.empty if o.default is REQUIRED else o.default,
                                     annotation=o.type) for o in self.options if o.name not in exclude]
        params += [*tail, inspect.Parameter("rule_params", inspect.Parameter.VAR_KEYWORD)]
        return inspect.Signature(params)

    # -- config files -------------------------------------------------------------------------

    def schema(self) -> dict:
        """What a merge config file may hold, as JSON Schema: every setting by its key, the
        rules' parameters under ``parameters``, the adapters."""
        def prop(help: str, default) -> dict:
            return {"description": help, **({} if default in (None, REQUIRED) else {"default": default})}

        adapter = {"oneOf": [{"type": "string"}, {"type": "object", "additionalProperties": False, "properties": {
            "adapter": {"type": "string", "description": "a path (relative to the config file) or a Hub id"},
            "model": {"type": "string", "description": "mergekit's name for adapter"},
            "weight": {"type": "number", "default": 1.0},
            "parameters": {"type": "object", "description": "weight, and rule parameters given for every adapter"}}}]}
        props = {
            "adapters": {"type": "array", "items": adapter, "description": "the adapters to merge, with weights"},
            "models": {"type": "array", "items": adapter, "description": "mergekit's name for adapters"},
            "parameters": {"type": "object", "additionalProperties": False, "description": "the merge rule's parameters",
                           "properties": {p.name: prop(f"{p.rules}: {p.meaning}", p.default)
                                          for p in self.rule_parameters}},
            "base_model": {"description": "ignored (mergekit's base model; a LoRA merge needs none)"},
            "ctm_version": {"description": "the version that wrote a resolved config"},
        }
        for o in self.options:
            if o.key is not None:
                default = o.default if o.default is REQUIRED or o.unit == 1 else o.default // o.unit
                props[o.key] = prop(o.help, default)
        props["merge_method"] = {**props["method"], "description": "mergekit's name for method"}
        return {"type": "object", "additionalProperties": False, "required": ["rank"], "properties": props}

    def from_config(self, data: dict) -> dict:
        """The settings a config file's mapping gives, as keyword arguments (``adapters``,
        ``parameters`` and ``merge_method`` are the caller's)."""
        out = {}
        for key, value in data.items():
            o = self.by_key.get(key)
            if o is None or key == "output":
                continue
            out[o.name] = value * o.unit if o.unit != 1 and _is_int(value) else value
        return out

    def dump(self, settings: Settings) -> dict:
        """The settings an output records (its resolved config), in declaration order, the rule's
        parameters (sorted) after the rank."""
        data = {}
        for o in self.options:
            if o.saved is not None and o.saved(settings):
                data["merge_method" if o.name == "method" else o.key] = getattr(settings, o.name)
            if o.name == "rank":
                data["parameters"] = {k: v for k, v in sorted(settings.params.items())}
        return data

    # -- the command line -------------------------------------------------------------------

    def add_arguments(self, parser, switch: Callable[[Any], Any], text_type: Callable) -> None:
        """Add every setting that has a flag, and the rules' parameters, to the argparse
        ``parser``: ``dest`` its name, default None (not given), the default in its help.
        ``switch(default)`` is the argparse action of a bool, ``text_type(parse)`` wraps a
        text parser as an argparse ``type``."""
        entries = [(o.name, o.flags, o.help, o.default, o.shown, o.parse, o.unit, o.metavar, o.choices, o.type)
                   for o in self.options if o.flags]
        entries += [(p.name, (p.flag,), f"{p.rules}: {p.meaning}", p.default, None, p.parse, 1, p.metavar, None,
                     type(p.default)) for p in self.rule_parameters]
        for name, flags, help, default, shown, parse, unit, metavar, choices, typ in entries:
            kw: dict = dict(dest=name, default=None, help=help)
            if shown is None and default not in (None, REQUIRED) and typ is not bool:
                shown = str(default if unit == 1 else default // unit)
            if shown is not None and "default" not in help:
                kw["help"] = f"{help} (default: {shown})"
            if typ is bool:
                kw["action"] = switch(default)
                parser.add_argument(*flags, **kw)
                continue
            if parse is not None:
                kw["type"] = text_type(parse if unit == 1 else lambda t, parse=parse, unit=unit: parse(t) * unit)
            if choices is not None:
                kw["choices"] = choices
            if metavar is not None:
                kw["metavar"] = metavar
            parser.add_argument(*flags, **kw)


def _when_kohya(s) -> bool:
    return s.format == "kohya"


MERGE = Options([
    Option("method", "ties", f"merge rule: {', '.join(METHODS)}", str, _check_method, "--method",
           _check_method, "M", key="method"),
    Option("rank", REQUIRED, "rank of the merged LoRA, capped at min(m, n) and at the sum of the input ranks per "
           "module; 'full' keeps every direction of the inputs (min(sum of input ranks, m, n))", int | str,
           check_rank, "--rank", _parse_rank, "R", key="rank"),
    Option("beta", 0.0, "0 equalises the adapters' norms in the subspace search, 1 keeps them", float, _check_beta,
           "--beta", float, "F", key="beta"),
    Option("scale", 1.0, "global scale of the merged update", float, _check_scale, "--scale", float, "F",
           key="scale"),
    Option("stop", "energy", "when the subspace search of a module ends: energy, when the energy kept (in total "
           "and per adapter) has stopped changing; subspace, when the subspaces have stopped moving (the exact "
           "fixed point, reproducible across devices)", str, check_stop, "--stop", choices=STOP_TESTS,
           key="stop"),
    Option("tol", None, "tolerance of the stop test: the energy kept's change still expected (default 1e-6), "
           "or the sine of the largest principal angle of a step (default 1e-4)", float | None, check_tol,
           "--tol", float, "F", key="tol"),
    Option("max_iter", 1000, "most subspace iterations per module", int, check_max_iter, "--max-iter", int, "N",
           key="max_iter"),
    Option("dtype", None, "factor dtype of the merge and the output; auto: the inputs' (promoted)", str | None,
           _check_auto("dtype", DTYPE_NAMES), "--dtype", choices=("auto", *DTYPE_NAMES), shown="auto", key="dtype"),
    Option("format", None, "output format; auto: kohya for OUT ending in .safetensors, else peft", str | None,
           _check_auto("format", FORMAT_NAMES), "--format", choices=("auto", *FORMAT_NAMES), shown="auto", key="format"),
    Option("threads", None, "CPU threads per process (default: the cores this process may use, less the busy "
           "ones; recorded in the output's config)", int | None, _check_threads, "--threads", int, "N",
           key="threads"),
    Option("pad_rank", False, "keep --rank on modules whose inputs span fewer directions (the extra rows are "
           "zeros; default: cap each module at the sum of its input ranks)", bool, _check_bool("pad_rank"),
           "--pad-rank", key="pad_rank", saved=lambda s: s.pad_rank),
    Option("kohya_prefix", DEFAULT_KOHYA_PREFIX, "kohya name prefix for PEFT module paths", str, _check_str("kohya_prefix"),
           "--kohya-prefix", metavar="P", key="kohya_prefix", saved=_when_kohya),
    Option("weights", None, "one weight per adapter (default: all 1)", list | None, _check_weights, "--weights",
           _parse_floats, "W1,W2,...", saved=None),
    Option("device", None, "device of the merge (default: the inputs', cpu for files)", Any, None, "--device",
           metavar="cpu|cuda", key="device", saved=None),
    Option("max_group_bytes", DEFAULT_GROUP_BYTES, "most input factor memory read at once (MiB)", int, _check_int("max_group_bytes", 1, "positive"),
           "--max-group-mb", int, "MB", key="max_group_mb", unit=MiB, saved=None),
    Option("output", None, "output: a PEFT adapter folder, or a kohya file when it ends in .safetensors", Any,
           _check_output, ("-o", "--output"), metavar="OUT", key="output", saved=None),
    Option("overwrite", False, "replace OUT if it is a previous ctm output (anything else is refused)", bool,
           _check_bool("overwrite"), "--overwrite", saved=None),
], [TOP_K, P, SEED, NORMALIZE])
