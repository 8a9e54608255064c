"""Old diffusers attention-processor LoRA files (read only).

Before diffusers used PEFT (``unet.save_attn_procs``, diffusers <= 0.16), LoRA
weights lived in the attention processors::

    [unet.]down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight
    [unet.]...attn1.processor.to_out_lora.up.weight

The processor's ``to_q_lora``/``to_k_lora``/``to_v_lora``/``to_out_lora``
(and ``add_k_proj_lora``/``add_v_proj_lora`` of added-KV processors) belong to
the attention's ``to_q``/``to_k``/``to_v``/``to_out.0``
(``add_k_proj``/``add_v_proj``) linear layers. Such files hold UNet weights
only. Alpha is the rank (scale 1, as those processors applied ``up(down(x))``)
unless a ``network_alpha`` was stored as a scalar tensor next to the factors
(``...to_q_lora.network_alpha`` or ``...to_q_lora.alpha``).
"""

from __future__ import annotations

import re
from pathlib import Path

from w2wkit.adapter import Adapter
from w2wkit.errors import FormatError
from w2wkit.formats._peftlike import KeyRule, assemble, match_keys, refuse_dora
from w2wkit.formats.base import Source, WriteOptions

__all__ = ["LegacyAttnProcsFormat"]

_PROJ = r"(?P<proj>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)"
_MODULE_MAP = (
    (r"\.processor\.to_out_lora$", ".to_out.0"),
    (r"\.processor\.(\w+)_lora$", r".\1"),
)

RULES: tuple[KeyRule, ...] = (
    KeyRule(
        re.compile(
            rf"^(?:unet\.)?(?P<module>.+\.processor\.{_PROJ}_lora)\.(?P<factor>down|up)\.weight$"
        ),
        module_map=_MODULE_MAP,
    ),
    KeyRule(
        re.compile(rf"^(?:unet\.)?(?P<module>.+\.processor\.{_PROJ}_lora)\.(?:network_)?alpha$"),
        factor="alpha",
        module_map=_MODULE_MAP,
    ),
)


class LegacyAttnProcsFormat:
    """diffusers attention-processor LoRA weights (``...processor.to_q_lora.down.weight``)."""

    name = "legacy"
    writable = False
    description = "old diffusers attention processors (processor.to_q_lora.down.weight), read-only"

    def sniff(self, src: Source) -> float:
        """1 when every key is an attention-processor LoRA key, else 0.8 x fraction."""
        if src.config is not None:
            return 0.0
        matched, unmatched = match_keys(src, RULES)
        if not any(f != "alpha" for _, _, f in matched.values()):
            return 0.0
        return 1.0 if not unmatched else 0.8 * len(matched) / len(src.tensors)

    def read(self, src: Source) -> Adapter:
        """Read the processors' factors as ``unet.<attention>.<projection>`` layers."""
        refuse_dora(src)
        matched, unmatched = match_keys(src, RULES)
        if unmatched:
            raise FormatError(
                "unexpected key for the attention-processor LoRA format",
                path=src.path,
                key=unmatched[0],
            )
        canon = {key: ("unet", f"unet.{module}", f) for key, (_, module, f) in matched.items()}

        def alpha_for(module: str, rank: int, alpha_t: float | None) -> tuple[float, bool]:
            return (float(rank) if alpha_t is None else alpha_t), False

        return assemble(src, canon, alpha_for=alpha_for, metadata=dict(src.metadata))

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """Not writable: diffusers no longer loads this layout."""
        raise FormatError(
            "the attention-processor format is read-only; write diffusers instead", path=path
        )
