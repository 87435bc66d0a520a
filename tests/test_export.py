"""torch.export of the all-head `Faceptor.predict` path with the registered ops (CPU, FaceptorConfig.tiny()).

One 512-px and one 112-px input, any batch size (one symbolic batch dimension shared by both); the exported program
keeps faceptor::layer_attention and faceptor::heatmap_to_coords_fwd as single nodes and equals eager within 1e-5
at batch sizes other than the one it was traced with.
"""
import pytest
import torch
import torch.nn as nn

from model import Faceptor, FaceptorConfig
from test_ops import assert_close_normwise, ext  # noqa: F401  (ext: the heatmap op, built once per session)


class PredictAll(nn.Module):
    """model.predict over every head as a module with tensor inputs and a flat {"task.key": tensor} output."""

    def __init__(self, model: Faceptor):
        super().__init__()
        self.model = model

    def forward(self, images_512, images_112):
        out = self.model.predict(images_512=images_512, images_112=images_112)
        return {f"{t}.{k}": v for t, d in out.items() for k, v in d.items()}


@pytest.fixture(scope="module")
def exported(ext):  # noqa: F811
    torch.manual_seed(0)
    model = Faceptor(FaceptorConfig.tiny(stage=2)).eval()
    model.attention_impl = "fused"                                   # the decoder through faceptor::layer_attention
    with torch.no_grad():
        for q in model.queries.values():
            q.level.normal_()
    cfg, wrapper = model.cfg, PredictAll(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.randn(2, 3, cfg.size_512, cfg.size_512), torch.randn(2, 3, cfg.size_112, cfg.size_112))
    program = torch.export.export(wrapper, example, dynamic_shapes=({0: batch}, {0: batch}))
    return wrapper, program


def test_export_keeps_the_registered_ops(exported):
    _, program = exported
    targets = {str(n.target) for m in program.graph_module.modules() if hasattr(m, "graph") for n in m.graph.nodes}
    assert "faceptor.layer_attention.default" in targets
    assert "faceptor.heatmap_to_coords_fwd.default" in targets


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_equals_eager_at_other_batch_sizes(exported, batch):
    wrapper, program = exported
    cfg = wrapper.model.cfg
    x512, x112 = torch.randn(batch, 3, cfg.size_512, cfg.size_512), torch.randn(batch, 3, cfg.size_112, cfg.size_112)
    got, expected = program.module()(x512, x112), wrapper(x512, x112)
    assert got.keys() == expected.keys() and len(expected) >= 7
    for k in expected:
        assert got[k].shape == expected[k].shape and got[k].shape[0] == batch, k
        assert_close_normwise(got[k], expected[k], 1e-5, what=f"exported {k}")


def test_exported_program_checks_that_both_inputs_hold_the_same_faces(exported):
    _, program = exported
    cfg = exported[0].model.cfg
    with pytest.raises(Exception):
        program.module()(torch.randn(2, 3, cfg.size_512, cfg.size_512), torch.randn(3, 3, cfg.size_112, cfg.size_112))
