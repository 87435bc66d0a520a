"""export.py: torch.export of the all-head `Faceptor.predict` path with the registered ops, and its ONNX form
(CPU, FaceptorConfig.tiny()).

One 512-px and one 112-px input, any batch size (one symbolic batch dimension shared by both); the exported program
keeps faceptor::layer_attention and faceptor::heatmap_to_coords_fwd as single nodes and equals eager within 1e-5
at batch sizes other than the one it was traced with. The ONNX graph (the ops replaced by their reference math)
holds only standard operators and equals eager within 1e-5 too (skipped when onnx / onnxscript are not installed).
"""
import pytest
import torch

import checkpoint
import export
from model import BASE_TASKS, TASKS, Faceptor, FaceptorConfig, NaiveFaceptor
from test_evaluate_cli import tiny_checkpoint
from test_ops import assert_close_normwise, ext  # noqa: F401  (ext: the heatmap op, built once per session)


@pytest.fixture(scope="module")
def exported(ext):  # noqa: F811
    torch.manual_seed(0)
    model = Faceptor(FaceptorConfig.tiny(stage=2, tasks=BASE_TASKS + ("cofw_visibility", "300wlp")))
    with torch.no_grad():
        for q in model.queries.values():
            q.level.normal_()
    return export.export_predict(model, batch=2)                      # the decoder through faceptor::layer_attention


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


def test_naive_faceptor_exports_head_by_head():
    torch.manual_seed(0)
    model = NaiveFaceptor(FaceptorConfig.tiny(tasks=("300w", "celebamask_hq", "morph2", "ms1mv3")))
    wrapper, program = export.export_predict(model)
    x = wrapper.example_inputs(3, seed=2)
    with torch.no_grad():
        expected = {t: model(x[0] if TASKS[t].size == 512 else x[1], t) for t in model.cfg.tasks}
    got = program.module()(*x)
    assert set(got) == {f"{t}.{k}" for t, d in expected.items() for k in d}
    for t, d in expected.items():
        for k, e in d.items():
            assert_close_normwise(got[f"{t}.{k}"], e, 1e-5, what=f"naive {t}.{k}")


def test_exported_program_checks_that_both_inputs_hold_the_same_faces(exported):
    _, program = exported
    cfg = exported[0].model.cfg
    with pytest.raises(Exception):
        program.module()(torch.randn(2, 3, cfg.size_512, cfg.size_512), torch.randn(3, 3, cfg.size_112, cfg.size_112))


@pytest.fixture(scope="module")
def onnx_file(exported, tmp_path_factory):
    pytest.importorskip("onnx", reason=export.ONNX_HINT)
    pytest.importorskip("onnxscript", reason=export.ONNX_HINT)
    wrapper, program = exported
    return export.to_onnx(wrapper, program, str(tmp_path_factory.mktemp("onnx") / "predict.onnx"))


def test_onnx_graph_holds_only_standard_operators(onnx_file):
    import onnx
    graph = onnx.load(onnx_file)
    onnx.checker.check_model(graph)
    domains = {n.domain for n in graph.graph.node} | {f.domain for f in graph.functions}
    assert not any("faceptor" in d for d in domains), domains
    assert [i.name for i in graph.graph.input] == ["images_512", "images_112"]


def test_onnx_equals_eager_at_another_batch_size(exported, onnx_file):
    wrapper, _ = exported
    x = wrapper.example_inputs(3, seed=5)
    got = export.run_onnx(onnx_file, x, wrapper.input_names())
    with torch.no_grad():
        expected = wrapper(*x)
    assert set(got) == set(expected) and any(k.endswith(".occluded") for k in expected)
    for k, e in expected.items():
        assert tuple(got[k].shape) == tuple(e.shape) and e.shape[0] == 3, k
        assert_close_normwise(torch.from_numpy(got[k]), e, 1e-5, what=f"ONNX {k}")


def test_onnx_without_its_packages_says_how_to_install_them(exported, monkeypatch, tmp_path):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda m: None if m == "onnxscript" else real(m))
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        export.to_onnx(*exported, str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_decompositions_are_the_reference_math(ext):  # noqa: F811
    """The ONNX path's replacements compute what the registered ops compute (the ops' own tests compare the ops
    with the same reference functions on random inputs, with gradients)."""
    g = torch.Generator().manual_seed(3)
    q, lb = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 4, 5, 3, generator=g)
    kf, v = torch.randn(2, 4, 3, 6, 8, generator=g), torch.randn(2, 4, 3, 6, 8, generator=g)
    kp = torch.randn(4, 6, 8, generator=g)
    table = export.reference_decompositions()
    la = table[torch.ops.faceptor.layer_attention.default](q, kf, kp, v, lb, False, 0, 0)
    op = torch.ops.faceptor.layer_attention.default(q, kf, kp, v, lb, False, 0, 0)
    assert_close_normwise(la[0], op[0], 1e-6, what="layer attention")
    assert_close_normwise(la[1], op[1], 1e-6, what="log-sum-exp")
    logits = torch.randn(2, 3, 7, 9, generator=g)
    hm = table[torch.ops.faceptor.heatmap_to_coords_fwd.default](logits)
    assert_close_normwise(hm[0], torch.ops.faceptor.heatmap_to_coords_fwd(logits)[0], 1e-6, what="coords")


def test_cli_writes_a_program_that_loads_and_matches(tmp_path, ext):  # noqa: F811
    path = tiny_checkpoint(tmp_path / "tiny.pt", ("300w", "morph2"))              # 32-px and 16-px inputs
    out = str(tmp_path / "predict.pt2")
    assert export.main([path, "--out", out]) == 0
    program = torch.export.load(out)
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path))
    x = (torch.randn(5, 3, 32, 32), torch.randn(5, 3, 16, 16))
    got = program.module()(*x)
    with torch.no_grad():
        expected = model.predict(images_512=x[0], images_112=x[1])
    for t, d in expected.items():
        for k, e in d.items():
            assert_close_normwise(got[f"{t}.{k}"], e, 1e-5, what=f"{t}.{k}")
    with pytest.raises(SystemExit):
        export.parse_args([path])                                         # nothing to write
