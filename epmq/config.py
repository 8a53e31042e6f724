"""Method hyperparameters: one JSON schema with defaults (``epmq/schemas/methods.schema.yaml``).

No hyperparameter lives in code: the registries, the CLI and the Snakemake config read the
defaults from the schema, and every user-supplied setting is validated against it.
"""

from __future__ import annotations

import copy
import functools
import math
from importlib import resources

import jsonschema
import yaml


@functools.cache
def methods_schema() -> dict:
    return yaml.safe_load(resources.files("epmq.schemas").joinpath("methods.schema.yaml").read_text())


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


DefaultFillingValidator = _with_defaults(jsonschema.Draft202012Validator)


def validate(instance: dict, schema: dict) -> dict:
    """Validate ``instance`` against ``schema``, filling defaults in place; raise ValueError on error."""
    errors = sorted(DefaultFillingValidator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    lines = [f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    # NaN passes every minimum/maximum (comparisons with NaN are false): refuse non-finite numbers
    lines += [f"  {where}: {value} is not a finite number" for where, value in _non_finite(instance)]
    if lines:
        raise ValueError("invalid configuration:\n" + "\n".join(lines))
    return instance


def _non_finite(instance: object, where: str = "<root>"):
    if isinstance(instance, float) and not math.isfinite(instance):
        yield where, instance
    elif isinstance(instance, dict):
        for key, value in instance.items():
            yield from _non_finite(value, key if where == "<root>" else f"{where}/{key}")
    elif isinstance(instance, list):
        for position, value in enumerate(instance):
            yield from _non_finite(value, f"{where}/{position}")


def parse_value(text: str) -> object:
    """A command-line value (``--param``, ``--set``) read as YAML, except that numbers in exponent
    form without a dot (``1e-5``, which YAML 1.1 reads as a string) are numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return number
    return value


def parse_assignment(pair: str, flag: str) -> tuple[str, object]:
    """``KEY=VALUE`` of a command-line flag, the value read by :func:`parse_value`."""
    key, separator, value = pair.partition("=")
    if not separator or not key.strip() or not value.strip():
        raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
    try:
        return key.strip(), parse_value(value)
    except yaml.YAMLError as error:
        raise ValueError(f"{flag} {key.strip()}: cannot read value {value!r}") from error


def method_params(section: str, name: str | None = None, **overrides) -> dict:
    """Validated parameters of ``section`` (``merge``/``quantize``) [and method ``name``], defaults filled."""
    config: dict = {section: {name: dict(overrides)} if name else dict(overrides)}
    validate(config, methods_schema())
    return config[section][name] if name else config[section]
