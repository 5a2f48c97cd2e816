"""Feature schema and encoders shared by training and serving."""

from models.features.schema import (
    DEFAULT_SCHEMA_PATH,
    PAD,
    Feature,
    FeatureSchema,
    SchemaError,
    load_schema,
    parse_schema,
)

__all__ = [
    "DEFAULT_SCHEMA_PATH",
    "PAD",
    "Feature",
    "FeatureSchema",
    "SchemaError",
    "load_schema",
    "parse_schema",
]
