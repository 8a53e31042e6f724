"""Method hyperparameters: one JSON schema with defaults (``epmq/schemas/methods.schema.yaml``).

No hyperparameter lives in code: the registries, the CLI and the Snakemake config read the
defaults from the schema, and every user-supplied setting is validated against it.
"""

from __future__ import annotations

import copy
import functools
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
    if errors:
        lines = [f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        raise ValueError("invalid configuration:\n" + "\n".join(lines))
    return instance


def method_params(section: str, name: str | None = None, **overrides) -> dict:
    """Validated parameters of ``section`` (``merge``/``quantize``) [and method ``name``], defaults filled."""
    config: dict = {section: {name: dict(overrides)} if name else dict(overrides)}
    validate(config, methods_schema())
    return config[section][name] if name else config[section]
