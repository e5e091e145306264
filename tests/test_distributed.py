"""Two gloo processes (CPU, loopback) against one process: DistributedDataParallel's gradients,
DTensor inputs to the ops (sharded on batch, heads or rows), Megatron-style tensor parallelism with
DTensors reaching the op, and FSDP2 (fully_shard) training a patched decoder."""
import contextlib
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmkernels
from mmkernels.models import MultimodalClassifier


def make_batch(B=8):
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(0, 1000, (B, 12), generator=g), torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 10, 40, generator=g))
    return args, torch.randint(1, 11, (B,), generator=g), torch.randint(0, 10, (B,), generator=g)


def make_model():
    torch.manual_seed(0)
    return MultimodalClassifier(fusion="cross_attention")


@contextlib.contextmanager
def process_group(rank, world, init_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    yield
    # Both ranks leave together: a rank tearing down gloo while the other still talks to it
    # aborted now and then ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def spawn_two(worker, tmp, out_file):
    """Runs worker on two ranks. A rank killed by SIGABRT once both have left their last
    collective (gloo's teardown, "terminate called without an active exception", now and then
    on a loaded machine) is not a failure of what they computed: rank 0's results are there and
    are checked; any other death is."""
    try:
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), out_file), nprocs=2, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT" or not os.path.exists(out_file):
            raise


def worker(rank, world, init_file, out_file):
    with process_group(rank, world, init_file):
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        (text, image, audio), lengths, labels = make_batch()
        part = slice(rank * 4, rank * 4 + 4)
        logits = model(text[part], image[part], audio[part], audio_lengths=lengths[part])
        torch.nn.functional.cross_entropy(logits, labels[part]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)


def test_ddp_gloo_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "grads.pt")
        spawn_two(worker, tmp, out_file)
        ddp_grads = torch.load(out_file)
    model = make_model()
    (text, image, audio), lengths, labels = make_batch()
    torch.nn.functional.cross_entropy(model(text, image, audio, audio_lengths=lengths), labels).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


# --- DTensor: the ops' sharding strategies (mmkernels/ops/sharding.py) ------------------------------

E, H, HKV, L = 32, 4, 2, 6


