"""`python bench.py train`: where one default-run training step spends its CPU time; `python bench.py compile`:
what torch.compile buys on CPU (the demo training step and all-head predict, eager and compiled alternated).

The step is train.py's stage-1 step (same preset, model, composer, losses, clipping and AdamW), run on `--world`
processes with one thread each over gloo, as `torchrun --standalone --nproc_per_node=2 train.py` runs it. Each
phase is timed with time.process_time (CPU time of this process, not inflated when other jobs share the cores):
data (the drawing of cache misses apart from face parameters, cache and collation), encoder, decoder, pixel decoder
and heads (forward hooks on the model's modules), losses, backward, the gradient all-reduce (one explicit
`all_reduce` of every gradient: the bytes DDP sends in buckets during the backward) and the optimiser.
The drawing is timed by wrapping data.synthetic.render for the duration of the benchmark.
"""
import os
import statistics
import time

import torch

from model import TASKS, Faceptor

STEP_PARTS = {"encoder": "encoder", "projection": "decoder (projection, queries, cross-attention)",
              "decoder": "decoder (projection, queries, cross-attention)", "pixel_decoder": "pixel decoder + heads",
              "dense_head": "pixel decoder + heads", "value_head": "pixel decoder + heads",
              "identity_head": "pixel decoder + heads"}


STEP_ROWS = ("data: drawing", "data: face", "encoder", "decoder", "pixel", "losses", "backward", "all-reduce (CPU)",
             "optimiser")


def _timed_render(clock, spent):
    """data.synthetic.render wrapped so that the drawing of cache misses is timed apart from the rest of the data;
    spent = [seconds, faces drawn]."""
    import data.synthetic as synthetic
    render = synthetic.render

    def timed(*a, **k):
        t = clock()
        out = render(*a, **k)
        spent[0] += clock() - t
        spent[1] += 1
        return out
    synthetic.render = timed


def _distinct_draws(cfg, mcfg, rank, world, steps):
    """Faces one rank draws in a whole run (cache misses): distinct (size, framing, index) over every head."""
    import train
    from data.composer import InfiniteSampler, item_seed
    keys = set()
    for i, (head, (n, _)) in enumerate(cfg.heads.items()):
        ds = train.synthetic_dataset(head, cfg, mcfg)
        sampler = InfiniteSampler(len(ds), int(n), item_seed(cfg.seed, i), rank, world)
        for _ in range(steps):
            keys.update((ds.size, ds.framing, k[0]) for k in sampler.next_keys())
    return len(keys)


def _train_setup(cfg, rank, world):
    """The default run's model, CosFace, composer and optimiser, built as train.py builds them (stage 1)."""
    import losses
    import train
    import train_config
    import train_start
    from data.composer import MultiTaskComposer
    mcfg = train_config.model_config(cfg, 1)
    torch.manual_seed(cfg.seed)
    model = Faceptor(mcfg)
    train_start.init_readout(model, cfg.readout_offset)
    datasets = {h: train.synthetic_dataset(h, cfg, mcfg) for h in cfg.heads}
    composer = MultiTaskComposer([(h, datasets[h], int(v[0])) for h, v in cfg.heads.items()], seed=cfg.seed,
                                 rank=rank, world_size=world, fixed_partition=train_config.cached_synthetic(cfg))
    cosface = losses.CosFace(mcfg.embed_dim, cfg.synthetic_identities)
    unused = ("encoder.ln_post.", "encoder.proj")
    params = [p for n, p in model.named_parameters() if not n.startswith(unused)] + list(cosface.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return mcfg, model, cosface, composer, params, optimizer


def _time_forward_parts(model, clock) -> dict:
    """Forward hooks that add each STEP_PARTS module's CPU time into the returned dict (cleared by the caller)."""
    spent, started = {}, {}
    for name, part in STEP_PARTS.items():
        m = getattr(model, name)
        m.register_forward_pre_hook(lambda mod, a, name=name: started.__setitem__(name, clock()))
        m.register_forward_hook(lambda mod, a, o, name=name, part=part: spent.__setitem__(
            part, spent.get(part, 0.0) + clock() - started[name]))
    return spent


def _profiled_step(cfg, model, cosface, composer, params, optimizer, clock, drawn, parts) -> dict:
    """One training step (train.py's, with the gradient all-reduce made explicit) -> {phase: CPU seconds}."""
    import torch.distributed as dist
    import losses
    parts.clear()
    drawn[0] = 0.0
    t0 = clock()
    batches = composer.next_batch()
    t1 = clock()
    outputs = model.forward_tasks({h: b["image"] for h, b in batches.items()})
    t2 = clock()
    head_losses = {h: losses.task_loss(TASKS[h].type, outputs[h], batches[h], cosface) for h in batches}
    loss = losses.multitask_loss(head_losses, {h: float(v[1]) for h, v in cfg.heads.items()})
    t3 = clock()
    loss.backward()
    t4 = clock()
    flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])       # DDP: the same bytes
    w = time.perf_counter()
    dist.all_reduce(flat)
    t5, wall = clock(), time.perf_counter() - w
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t6 = clock()
    row = {"data: drawing (cache misses)": drawn[0], "data: face parameters, cache, collation": t1 - t0 - drawn[0],
           **parts}
    # what the hooks do not see (heatmap read-out, interpolation, slicing) counts with the heads
    row["pixel decoder + heads"] = row.get("pixel decoder + heads", 0.0) + (t2 - t1) - sum(parts.values())
    row.update({"losses": t3 - t2, "backward": t4 - t3, "all-reduce (CPU)": t5 - t4,
                "optimiser (clip + AdamW)": t6 - t5, "total": t6 - t0,
                "all-reduce (wall, incl. waiting for the other ranks)": wall})
    return row


