"""``torch.compile`` traces every family as one graph and computes what eager mode computes.

Dynamo's ``explain`` reports graph breaks without running a compiler backend; ``aot_eager`` then
runs the traced graph through AOTAutograd's functionalization (which rewrites the in-place window
writes of RGT) without inductor's C++ build, so the test stays fast on the CI machine. Inductor
itself is exercised by ``recurzoo bench --backends compile``.
"""

from __future__ import annotations

import pytest
import torch
from _reduced import REDUCED

import recurzoo

# One model per family, with the options that change its traced code (global filters, slicing, Raptor
# conditioning, shifted windows, the three-scale decoder); task models at their reduced widths.
CASES = [
    ("hornet_tiny_7x7", {}),
    ("hornet_tiny_gf", {}),
    ("sret_tiny", {}),
    ("sret_tiny_noslice", {}),
    ("vit_recurrent_tiny_patch16_224", dict(depth_conditioning=True, lora_rank=2)),
    ("rgt_small_x2", {}),
    ("msrnet_pvt_v2_b2", {}),
]


def _build(name: str, extra: dict) -> torch.nn.Module:
    return recurzoo.create_model(name, **REDUCED[recurzoo.model_family(name)], **extra).eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name,extra", CASES, ids=[name for name, _ in CASES])
def test_compile_traces_one_graph_without_breaks(name, extra):
    model = _build(name, extra)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(images)
    reasons = [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name,extra", CASES, ids=[name for name, _ in CASES])
def test_compiled_model_matches_eager(name, extra):
    model = _build(name, extra)
    images = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(images)
        actual = compiled(images)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