class TinyAttention(torch.nn.Module):
    """Llama-shaped attention (separate q/k/v/o projections, grouped-query heads) over
    mmkernels.cross_attention: the layout Megatron-style tensor parallelism shards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        d = E // H
        self.q, self.k, self.v, self.o = (torch.nn.Linear(E, n) for n in (E, HKV * d, HKV * d, E))

    def forward(self, x, lengths):
        B, Lx, _ = x.shape
        q, k, v = (p(x).view(B, Lx, -1, E // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = mmkernels.cross_attention(q, k, v, kv_lengths=lengths, causal=True)
        return self.o(out.transpose(1, 2).reshape(B, Lx, E))


def dtensor_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(q=torch.randn(4, H, L, 8, generator=g), k=torch.randn(4, HKV, L + 3, 8, generator=g),
                v=torch.randn(4, HKV, L + 3, 8, generator=g), lengths=torch.tensor([9, 4, 0, 7]),
                x=torch.randn(4, L, E, generator=g), rows=[torch.randn(10, 6, generator=g) for _ in range(2)],
                w=torch.randn(2, 12, generator=g), wa=torch.randn(5, 6, generator=g), wz=torch.randn(5, 12, generator=g),
                q6=torch.randn(4, 6, L, 8, generator=g), k3=torch.randn(4, 3, L + 3, 8, generator=g))


def run_ops(t, dist_of=lambda name, x: x, local=lambda x: x):
    """Every checked result of the DTensor cases, as plain tensors; dist_of places an input."""
    out = {}
    for shard_on, names in (("heads", ("q", "k", "v")), ("batch", ("q", "k", "v"))):
        q, k, v = (dist_of(f"{shard_on}:{n}", t[n].clone().requires_grad_()) for n in names)
        o = mmkernels.cross_attention(q, k, v, kv_lengths=dist_of("replicate", t["lengths"]), causal=True)
        o.square().sum().backward()
        out[f"attention_{shard_on}"] = [local(x) for x in (o, q.grad, k.grad, v.grad)]
    # Grouped-query heads the mesh does not divide (3 key/value heads on 2 ranks): DTensor must
    # not shard them on heads (query heads would meet another group's keys).
    q, k = dist_of("heads:q", t["q6"]), dist_of("heads:k", t["k3"])
    out["attention_uneven_heads"] = [local(mmkernels.cross_attention(q, k, k))]
    a, b = (dist_of("rows", r.clone().requires_grad_()) for r in t["rows"])
    w, wa, wz = (dist_of("replicate", x.clone().requires_grad_()) for x in (t["w"], t["wa"], t["wz"]))
    fused = mmkernels.concat_weighted_fusion([a, b], w, None)
    gated = mmkernels.gated_fusion(a, b, wa, wa, wz)
    (fused.square().sum() + gated.square().sum()).backward()
    out["fusion"] = [local(x) for x in (fused, gated, a.grad, b.grad, w.grad, wa.grad, wz.grad)]
    return out


def gathered(x):
    """x's full value, waited for: full_tensor() may return an AsyncCollectiveTensor whose
    collective is still running, and tearing gloo down under it aborts the process."""
    return x.full_tensor().clone()


def dtensor_worker(rank, world, init_file, out_file):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    with process_group(rank, world, init_file):
        mesh = init_device_mesh("cpu", (world,))
        places = {"heads": [Shard(1)], "batch": [Shard(0)], "rows": [Shard(0)], "replicate": [Replicate()]}

        def dist_of(name, x):
            d = distribute_tensor(x.detach(), mesh, places[name.split(":")[0]])
            return d.requires_grad_() if x.requires_grad else d

        t = dtensor_inputs()
        results = run_ops(t, dist_of, local=gathered)
        # A list op on a 2-D mesh (ranks x 1): rows sharded on the first dim, replicated on the second.
        mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("rows", "inner"))
        a, b = (distribute_tensor(r, mesh2, [Shard(0), Replicate()]).requires_grad_() for r in t["rows"])
        w = distribute_tensor(t["w"], mesh2, [Replicate(), Replicate()]).requires_grad_()
        fused = mmkernels.concat_weighted_fusion([a, b], w, None)
        fused.square().sum().backward()
        results["fusion_2d_mesh"] = [gathered(x) for x in (fused, a.grad, b.grad, w.grad)]
        try:
            q = dist_of("heads:q", t["q"])
            mmkernels.cross_attention(q, q, q, dropout_p=0.1)
            results["dropout"] = "ran"
        except mmkernels.InvalidInput as e:
            results["dropout"] = str(e)
        model = TinyAttention()
        colwise = ColwiseParallel(use_local_output=False)
        parallelize_module(model, mesh, {"q": colwise, "k": colwise, "v": colwise, "o": RowwiseParallel()})
        y = model(t["x"], distribute_tensor(t["lengths"].clamp(max=L), mesh, [Replicate()]))
        y.square().sum().backward()
        results["tensor_parallel"] = [y.clone()] + [gathered(p.grad) for _, p in sorted(model.named_parameters())]
        if rank == 0:
            torch.save(results, out_file)


def test_dtensor_inputs_and_tensor_parallel_match_one_process():
    """Two gloo processes: attention sharded on heads (grouped-query) and on batch, fusion ops on
    rows with replicated weights (whose gradients come back Partial, then summed), and a
    Megatron-style tensor-parallel layer with use_local_output=False (DTensors reach the op)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.pt")
        spawn_two(dtensor_worker, tmp, out_file)
        got = torch.load(out_file, weights_only=False)  # our own file: full_tensor() may give AsyncCollectiveTensors
    t = dtensor_inputs()
    want = run_ops(t)
    a, b, w = (x.clone().requires_grad_() for x in (*t["rows"], t["w"]))
    fused = mmkernels.concat_weighted_fusion([a, b], w, None)
    fused.square().sum().backward()
    want["fusion_2d_mesh"] = [fused, a.grad, b.grad, w.grad]
    model = TinyAttention()
    y = model(t["x"], t["lengths"].clamp(max=L))
    y.square().sum().backward()
    want["tensor_parallel"] = [y] + [p.grad for _, p in sorted(model.named_parameters())]
    assert "dropout_p > 0" in got.pop("dropout")  # refused, not run with the wrong masks
    for case, tensors in want.items():
        for i, (a, b) in enumerate(zip(got[case], tensors)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case}[{i}]: {m}")


class Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.decoder, self.head = torch.nn.TransformerDecoder(layer, num_layers=2), torch.nn.Linear(32, 8)

    def forward(self, tgt, memory):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True))


def make_decoder():
    torch.manual_seed(0)
    model = Decoder()
    mmkernels.patch(model)
    return model


def decoder_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 7, 32, generator=g), torch.randn(4, 5, 32, generator=g), torch.randint(0, 8, (4, 7), generator=g)


def decoder_step(model, tgt, memory, labels):
    return torch.nn.functional.cross_entropy(model(tgt, memory).flatten(0, 1), labels.flatten())


def fsdp_worker(rank, world, init_file, out_file):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    with process_group(rank, world, init_file):
        model = make_decoder()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tgt, memory, labels = decoder_batch()
        part = slice(rank * 2, rank * 2 + 2)
        for _ in range(2):
            optimizer.zero_grad()
            decoder_step(model, tgt[part], memory[part], labels[part]).backward()
            optimizer.step()
        params = {n: gathered(p) for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(params, out_file)


def test_fsdp2_trains_a_patched_decoder_as_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "params.pt")
        spawn_two(fsdp_worker, tmp, out_file)
        got = torch.load(out_file, weights_only=False)
    model = make_decoder()
    assert any("CrossModalAttention" in type(m).__name__ for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        decoder_step(model, *decoder_batch()).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