def _train_worker(rank, world, args, port, queue):
    import torch.distributed as dist
    import train
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = train.PRESETS[args.preset]
    mcfg, model, cosface, composer, params, optimizer = _train_setup(cfg, rank, world)
    clock, drawn = time.process_time, [0.0, 0]
    _timed_render(clock, drawn)
    parts = _time_forward_parts(model, clock)
    rows, faces = [], 0
    for step in range(args.warmup_steps + args.steps):
        position = composer.state_dict()
        row = _profiled_step(cfg, model, cosface, composer, params, optimizer, clock, drawn, parts)
        if step >= args.warmup_steps:
            rows.append(row)
            faces += drawn[1]
        drawn[1] = 0
    means = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    composer.load_state_dict(position)                # the last batch again: every face is a cache hit now
    t = clock()
    composer.next_batch()
    means["data: one batch again, all cache hits"] = clock() - t
    per_face = means["data: drawing (cache misses)"] * len(rows) / max(1, faces)
    queue.put((rank, means, per_face, _distinct_draws(cfg, mcfg, rank, world, cfg.steps), cfg.steps))
    dist.destroy_process_group()


def section_train(args):
    """Per-step CPU time of the default run, by phase, on `--world` processes x 1 thread."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_train_worker, args=(r, args.world, args, port, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, *result = queue.get()
        results[rank] = result
    for p in procs:
        p.join()
    means, per_draw, draws, steps = results[0]
    total = means["total"]
    print(f"preset {args.preset}, {args.world} processes x 1 thread, torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, mean of steps {args.warmup_steps + 1}-"
          f"{args.warmup_steps + args.steps} (cache cold: every face is drawn), rank 0, CPU ms per step")
    for k, v in means.items():
        share = f"{100 * v / total:5.1f} %" if k.startswith(tuple(STEP_ROWS)) else "       "
        print(f"  {k:52s} {1000 * v:8.1f}  {share}")
    print(f"  one face: {1000 * per_draw:.2f} ms to draw; a whole {steps}-step run draws {draws} distinct faces on "
          f"rank 0 (the rest are cache hits): {1000 * per_draw * draws / steps:.1f} ms of drawing per step on average")


# Synthetic inputs and the stage-1 step, for bench.py's `compile` section and gpu_check.py

def synthetic_batches(heads, mcfg, device, seed=0, identities=1000):
    """{head: batch dict as the data loaders give it} of random tensors: n_t images of the head's input size and
    targets of the right kind (landmarks in pixels, masks, ages, labels, attributes in {1, 0, -1}, identities)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for head, (n, _alpha) in heads.items():
        spec, size = TASKS[head], mcfg.input_size(head)
        b = {"image": torch.randn(n, 3, size, size, generator=g)}
        if spec.type == "landmarks":
            b["landmarks"] = torch.rand(n, spec.queries, 2, generator=g) * (size - 1)
        elif spec.type == "parsing":
            b["mask"] = torch.randint(0, spec.queries, (n, size, size), generator=g)
        elif spec.type == "age":
            b["age"] = torch.randint(0, spec.queries, (n,), generator=g).float()
        elif spec.type == "expression":
            b["expression"] = torch.randint(0, spec.queries, (n,), generator=g)
        elif spec.type == "attributes":
            b["attributes"] = torch.randint(-1, 2, (n, spec.queries), generator=g)
        else:
            b["identity"] = torch.randint(0, identities, (n,), generator=g)
        out[head] = {k: v.to(device) for k, v in b.items()}
    return out


