"""The building blocks of every recipe section (engine, models, data, eval): pydantic models that refuse unknown
keys and non-finite numbers, number types as loose as YAML needs and no looser, and the translation of
pydantic's errors into the 'key: expected ..., got ...' lines users read.

Kept free of imports from the rest of mff_ds (and of torch) so that every package can build its section on it.
"""
from typing import Annotated, List, Optional, Tuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, ValidationError
from pydantic_core import PydanticCustomError, PydanticKnownError


class Section(BaseModel):
    """A recipe section: an unknown key is a typo, inf / nan is never a setting."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def to_dict(self) -> dict:
        return self.model_dump()


def _integral(v):
    # YAML reads 4.096e3 as a float; a whole float is the integer it spells (a bool is not a count: Strict)
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _not_bool(v):
    # lax floats take True as 1.0; a recipe that says `base_lr: true` is wrong. Numeric strings stay accepted:
    # PyYAML (YAML 1.1) reads 1e-4, without a dot, as the string '1e-4'
    if isinstance(v, bool):
        raise PydanticKnownError("float_type")
    return v


def int_(**bounds):
    """An integer field type with Field bounds (gt, ge, lt, le). The YAML fix-up wraps the bounded type, so that
    the bounds land in the JSON Schema as minimum / exclusiveMinimum."""
    return Annotated[int, Strict(), Field(**bounds), BeforeValidator(_integral)]


def float_(**bounds):
    """A finite number field type with Field bounds (finite: the sections' allow_inf_nan=False)."""
    return Annotated[float, Field(**bounds), BeforeValidator(_not_bool)]


Int, Float, Bool = int_(), float_(), StrictBool
PosInt, NonNegInt = int_(gt=0), int_(ge=0)
PosFloat, NonNegFloat, Probability = float_(gt=0), float_(ge=0), float_(ge=0, le=1)


def problem(message: str, key: Optional[str] = None) -> PydanticCustomError:
    """An error a validator raises; `key` (dotted, from the recipe's root) when it is about another key than the
    one validated (e.g. batch.micro_batch, found while checking augment)."""
    return PydanticCustomError("recipe", "{message}", {"message": message, "key": key or ""})


def fail(problems: List[Tuple[str, str]], title: str = "recipe") -> None:
    """Raise every (key relative to the validated section, message) at once; nothing when the list is empty.
    pydantic files them under the section's own location."""
    if problems:
        raise ValidationError.from_exception_data(title, [
            {"type": problem(msg), "loc": tuple(key.split(".")), "input": None} for key, msg in problems])


_TYPES = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "float",
          "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
          "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
          "list_type": "list", "tuple_type": "list"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _key(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(model, loc) -> Optional[List[str]]:
    """The keys the section at loc[:-1] of `model` takes (for an unknown key's message); None if not a model."""
    def fields(m) -> dict:  # by the name a recipe spells (a field's alias: checkpoint.async)
        return {f.alias or k: f for k, f in m.model_fields.items()}
    for part in loc[:-1]:
        field = fields(model).get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field else None
    return list(fields(model)) if isinstance(model, type) and issubclass(model, BaseModel) else None


def _explain(e: dict, model) -> str:
    t, ctx, got = e["type"], e.get("ctx") or {}, e.get("input")
    if t == "recipe":
        return ctx["message"]
    if t == "value_error":
        return str(ctx["error"])
    if t == "extra_forbidden":
        known = _known_keys(model, e["loc"])
        return "unknown key" + (f"; expected one of {known}" if known else "")
    if t in _TYPES:
        return f"expected {_TYPES[t]}, got {got!r} ({type(got).__name__})"
    if t in _BOUNDS:
        name, op = _BOUNDS[t]
        bound = ctx[name]  # float fields carry float bounds: '> 0', not '> 0.0'
        return f"expected {op} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}, got {got!r}"
    if t == "finite_number":
        return f"expected a finite number, got {got!r}"
    if t == "literal_error":
        return f"expected one of {ctx['expected']}, got {got!r}"
    if t == "too_short":
        return f"expected at least {ctx['min_length']} item(s), got {got!r}"
    if t == "too_long":
        return f"expected at most {ctx['max_length']} item(s), got {got!r}"
    return f"expected {e['msg'][0].lower()}{e['msg'][1:]}, got {got!r}"


def problems_of(err: ValidationError, model=None, prefix: str = "") -> List[str]:
    """Every error of `err` as 'key: expected ..., got ...' (keys under `prefix`; `model`: the validated class,
    for the list of known keys an unknown key's message gives)."""
    out = []
    for e in err.errors(include_url=False):
        where = prefix + _key(e["loc"]) if e["loc"] else prefix.rstrip(".")
        key = (e.get("ctx") or {}).get("key") or where or "recipe"
        out.append(f"{key}: {_explain(e, model)}")
    return out
