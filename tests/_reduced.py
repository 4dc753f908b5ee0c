"""Per-family keyword overrides that shrink every variant of a family to test size.

Kept apart from test_models.py so that other test files import it without building the registry.
"""

# Per family (the module name): keyword overrides that shrink a variant to test size.
REDUCED = {
    "hornet": dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)),
    "sret": dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), num_shared_blocks=(1, 2, 1)),
    "recurrent_vit": dict(embed_dim=32, num_heads=2, depth=6),
    "rgt": dict(embed_dim=24, num_heads=2, blocks_per_group=2),
    "camouflage": dict(mid_dim=16, scale_groups=2, fusion_groups=3, predictor_dim=8),  # decoder only
}

# Registered MSRNet variants at test size: the decoder of REDUCED over their timm backbones, narrowed.
COD_CASES = {
    "msrnet_pvt_v2_b2": dict(
        REDUCED["camouflage"],
        backbone_kwargs=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4)),
    ),
    "msrnet_resnet50": dict(
        REDUCED["camouflage"], backbone_kwargs=dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)
    ),
    "msrnet_hornet_tiny_7x7": dict(
        REDUCED["camouflage"], backbone_kwargs=dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
    ),
}
