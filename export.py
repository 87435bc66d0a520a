"""Export the all-head `model.predict` path: torch.export (.pt2, with the registered ops) and ONNX.

    python export.py out/demo --out out/demo/predict.pt2                  # torch.export, any batch size
    python export.py out/demo --onnx out/demo/predict.onnx                # ONNX (pip install onnx onnxscript)
    python export.py checkpoint_rank0_iter_50000.pth.tar --out base.pt2   # the authors' checkpoints as well

The exported function is `PredictAll`: model.predict over every head of the checkpoint, one decoder pass (Naive
Faceptor, which has no joint pass: its heads one after the other).
  inputs   images_512 [B, 3, S_512, S_512] and images_112 [B, 3, S_112, S_112] (only the sizes the heads need, in
           that order), the same B faces, normalised as in training (data.composer.normalize_images); B is free
           (1 to 4096) and shared by both inputs;
  outputs  {"task.key": tensor}, the keys of model.predict (README "Outputs"), e.g. "300w.coords" [B, 68, 2].
The .pt2 program keeps faceptor::layer_attention (the decoder's cross-attention, fused path) and
faceptor::heatmap_to_coords_fwd as single nodes, so loading it needs this repository's ops (`import ops`; the
extension for the heatmap op). ONNX has no such ops: before conversion `reference_decompositions` replaces each by
its reference math (ops.layer_attention_ref, ops.heatmap_to_coords_ref, the same functions the tests compare the
kernels to), so the ONNX graph is plain ONNX operators.
Each export is checked before it is written: the program is run at a batch size other than the traced one and
compared with eager (largest absolute difference printed; an error above --tolerance). ONNX is checked with
onnxruntime when installed, else with onnx's reference evaluator (slow at Base size: --no-check skips it).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import warnings
from typing import Dict, List

import torch
import torch.nn as nn

import ops
from model import TASKS

ONNX_HINT = "ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript"


class PredictAll(nn.Module):
    """model.predict over every head (Naive Faceptor: every head's forward), as a module with tensor inputs (one per
    input size, 512 first) and a flat {"task.key": tensor} output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sizes = sorted({TASKS[t].size for t in model.cfg.tasks}, reverse=True)           # e.g. [512, 112]

    def forward(self, *images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if len(images) != len(self.sizes):
            raise ValueError(f"PredictAll: expected the inputs {self.input_names()}, got {len(images)} tensor(s)")
        by_size = dict(zip(self.sizes, images))
        if hasattr(self.model, "predict"):                  # Faceptor: encoder once per size, one decoder pass
            out = self.model.predict(**{f"images_{s}": x for s, x in by_size.items()})
        else:                                               # Naive Faceptor: one head after the other
            out = {t: self.model(by_size[TASKS[t].size], t) for t in self.model.cfg.tasks}
        return {f"{t}.{k}": v for t, d in out.items() for k, v in d.items()}

    def example_inputs(self, batch: int, seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(seed)
        side = {512: self.model.cfg.size_512, 112: self.model.cfg.size_112}
        return tuple(torch.randn(batch, 3, side[s], side[s], generator=g) for s in self.sizes)

    def input_names(self) -> List[str]:
        return [f"images_{s}" for s in self.sizes]


def export_predict(model: nn.Module, batch: int = 2, max_batch: int = 4096):
    """torch.export of PredictAll(model) with one symbolic batch dimension -> (wrapper, ExportedProgram).
    The model is put in eval mode and its decoder on the registered op (attention_impl "fused")."""
    model.eval()
    if hasattr(model, "attention_impl"):
        model.attention_impl = "fused"            # faceptor::layer_attention: Triton on CUDA, reference math on CPU
    wrapper = PredictAll(model)
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    shapes = tuple({0: dim} for _ in wrapper.sizes)
    with torch.no_grad():
        program = torch.export.export(wrapper, wrapper.example_inputs(batch), dynamic_shapes=(shapes,))   # *images
    return wrapper, program


def _layer_attention_reference(q, kf, kp, v, lb, fused, block_m, block_n):
    out, lse = ops._layer_attention_ref_lse(q, kf, kp, v, lb)                # Eqs. (6)-(7)
    return out, lse.float()


def _heatmap_reference(logits):
    coords = ops.heatmap_to_coords_ref(logits)                                 # Eq. (9)
    # the op's second output (per-channel statistics) feeds only its backward; inference graphs drop it
    return coords, coords.new_zeros(logits.shape[0], logits.shape[1], 3)


def reference_decompositions() -> dict:
    """{registered op: its reference math} for ExportedProgram.run_decompositions."""
    table = {torch.ops.faceptor.layer_attention.default: _layer_attention_reference}
    if hasattr(torch.ops.faceptor, "heatmap_to_coords_fwd"):                   # registered when the extension loads
        table[torch.ops.faceptor.heatmap_to_coords_fwd.default] = _heatmap_reference
    return table


def to_onnx(wrapper: PredictAll, program, path: str):
    """The exported program with the registered ops replaced by their reference math, as ONNX at `path`."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise ImportError(ONNX_HINT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # deprecations inside torch's own passes
        plain = program.run_decompositions(reference_decompositions())
    left = sorted({str(n.target) for n in plain.graph.nodes if str(n.target).startswith("faceptor.")})
    if left:
        raise RuntimeError(f"to_onnx: ops without an ONNX form remain in the graph: {left}")
    names = list(plain.call_spec.out_spec.context)         # the "task.key" names, in output order
    for noisy in ("onnxscript", "torch.onnx"):           # per-node notes of the converter and its optimiser
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # deprecations inside torch's own converter
        onnx_program = torch.onnx.export(plain, input_names=wrapper.input_names(), output_names=names, dynamo=True,
                                         optimize=True, verbose=False)
    onnx_program.save(path)
    return path


def run_onnx(path: str, inputs: tuple, input_names: List[str]) -> dict:
    """Outputs {name: numpy array} of the ONNX file at `path` (onnxruntime when installed, else onnx's reference
    evaluator)."""
    feeds = {n: x.numpy() for n, x in zip(input_names, inputs)}
    try:
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
    except ImportError:
        from onnx.reference import ReferenceEvaluator
        session = ReferenceEvaluator(path)
        names = list(session.output_names)
    return dict(zip(names, session.run(names, feeds)))


def max_difference(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> tuple:
    """(largest absolute difference over every output, its output's name); an error when keys or shapes differ."""
    if set(got) != set(expected):
        raise RuntimeError(f"export check: outputs differ: {sorted(set(got) ^ set(expected))}")
    worst = (0.0, None)
    for k, e in expected.items():
        g = torch.as_tensor(got[k])
        if tuple(g.shape) != tuple(e.shape):
            raise RuntimeError(f"export check: {k} has shape {tuple(g.shape)}, eager {tuple(e.shape)}")
        worst = max(worst, ((g.double() - e.double()).abs().max().item(), k), key=lambda w: w[0])
    return worst


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="our checkpoint (file or run folder) or one of the authors' files")
    ap.add_argument("--out", default=None, help="write the torch.export program here (.pt2)")
    ap.add_argument("--onnx", default=None, help="write the ONNX graph here (.onnx)")
    ap.add_argument("--no-check", action="store_true", help="skip running the export against eager")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute difference to eager allowed")
    args = ap.parse_args(argv)
    if not args.out and not args.onnx:
        ap.error("nothing to write: give --out FILE.pt2 and/or --onnx FILE.onnx")
    return args


def _check(what: str, got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], tolerance: float):
    err, key = max_difference(got, expected)
    print(f"{what}: equals eager at batch 3 within {err:.1e} (largest absolute difference, at {key})")
    if not err <= tolerance:
        raise SystemExit(f"{what}: differs from eager by {err:.3e} > --tolerance {tolerance}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import predict                                      # model loading for both checkpoint kinds
    model, _framings, kind = predict.load_model(args.checkpoint)
    t0 = time.perf_counter()
    wrapper, program = export_predict(model)
    print(f"torch.export of {len(model.cfg.tasks)} heads ({kind} checkpoint) in {time.perf_counter() - t0:.1f} s; "
          f"inputs {', '.join(wrapper.input_names())}")
    check = None if args.no_check else wrapper.example_inputs(3, seed=1)
    expected = None
    if check is not None:
        with torch.no_grad():
            expected = wrapper(*check)
    if args.out:
        if check is not None:
            _check("exported program", program.module()(*check), expected, args.tolerance)
        torch.export.save(program, args.out)
        print(f"wrote {args.out}")
    if args.onnx:
        t0 = time.perf_counter()
        try:
            to_onnx(wrapper, program, args.onnx)
        except ImportError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"ONNX conversion in {time.perf_counter() - t0:.1f} s")
        if check is not None:
            got = run_onnx(args.onnx, check, wrapper.input_names())
            _check("ONNX graph", {k: torch.from_numpy(v) for k, v in got.items()}, expected, args.tolerance)
        print(f"wrote {args.onnx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
