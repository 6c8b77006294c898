"""Freeze plans: *what* to freeze, said in terms of structure, so one plan fits the meta
skeleton and the loaded model alike.

A :class:`FreezePlan` is a union of rules (first N blocks, last N, all but the last N,
embeddings, regex, explicit names, LP-LoRA style, everything). ``plan.resolve(model)`` turns it
into the exact set of parameter names it freezes on that model; ``layerscope.apply`` sets the
flags. A tensor shared by several names (tied weights) is frozen as a whole: when a rule picks
one alias, every alias is frozen and the resolution says so in its warnings.
"""

from __future__ import annotations

import difflib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from layerscope.errors import PlanError
from layerscope.fingerprint import ModelFingerprint
from layerscope.scan import ModelScan, scan

PLAN_FORMAT = 1


def _strings(values: object, what: str) -> str | tuple[object, ...]:
    """A str as is, any other iterable as a tuple (its items are checked by the rule)."""
    if isinstance(values, str):
        return values
    if isinstance(values, (bytes, dict)) or not hasattr(values, "__iter__"):
        raise PlanError(f"{what}: expected a str or a list of str, got {values!r}"[:300])
    return tuple(values)


def _check_n(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise PlanError(f"{what}: n must be an int, got {n!r}")
    if n < 0:
        raise PlanError(f"{what}: n={n} is negative; allowed: 0..number of layers")
    return n


def _check_layers(n: int, s: ModelScan, what: str) -> int:
    layers = s.layers
    if n > len(layers):
        raise PlanError(
            f"{what}: n={n} but the model has {len(layers)} layers ({layers.path}); "
            f"allowed: 0..{len(layers)}"
        )
    return len(layers)


def _blocks(s: ModelScan, indices: range) -> set[str]:
    return {name for i in indices for name in s.block_names(i)}


def _tensors(s: ModelScan, names: Iterable[str]) -> set[int]:
    return {s.by_name[n].tensor for n in names}


@dataclass(frozen=True)
class Rule(ABC):
    """One selection of parameters to freeze. Subclasses say which."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        """Names this rule freezes on ``s`` and the warnings it has."""

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()}
        for k, v in data.items():
            if isinstance(v, tuple):
                data[k] = list(v)
        return {"kind": self.kind, **data}

    def __str__(self) -> str:
        return self.kind


@dataclass(frozen=True)
class All(Rule):
    kind: ClassVar[str] = "all"

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        return {p.name for p in s.params}, []


@dataclass(frozen=True)
class First(Rule):
    """Blocks ``0 .. n-1`` of the main stack."""

    n: int
    kind: ClassVar[str] = "first"

    def __post_init__(self) -> None:
        _check_n(self.n, "first")

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        _check_layers(self.n, s, "first")
        return _blocks(s, range(self.n)), []

    def __str__(self) -> str:
        return f"first:{self.n}"


@dataclass(frozen=True)
class Last(Rule):
    """Blocks ``L-n .. L-1`` of the main stack."""

    n: int
    kind: ClassVar[str] = "last"

    def __post_init__(self) -> None:
        _check_n(self.n, "last")

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        total = _check_layers(self.n, s, "last")
        return _blocks(s, range(total - self.n, total)), []

    def __str__(self) -> str:
        return f"last:{self.n}"


@dataclass(frozen=True)
class ExceptLast(Rule):
    """Everything except the last ``n`` blocks and the head side (final norm, output head),
    and except the embeddings when ``keep_embeddings`` is set.

    A tensor the head shares with the embeddings stays trainable (with a warning).
    """

    n: int
    keep_embeddings: bool = False
    kind: ClassVar[str] = "except-last"

    def __post_init__(self) -> None:
        _check_n(self.n, "except-last")
        if not isinstance(self.keep_embeddings, bool):
            raise PlanError(f"except-last: keep_embeddings must be a bool, got {self.keep_embeddings!r}")

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        total = _check_layers(self.n, s, "except-last")
        keep = _blocks(s, range(total - self.n, total)) | set(s.head_names)
        if self.keep_embeddings:
            keep |= s.embedding_names
        kept = _tensors(s, keep)
        chosen = {p.name for p in s.params if p.tensor not in kept}
        warnings = [
            f"{self}: {', '.join(g)} share one tensor with the head; it stays trainable"
            for g in s.tie_groups
            if s.by_name[g[0]].tensor in _tensors(s, s.head_names)
            and any(s.role(n) == "embedding" for n in g)
            and not self.keep_embeddings
        ]
        return chosen, warnings

    def __str__(self) -> str:
        return f"except-last:{self.n}" + (":keep-embeddings" if self.keep_embeddings else "")


@dataclass(frozen=True)
class Embeddings(Rule):
    """The input embeddings outside the blocks (token, position, token-type).

    When the output head is tied to them, the shared tensor is frozen too (with a warning),
    unless ``keep_tied_head`` is set: then it stays trainable (with a warning).
    """

    keep_tied_head: bool = False
    kind: ClassVar[str] = "embeddings"

    def __post_init__(self) -> None:
        if not isinstance(self.keep_tied_head, bool):
            raise PlanError(f"embeddings: keep_tied_head must be a bool, got {self.keep_tied_head!r}")

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        chosen = set(s.embedding_names)
        head_tensors = _tensors(s, s.head_names)
        tied = [g for g in s.tie_groups if s.by_name[g[0]].tensor in head_tensors & _tensors(s, chosen)]
        warnings = []
        for group in tied:
            if self.keep_tied_head:
                chosen -= set(group)
                warnings.append(
                    f"embeddings: {', '.join(group)} is tied to the output head; it stays trainable"
                )
            else:
                warnings.append(
                    f"embeddings: the output head is tied to the embeddings ({', '.join(group)}); "
                    "freezing the embeddings freezes the head too"
                )
        return chosen, warnings

    def __str__(self) -> str:
        return "embeddings" + (":keep-tied-head" if self.keep_tied_head else "")


@dataclass(frozen=True)
class Regex(Rule):
    """Every parameter name in which one of ``patterns`` is found (``re.search``)."""

    patterns: tuple[str, ...]
    case_sensitive: bool = True
    kind: ClassVar[str] = "regex"

    def __post_init__(self) -> None:
        patterns = (self.patterns,) if isinstance(self.patterns, str) else self.patterns
        if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
            raise PlanError(f"regex: patterns must be a str or a list of str, got {self.patterns!r}")
        if not patterns:
            raise PlanError("regex: the list of patterns is empty")
        if not isinstance(self.case_sensitive, bool):
            raise PlanError(f"regex: case_sensitive must be a bool, got {self.case_sensitive!r}")
        for p in patterns:
            if not p:
                raise PlanError(
                    "regex: an empty pattern matches every parameter name; to freeze everything "
                    "say so (FreezePlan.all(), freeze_model)"
                )
            try:
                re.compile(p)
            except (re.error, RecursionError, OverflowError) as exc:
                raise PlanError(f"regex: invalid regular expression {p[:100]!r}: {exc}") from None
        object.__setattr__(self, "patterns", tuple(patterns))

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        chosen: set[str] = set()
        unmatched = []
        for pattern in self.patterns:
            rx = re.compile(pattern, flags)
            hits = {p.name for p in s.params if rx.search(p.name)}
            if not hits:
                unmatched.append(pattern)
            chosen |= hits
        if not chosen:
            sample = ", ".join(p.name for p in s.params[:6]) or "(the model has no parameters)"
            raise PlanError(
                f"regex: no parameter name matches {list(self.patterns)} "
                f"(case_sensitive={self.case_sensitive}); names look like: {sample}"
            )
        return chosen, [f"regex: pattern {p!r} matches no parameter" for p in unmatched]

    def __str__(self) -> str:
        key = "regex" if self.case_sensitive else "iregex"
        return "+".join(f"{key}:{p}" for p in self.patterns)


@dataclass(frozen=True)
class Names(Rule):
    """Exactly these parameter names."""

    names: tuple[str, ...]
    kind: ClassVar[str] = "names"

    def __post_init__(self) -> None:
        names = (self.names,) if isinstance(self.names, str) else self.names
        if not isinstance(names, (tuple, list, frozenset, set)) or not all(
            isinstance(n, str) for n in names
        ):
            raise PlanError(f"names: expected a list of parameter names, got {self.names!r}")
        object.__setattr__(self, "names", tuple(sorted(names)))

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        missing = [n for n in self.names if n not in s.by_name]
        if missing:
            close = difflib.get_close_matches(missing[0], list(s.by_name), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PlanError(
                f"names: {len(missing)} name(s) not in this model ({s.model_type}), "
                f"e.g. {missing[0]!r}{hint}"
            )
        return set(self.names), []

    def __str__(self) -> str:
        return "names:" + ",".join(self.names)


@dataclass(frozen=True)
class LpLora(Rule):
    """LP-LoRA style: blocks ``0 .. int(L * ratio) - 1`` and, optionally, the embeddings."""

    ratio: float = 0.5
    freeze_embed: bool = True
    kind: ClassVar[str] = "lp-lora"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise PlanError(f"lp-lora: freeze_ratio must be a number, got {self.ratio!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise PlanError(f"lp-lora: freeze_ratio={self.ratio} is outside the allowed [0, 1]")
        if not isinstance(self.freeze_embed, bool):
            raise PlanError(f"lp-lora: freeze_embed must be a bool, got {self.freeze_embed!r}")
        object.__setattr__(self, "ratio", float(self.ratio))

    def select(self, s: ModelScan) -> tuple[set[str], list[str]]:
        chosen = _blocks(s, range(int(s.num_layers * self.ratio)))
        if not self.freeze_embed:
            return chosen, []
        emb, warnings = Embeddings().select(s)
        return chosen | emb, warnings

    def __str__(self) -> str:
        return f"lp-lora:{self.ratio!r}" + ("" if self.freeze_embed else ":keep-embeddings")


RULES: dict[str, type[Rule]] = {
    r.kind: r for r in (All, First, Last, ExceptLast, Embeddings, Regex, Names, LpLora)
}


@dataclass(frozen=True)
class Resolution:
    """What a plan freezes on one model: exact names (every alias of a tied tensor)."""

    frozen: frozenset[str]
    trainable: frozenset[str]
    frozen_params: int
    trainable_params: int
    warnings: tuple[str, ...]
    plan: FreezePlan | None = field(default=None, compare=False)
    """The plan as resolved, recording the model's fingerprint (what to save with ``to_json``)."""

    @property
    def frozen_names(self) -> frozenset[str]:
        return self.frozen


@dataclass(frozen=True)
class FreezePlan:
    """An immutable union of freeze rules.

    Args:
        rules: what to freeze; everything else trains.
        num_layers: when set, the number of blocks the plan was made for; resolving it on a
            model with another count is a :class:`PlanError` (unless ``strict=False``).
        model: the fingerprint of the model the plan was resolved against
            (:meth:`bind`, :attr:`Resolution.plan`): architecture, layer count, parameter names
            and shapes. Resolving the plan on a model with another fingerprint is a
            :class:`PlanError` (unless ``strict=False``).
    """

    rules: tuple[Rule, ...] = ()
    num_layers: int | None = None
    model: ModelFingerprint | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rules, (tuple, list)) or not all(isinstance(r, Rule) for r in self.rules):
            raise PlanError(f"FreezePlan: rules must be a tuple of Rule objects, got {self.rules!r}"[:300])
        object.__setattr__(self, "rules", tuple(dict.fromkeys(self.rules)))
        if self.num_layers is not None:
            _check_n(self.num_layers, "FreezePlan num_layers")
        if self.model is not None and not isinstance(self.model, ModelFingerprint):
            raise PlanError(f"FreezePlan: model must be a ModelFingerprint or None, got {self.model!r}")
        if self.model is not None and self.num_layers != self.model.num_layers:
            raise PlanError(
                f"FreezePlan: num_layers={self.num_layers} but the model fingerprint has "
                f"{self.model.num_layers} layers"
            )

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def none(cls) -> FreezePlan:
        return cls()

    @classmethod
    def all(cls) -> FreezePlan:
        return cls((All(),))

    @classmethod
    def first(cls, n: int) -> FreezePlan:
        return cls((First(n),))

    @classmethod
    def last(cls, n: int) -> FreezePlan:
        return cls((Last(n),))

    @classmethod
    def except_last(cls, n: int) -> FreezePlan:
        return cls((ExceptLast(n),))

    @classmethod
    def embeddings(cls, keep_tied_head: bool = False) -> FreezePlan:
        return cls((Embeddings(keep_tied_head),))

    @classmethod
    def regex(cls, patterns: str | Iterable[str], case_sensitive: bool = True) -> FreezePlan:
        return cls((Regex(_strings(patterns, "regex: patterns"), case_sensitive),))  # type: ignore[arg-type]

    @classmethod
    def names(cls, names: Iterable[str]) -> FreezePlan:
        return cls((Names(_strings(names, "names")),))  # type: ignore[arg-type]

    @classmethod
    def lp_lora(cls, freeze_ratio: float = 0.5, freeze_embed: bool = True) -> FreezePlan:
        return cls((LpLora(freeze_ratio, freeze_embed),))

    # -- combining -------------------------------------------------------------------------
    def __or__(self, other: FreezePlan) -> FreezePlan:
        if not isinstance(other, FreezePlan):
            return NotImplemented
        layers = {n for n in (self.num_layers, other.num_layers) if n is not None}
        if len(layers) > 1:
            raise PlanError(f"cannot combine plans made for {sorted(layers)} layers")
        models = {m for m in (self.model, other.model) if m is not None}
        if len(models) > 1:
            a, b = models
            raise PlanError(f"cannot combine plans made for different models ({', '.join(a.differences(b))})")
        return FreezePlan(self.rules + other.rules, layers.pop() if layers else None,
                          models.pop() if models else None)

    __add__ = __or__

    def for_layers(self, num_layers: int | None) -> FreezePlan:
        """The same plan, checked against ``num_layers`` blocks when resolved."""
        return FreezePlan(self.rules, num_layers)

    def bind(self, model: nn.Module | ModelScan, *, strict: bool = True) -> FreezePlan:
        """The same plan recording ``model``'s fingerprint (checked by resolving it there)."""
        res = self.resolve(model, strict=strict)
        assert res.plan is not None
        return res.plan

    # -- resolving -------------------------------------------------------------------------
    def resolve(self, model: nn.Module | ModelScan, *, strict: bool = True) -> Resolution:
        """The exact parameter names this plan freezes on ``model``.

        Args:
            model: a model (real, meta or wrapped) or its scan.
            strict: refuse a model other than the one the plan records (fingerprint or layer
                count); ``False`` resolves the rules on any model.

        Returns:
            The resolution; its ``plan`` records ``model``'s fingerprint.

        Raises:
            PlanError: the model lacks the structure the plan needs (too few blocks, a pattern
                or name that matches nothing), or (strict) is not the model the plan was made for.
        """
        if not isinstance(strict, bool):
            raise PlanError(f"resolve: strict must be a bool, got {strict!r}")
        s = model if isinstance(model, ModelScan) else scan(model)
        found = ModelFingerprint.of(s)
        if strict and self.model is not None and found != self.model:
            raise PlanError(
                f"plan {self} was made for another model ({'; '.join(self.model.differences(found))}: "
                f"the plan's {self.model.architecture} vs this {found.architecture}); resolve it "
                "with strict=False to apply its rules anyway"
            )
        if strict and self.num_layers is not None and self.num_layers != found.num_layers:
            raise PlanError(
                f"plan {self} was made for a model with {self.num_layers} layers; this "
                f"{s.model_type} has {found.num_layers}; resolve it with strict=False to apply "
                "its rules anyway"
            )
        chosen: set[str] = set()
        warnings: list[str] = []
        for rule in self.rules:
            names, notes = rule.select(s)
            chosen |= names
            warnings += notes
        tensors = _tensors(s, chosen)
        frozen = {p.name for p in s.params if p.tensor in tensors}
        for group in s.tie_groups:
            picked = [n for n in group if n in chosen]
            if picked and len(picked) < len(group):
                others = [n for n in group if n not in chosen]
                note = f"{', '.join(picked)} is tied to {', '.join(others)}: both are frozen"
                if not any(", ".join(group) in w for w in warnings):
                    warnings.append(note)
        return Resolution(
            frozen=frozenset(frozen),
            trainable=frozenset(p.name for p in s.params) - frozen,
            frozen_params=s.numel(frozen),
            trainable_params=s.total_params - s.numel(frozen),
            warnings=tuple(dict.fromkeys(warnings)),
            plan=FreezePlan(self.rules, found.num_layers, found),
        )

    # -- text and JSON ---------------------------------------------------------------------
    def __str__(self) -> str:
        return "+".join(str(r) for r in self.rules) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layerscope_plan": PLAN_FORMAT,
            "rules": [r.to_dict() for r in self.rules],
            "num_layers": self.num_layers,
            "model": None if self.model is None else self.model.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FreezePlan:
        """Read :meth:`to_dict`'s output back (hand-edited files included).

        Raises:
            PlanError: anything but a plan document: a missing or wrong format number, rules
                that are not a list of objects with a known ``kind`` and its fields, a bad
                ``num_layers`` or ``model``.
        """
        if not isinstance(data, dict) or data.get("layerscope_plan") != PLAN_FORMAT:
            raise PlanError(
                f"not a layerscope plan (expected a JSON object with layerscope_plan={PLAN_FORMAT})"
            )
        items = data.get("rules", [])
        if not isinstance(items, list):
            raise PlanError(f"plan rules must be a list of objects, got {str(items)[:200]}")
        rules = []
        for item in items:
            if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
                raise PlanError(f"a plan rule must be an object with a kind, got {str(item)[:200]}")
            fields = dict(item)
            kind = fields.pop("kind", None)
            if not isinstance(kind, str) or kind not in RULES:
                raise PlanError(f"unknown plan rule {str(kind)[:100]!r}; known: {', '.join(sorted(RULES))}")
            try:
                rules.append(RULES[kind](**fields))
            except TypeError as exc:
                raise PlanError(f"bad fields for plan rule {kind!r}: {str(fields)[:200]}") from exc
        model = data.get("model")
        return cls(tuple(rules), data.get("num_layers"),
                   None if model is None else ModelFingerprint.from_dict(model))

    @classmethod
    def from_json(cls, text: str) -> FreezePlan:
        """Read :meth:`to_json`'s output back.

        Raises:
            PlanError: not JSON (truncated, or nested too deep to read), or not a plan.
        """
        if not isinstance(text, (str, bytes, bytearray)):
            raise PlanError(f"plan JSON must be a str, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad encodings, deep nesting
            raise PlanError(f"plan JSON is malformed: {str(exc)[:200]}") from None
        return cls.from_dict(data)

    @classmethod
    def parse(cls, text: str) -> FreezePlan:
        """Parse the command-line grammar (``str(plan)`` writes it, so it round-trips).

        ``none``, ``all``, ``lp-lora[:RATIO][:keep-embeddings]``, ``first:N``, ``last:N``,
        ``except-last:N[:keep-embeddings]``, ``embeddings[:keep-tied-head]``,
        ``regex:PATTERN`` (``iregex:`` ignores case), ``names:NAME,NAME,...`` or a path to a
        plan JSON file; ``+`` combines (``first:16+embeddings``). A ``+`` inside a regex is kept
        unless a keyword follows it; patterns in a row with the same case rule are one rule.
        """
        if not isinstance(text, str) or not text.strip():
            raise PlanError(f"empty plan {text!r}; {_GRAMMAR}")
        rules: list[Rule] = []
        for part in _SPLIT.split(text.strip()):
            for rule in _parse_one(part.strip()).rules:
                last = rules[-1] if rules else None
                if (isinstance(rule, Regex) and isinstance(last, Regex)
                        and last.case_sensitive == rule.case_sensitive):
                    rules[-1] = Regex(last.patterns + rule.patterns, rule.case_sensitive)
                else:
                    rules.append(rule)
        return cls(tuple(rules))


_GRAMMAR = (
    "allowed: none, all, lp-lora[:RATIO], first:N, last:N, except-last:N, embeddings, "
    "regex:PATTERN, iregex:PATTERN, names:NAME,... or a plan .json file, combined with +"
)
_SPLIT = re.compile(
    r"\+(?=(?:none|all|lp-lora|first:|last:|except-last:|embeddings|regex:|iregex:|names:))"
)


def _parse_int(value: str, part: str) -> int:
    if not re.fullmatch(r"\d+", value):
        raise PlanError(f"plan {part!r}: {value!r} is not a whole number; {_GRAMMAR}")
    return int(value)


def _parse_one(part: str) -> FreezePlan:
    key, _, arg = part.partition(":")
    if key == "none" and not arg:
        return FreezePlan()
    if key == "all" and not arg:
        return FreezePlan.all()
    if key == "embeddings" and arg in ("", "keep-tied-head"):
        return FreezePlan.embeddings(keep_tied_head=bool(arg))
    if key == "lp-lora":
        value, _, flag = arg.partition(":")
        if flag not in ("", "keep-embeddings"):
            raise PlanError(f"plan {part!r}: {flag!r} is not keep-embeddings; {_GRAMMAR}")
        try:
            ratio = float(value) if value else 0.5
        except ValueError:
            raise PlanError(f"plan {part!r}: {value!r} is not a ratio in [0, 1]") from None
        return FreezePlan.lp_lora(ratio, freeze_embed=not flag)
    if key in ("first", "last"):
        n = _parse_int(arg, part)
        return FreezePlan.first(n) if key == "first" else FreezePlan.last(n)
    if key == "except-last":
        value, _, flag = arg.partition(":")
        if flag not in ("", "keep-embeddings"):
            raise PlanError(f"plan {part!r}: {flag!r} is not keep-embeddings; {_GRAMMAR}")
        return FreezePlan((ExceptLast(_parse_int(value, part), keep_embeddings=bool(flag)),))
    if key in ("regex", "iregex") and arg:
        return FreezePlan.regex(arg, case_sensitive=key == "regex")
    if key == "names" and arg:
        return FreezePlan.names(arg.split(","))
    if part.endswith(".json"):
        try:
            return FreezePlan.from_json(Path(part).read_text())
        except OSError as exc:
            raise PlanError(f"cannot read plan file {part!r}: {exc.strerror}") from exc
    raise PlanError(f"unknown plan {part!r}; {_GRAMMAR}")


@dataclass(frozen=True)
class GradualSchedule:
    """Gradual unfreezing (ULMFiT style), epoch by epoch, as freeze plans.

    Epoch 0 trains only the head side; at epoch ``e`` the top ``L * e // (total_epochs - 1)``
    blocks train, so all blocks train by the last epoch and none refreezes. The embeddings stay
    frozen unless ``freeze_embeddings`` is False or ``epoch >= unfreeze_embeddings_at``; a head
    tied to them trains with the head side. Everything else (e.g. a vision tower) stays frozen
    until the last epoch.

    Raises:
        PlanError: ``num_layers < 1``, ``total_epochs < 2``, or a bad ``unfreeze_embeddings_at``.
    """

    num_layers: int
    total_epochs: int
    unfreeze_embeddings_at: int | None = None
    freeze_embeddings: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise PlanError(f"gradual unfreezing needs a block stack; num_layers={self.num_layers!r}")
        if (isinstance(self.total_epochs, bool) or not isinstance(self.total_epochs, int)
                or self.total_epochs < 2):
            raise PlanError(
                f"GradualUnfreezer: total_epochs must be an int >= 2 (epoch 0 trains the head "
                f"only, the last epoch everything), got {self.total_epochs!r}"
            )
        at = self.unfreeze_embeddings_at
        if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise PlanError(
                f"GradualUnfreezer: unfreeze_embeddings_at must be None or an int >= 0, got {at!r}"
            )
        if not isinstance(self.freeze_embeddings, bool):
            raise PlanError(
                f"GradualUnfreezer: freeze_embeddings must be a bool, got {self.freeze_embeddings!r}"
            )

    def check_epoch(self, epoch: object) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise PlanError(f"GradualUnfreezer: epoch must be an int >= 0, got {epoch!r}")
        return epoch

    def trainable_blocks(self, epoch: int) -> int:
        """How many of the top blocks train at ``epoch``."""
        self.check_epoch(epoch)
        last = self.total_epochs - 1
        return self.num_layers if epoch >= last else self.num_layers * epoch // last

    def plan(self, epoch: int) -> FreezePlan:
        """The freeze plan of ``epoch``."""
        k = self.trainable_blocks(epoch)
        embeddings_frozen = self.freeze_embeddings and (
            self.unfreeze_embeddings_at is None or epoch < self.unfreeze_embeddings_at
        )
        if k < self.num_layers:
            rule: Rule = ExceptLast(k, keep_embeddings=not embeddings_frozen)
            return FreezePlan((rule,), self.num_layers)
        if embeddings_frozen:
            return FreezePlan((Embeddings(keep_tied_head=True),), self.num_layers)
        return FreezePlan((), self.num_layers)
