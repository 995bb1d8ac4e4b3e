"""Output layouts, registered by `save_name` (see `streamq.formats.base`)."""

from streamq.formats.base import (
    FORMATS,
    Format,
    QuantSpec,
    TensorSpec,
    format_names,
    get_format,
    parse_quantization_config,
)

__all__ = ["FORMATS", "Format", "QuantSpec", "TensorSpec", "format_names", "get_format", "parse_quantization_config"]