def training_setup(mcfg, heads, device, identities=1000):
    """(model, train.MultiTaskStep, weights) for a stage-1 step of `mcfg` with the task heads `heads`."""
    import losses
    import train
    model = Faceptor(mcfg).to(device).train()
    cosface = torch.nn.ModuleDict({h: losses.CosFace(mcfg.embed_dim, identities) for h in heads
                                   if TASKS[h].type == "recognition"}).to(device)
    return model, train.MultiTaskStep(model, cosface), {h: a for h, (_n, a) in heads.items()}


def cpu_time(fns, reps):
    """{path: fn} -> {path: median ms}. The paths are interleaved rep by rep, so a busy machine slows them alike."""
    ts = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                                          # warm-up (allocations, lazy init)
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def _tensors(out):
    """(loss, grads) of a training step or {task: {key: tensor}} of predict -> a flat list of tensors."""
    if isinstance(out, tuple):
        return [out[0], *(g for g in out[1] if g is not None)]
    return [v for d in out.values() for v in d.values()]


def section_compile(args):
    """torch.compile vs eager on CPU: the demo training step (fwd + bwd) and the demo model's all-head predict."""
    import losses
    import train_config
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = train_config.PRESETS["demo"]
    mcfg = train_config.model_config(cfg, stage=1)
    heads = {h: [args.batch, a] for h, (_n, a) in cfg.heads.items()}
    model, step, weights = training_setup(mcfg, heads, "cpu", identities=cfg.synthetic_identities)
    batches = synthetic_batches(heads, mcfg, "cpu", identities=cfg.synthetic_identities)
    params = [p for p in step.parameters() if p.requires_grad]
    compiled_step = torch.compile(step)

    def train_step(fn):
        def call():
            loss = losses.multitask_loss(fn(batches), weights)                        # Eq. (8)
            return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)   # L_t: unused in stage 1
        return call

    model.eval()
    x512 = torch.randn(args.batch, 3, mcfg.size_512, mcfg.size_512)
    x112 = torch.randn(args.batch, 3, mcfg.size_112, mcfg.size_112)
    compiled_predict = torch.compile(model.predict)

    def predict(fn):
        return lambda: fn(images_512=x512, images_112=x112)

    print(f"demo model, {args.threads} threads, batch {args.batch} per head, fp32, median of {args.reps} "
          f"(eager and compiled alternate)")
    for name, eager, comp, train_mode in (("training step (fwd+bwd)", train_step(step), train_step(compiled_step),
                                           True), ("predict (all heads)", predict(model.predict),
                                                   predict(compiled_predict), False)):
        model.train(train_mode)
        t0 = time.perf_counter()
        c_out = comp()                                                                # compiles
        t_compile = time.perf_counter() - t0
        e_out = eager()
        err = max((a - b).abs().max().item() for a, b in zip(_tensors(c_out), _tensors(e_out)))
        times = cpu_time({"eager": eager, "compiled": comp}, args.reps)
        print(f"  {name:<26s} eager {times['eager']:8.1f} ms  compiled {times['compiled']:8.1f} ms  "
              f"eager/compiled {times['eager'] / times['compiled']:5.2f}x  (first call incl. compile "
              f"{t_compile:5.1f} s, max abs difference {err:.1e})")
