"""DistributedDataParallel over 2 gloo processes (CPU, loopback) gives the gradients of one
process on the concatenated batch. FSDP2 needs GPUs and is not run here."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmkernels.models import MultimodalClassifier


def make_batch(B=8):
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(0, 1000, (B, 12), generator=g), torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 10, 40, generator=g))
    return args, torch.randint(1, 11, (B,), generator=g), torch.randint(0, 10, (B,), generator=g)


def make_model():
    torch.manual_seed(0)
    return MultimodalClassifier(fusion="cross_attention")


def worker(rank, world, init_file, out_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    (text, image, audio), lengths, labels = make_batch()
    part = slice(rank * 4, rank * 4 + 4)
    logits = model(text[part], image[part], audio[part], audio_lengths=lengths[part])
    torch.nn.functional.cross_entropy(logits, labels[part]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)
    # Both ranks leave together: a rank tearing down gloo while the other still talks to it
    # aborted now and then ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gloo_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "grads.pt")
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), out_file), nprocs=2, join=True)
        ddp_grads = torch.load(out_file)
    model = make_model()
    (text, image, audio), lengths, labels = make_batch()
    torch.nn.functional.cross_entropy(model(text, image, audio, audio_lengths=lengths), labels).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
