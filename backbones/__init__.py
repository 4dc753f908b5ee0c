"""The model families of recurzoo; importing this package registers them with timm."""

from recurzoo.backbones import hornet, recurrent_vit, rgt, sret
from recurzoo.registry import register_family_module

# The modules whose ``@register_model`` functions are zoo models, and the family (card) of each.
FAMILY_MODULES = (
    "recurzoo.backbones.hornet",
    "recurzoo.backbones.sret",
    "recurzoo.backbones.recurrent_vit",
    "recurzoo.backbones.rgt",
)
for _module in (hornet, sret, recurrent_vit, rgt):
    register_family_module(_module.__name__)

__all__ = ["FAMILY_MODULES", "hornet", "recurrent_vit", "rgt", "sret"]
