"""The run config: one JSON Schema (schema.json) is the source of truth for every key."""

from easydistill.config.load import load_config, read_json, schema, schema_problems
from easydistill.config.view import Config, KDLoss, Section, TeacherSpec

__all__ = [
    "Config",
    "KDLoss",
    "Section",
    "TeacherSpec",
    "load_config",
    "read_json",
    "schema",
    "schema_problems",
]
