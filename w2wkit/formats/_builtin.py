"""The built-in LoRA formats, as an explicit list (no registration by import)."""

from __future__ import annotations

from w2wkit.formats.diffusers import DiffusersFormat
from w2wkit.formats.kohya import KohyaFormat
from w2wkit.formats.legacy import LegacyAttnProcsFormat
from w2wkit.formats.lycoris import LycorisFormat
from w2wkit.formats.peft import PeftFormat
from w2wkit.formats.w2wmodel import W2WModelFormat

#: The formats w2wkit ships, in the order ties in detection are broken.
BUILTIN_FORMATS = (
    KohyaFormat(),
    DiffusersFormat(),
    PeftFormat(),
    LegacyAttnProcsFormat(),
    LycorisFormat(),
    W2WModelFormat(),
)
