"""torch.compile and the registered Layer-Attention op on CPU.

* opcheck of faceptor::layer_attention and its backward on the reference kernel (CPU), and on the Triton kernels
  through the interpreter;
* the op's CPU kernel gives exactly the plain reference's outputs and gradients (the decoder's fused path on CPU
  did not change);
* torch.compile(fullgraph=True) traces a stage-2 model (Layer-Attention on) through the op, forward and backward;
* inductor-compiled == eager within 1e-5: the demo model's training step (loss and every gradient) and predict.
"""
import dataclasses

import pytest
import torch

import ops
import train
import train_config
from bench_train import synthetic_batches, training_setup
from model import Faceptor, FaceptorConfig
from test_ops import assert_close_normwise
from test_ops_attention import make_inputs

LA, LA_BWD = torch.ops.faceptor.layer_attention, torch.ops.faceptor.layer_attention_bwd


def op_samples():
    yield make_inputs(2, 2, 5, 3, 7, 16, torch.float32)                                    # KP shared over B
    yield make_inputs(1, 2, 9, 2, 4, 8, torch.float64, shared_kp=False, masked=(1,))       # per-batch KP, masked
    q, kf, kp, v, lb = make_inputs(2, 1, 4, 2, 5, 16, torch.float32, views=True)           # head-split views
    lb[:, :, 1] = float("-inf")                                                           # one all-masked row
    yield q, kf, kp, v, lb


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "triton-interpreted"])
def test_layer_attention_opcheck(fused):
    if fused and not (ops.HAVE_TRITON and ops.ops_triton.INTERPRET):
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    for xs in op_samples():
        if fused and xs[0].dtype == torch.float64:
            continue                                                  # the kernels take fp32/fp16/bf16
        blocks = (16, 16) if fused else (0, 0)
        args = [t.detach().requires_grad_() for t in xs]
        torch.library.opcheck(LA.default, (*args, fused, *blocks))
        o, lse = LA(*xs, fused, *blocks)
        torch.library.opcheck(LA_BWD.default, (torch.randn_like(o), *xs, o, lse, fused, *blocks))


def test_op_cpu_kernel_equals_plain_reference():
    """Forward: the same function (bitwise). Backward: the written-out gradients vs autograd of the reference."""
    for xs in op_samples():
        a = [t.detach().requires_grad_() for t in xs]
        b = [t.detach().requires_grad_() for t in xs]
        out_op, out_ref = ops.layer_attention(*a, impl="op"), ops.layer_attention(*b, impl="ref")
        g = torch.randn_like(out_ref)
        assert torch.equal(out_op, out_ref)
        tol = 1e-12 if xs[0].dtype == torch.float64 else 1e-6
        for name, x, y in zip("q kf kp v lb".split(), torch.autograd.grad(out_op, a, g),
                              torch.autograd.grad(out_ref, b, g)):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert_close_normwise(x, y, tol, what=f"d{name} {xs[0].dtype}")


def tiny_stage2_model(seed=0):
    torch.manual_seed(seed)
    model = Faceptor(FaceptorConfig.tiny(stage=2))
    model.attention_impl = "fused"                                    # the decoder calls faceptor::layer_attention
    with torch.no_grad():                                             # distinct L_t rows: Layer-Attention matters
        for q in model.queries.values():
            q.level.normal_()
    return model


def test_fullgraph_compile_traces_the_decoder_through_the_op():
    model = tiny_stage2_model()
    cfg = model.cfg
    x512, x112 = torch.randn(2, 3, cfg.size_512, cfg.size_512), torch.randn(2, 3, cfg.size_112, cfg.size_112)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def loss_of(outs):
        return outs["300w"]["coords"].square().sum() + outs["celeba"]["logits"].square().mean()

    torch._dynamo.reset()
    step = torch.compile(lambda a, b: loss_of(model.forward_tasks({"300w": a, "celeba": b})),
                         backend=recording_backend, fullgraph=True)
    loss = step(x512, x112)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes}
    assert len(graphs) == 1 and any("faceptor.layer_attention" in t for t in targets), sorted(targets)[:20]
    eager = loss_of(model.forward_tasks({"300w": x512, "celeba": x112}))
    eager_grads = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    assert_close_normwise(loss, eager, 1e-6, what="loss")
    for (name, _), a, b in zip(model.named_parameters(), grads, eager_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close_normwise(a, b, 1e-6, what=f"grad {name}")


def demo_step_inputs(batch=2, names=("300w", "celeba")):
    """The demo preset's model on two of its heads (a 512-px head with the heatmap op, a 112-px head): fewer
    kernels for inductor to build than all six, the same layers."""
    cfg = train.PRESETS["demo"]
    heads = {h: [batch, cfg.heads[h][1]] for h in names}
    mcfg = train_config.model_config(dataclasses.replace(cfg, heads=heads), stage=1)
    return mcfg, heads


def test_inductor_demo_training_step_equals_eager():
    """The demo preset's model and loss (eq. 8) on two heads, forward + backward, inductor vs eager, within 1e-5."""
    mcfg, heads = demo_step_inputs()
    torch.manual_seed(0)
    model, step, weights = training_setup(mcfg, heads, "cpu", identities=50)
    batches = synthetic_batches(heads, mcfg, "cpu", identities=50)
    import losses
    params = [p for p in step.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        loss = losses.multitask_loss(fn(batches), weights)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    torch._dynamo.reset()
    eager_loss, eager_grads = loss_and_grads(step)
    comp_loss, comp_grads = loss_and_grads(torch.compile(step))
    assert_close_normwise(comp_loss, eager_loss, 1e-5, what="demo loss")
    used = 0
    for (name, _), a, b in zip(step.named_parameters(), comp_grads, eager_grads):
        assert (a is None) == (b is None), name                       # e.g. L_t is unused in stage 1
        if a is not None:
            used += 1
            assert_close_normwise(a, b, 1e-5, what=f"demo grad {name}")
    assert used > len(params) // 2


def test_inductor_predict_equals_eager():
    model = tiny_stage2_model().eval()
    cfg = model.cfg
    x512, x112 = torch.randn(3, 3, cfg.size_512, cfg.size_512), torch.randn(3, 3, cfg.size_112, cfg.size_112)
    torch._dynamo.reset()
    compiled = torch.compile(model.predict)(images_512=x512, images_112=x112)
    eager = model.predict(images_512=x512, images_112=x112)
    assert compiled.keys() == eager.keys()
    for t in eager:
        for k in eager[t]:
            assert_close_normwise(compiled[t][k], eager[t][k], 1e-5, what=f"predict {t}.{k}")
