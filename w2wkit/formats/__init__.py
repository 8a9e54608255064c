"""LoRA file formats: kohya, diffusers, PEFT, attention processors, LyCORIS."""

from w2wkit.formats.registry import (
    FORMATS,
    Source,
    WriteOptions,
    detect_format,
    discover_lora_files,
    load_source,
    provenance_metadata,
    read_adapter,
    register_format,
    write_adapter,
)

__all__ = [
    "FORMATS",
    "Source",
    "WriteOptions",
    "detect_format",
    "discover_lora_files",
    "load_source",
    "provenance_metadata",
    "read_adapter",
    "register_format",
    "write_adapter",
]
