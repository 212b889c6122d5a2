"""Trains the seed MNIST CNN (the classic Keras example) with torchpool's pooling layers.

    python examples/train_mnist.py --epochs 3                      # torchpool pooling
    python examples/train_mnist.py --epochs 3 --pool torch         # torch.nn pooling, to compare
    python examples/train_mnist.py --benchmark                     # training images/s, both
    torchrun --nproc_per_node=2 examples/train_mnist.py            # data-parallel (DDP)

The data comes from --data-dir (default $MNIST_DIR, else ./data/mnist): the four standard IDX
files, gzip-compressed or not (--download fetches them where a network exists). Writes
checkpoint.pt, metrics.json and curves.png to --out.

Under torchrun, --batch-size is per process (the global batch is N x batch-size), gloo is used
on the CPU and nccl on CUDA, and only rank 0 prints and writes files.
"""
import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
# An uninstalled checkout (torchpool built in place) works too; an installed torchpool wins.
sys.path.append(os.path.dirname(_HERE))

import mnist_data  # noqa: E402

BACKENDS = ("torchpool", "torch")


class SetupError(RuntimeError):
    """A backend or device that this machine cannot provide."""


# ----------------------------------------------------------------------------------------- model
def pool_class(backend):
    """The MaxPool2d class of `backend`; torchpool is imported only when asked for."""
    if backend == "torch":
        return nn.MaxPool2d
    if backend == "torchpool":
        try:
            import torchpool.nn as tpnn
        except ImportError as e:
            raise SetupError(
                f"--pool torchpool: cannot import torchpool.nn ({e}). Build it first "
                "(pip install -e . --no-build-isolation) or run with --pool torch.") from e
        return tpnn.MaxPool2d
    raise ValueError(f"pool backend must be one of {BACKENDS}, got {backend!r}")


def build_model(pool="torchpool"):
    """Keras's MNIST CNN: 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5 -> 800 -> 128 -> 10."""
    MaxPool2d = pool_class(pool)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, kernel_size=3)),
        ("relu1", nn.ReLU()),
        ("pool1", MaxPool2d(kernel_size=2, stride=2)),
        ("conv2", nn.Conv2d(32, 32, kernel_size=3)),
        ("relu2", nn.ReLU()),
        ("pool2", MaxPool2d(kernel_size=2, stride=2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 5 * 5, 128)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),  # logits; the softmax lives in the cross-entropy loss
    ]))


def summary(model, input_shape=(1, 28, 28), device="cpu", name="seed_cnn"):
    """A Keras-style table: each layer's output shape (None = batch) and parameter count."""
    rows = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, n=n: rows.append((n, mod, tuple(out.shape[1:]))))
        for n, m in model.named_children()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()

    def kind(mod):
        top = type(mod).__module__.split(".")[0]
        return type(mod).__name__ if top == "torch" else f"{top}.{type(mod).__name__}"

    line, thick = "_" * 72, "=" * 72
    out = [f'Model: "{name}"', line, f" {'Layer (type)':<34}{'Output Shape':<24}{'Param #':>12}",
           thick]
    for n, mod, shape in rows:
        params = sum(p.numel() for p in mod.parameters())
        out.append(f" {f'{n} ({kind(mod)})':<34}{str((None, *shape)):<24}{params:>12,}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    out += [thick, f"Total params: {total:,} ({size / 1024:.2f} KB)",
            f"Trainable params: {trainable:,}", f"Non-trainable params: {total - trainable:,}",
            line]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=mnist_data.default_data_dir(),
                   help="folder with the MNIST IDX files ($MNIST_DIR, else ./data/mnist)")
    p.add_argument("--download", action="store_true",
                   help="download missing files (md5-checked) from the public mirrors")
    p.add_argument("--pool", choices=BACKENDS, default="torchpool", help="pooling layers")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per process under torchrun")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use the first N training images")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="use the first N test images")
    p.add_argument("--out", default=os.path.join("runs", "mnist"),
                   help="folder for checkpoint.pt, metrics.json, curves.png (benchmark.json)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--benchmark", action="store_true",
                   help="measure training images/s of both pooling backends instead of training")
    p.add_argument("--bench-steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--bench-warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--bench-rounds", type=int, default=3,
                   help="measurements per backend, alternating backends; the median is reported")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "bench_steps", "bench_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("limit_train", "limit_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


# -------------------------------------------------------------------------------- distribution
class Dist:
    """rank / world size / device; a single process is world size 1."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if device_arg is None:
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SetupError(f"--device {device_arg}: this torch has no usable CUDA device")
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.enabled else 0)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, **kwargs)
        self.main = self.rank == 0

    def sum(self, values):
        """Sums a list of floats over all processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def print(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def close(self, ok=True):
        """Ends the process group; after a clean run, only once every process got here (a
        process that tears its connections down while another is still in a collective can
        make that one abort at exit)."""
        if self.enabled and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------- training
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(model, args, d):
    model = model.to(d.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap(model, d):
    if not d.enabled:
        return model
    device_ids = [d.device] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def batches(sampler, batch_size, device):
    """The sampler's indices (this process's share, reshuffled per epoch) cut into batches."""
    idx = torch.tensor(list(sampler), dtype=torch.long, device=device)
    return idx.split(batch_size)


class Trainer:
    def __init__(self, model, args, d):
        self.model, self.args, self.d = model, args, d
        self.opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        self.autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if args.amp
                         else nullcontext())

    def inputs(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x

    def step(self, x, y):
        """One optimizer step; returns (summed loss, correct) as tensors, without syncing."""
        self.model.train()
        with self.autocast:
            logits = self.model(self.inputs(x))
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach() * y.numel(), (logits.argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, images, labels, batch_size=1000):
        """(loss, accuracy) on the whole set; each process takes every world-th image."""
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        model.eval()
        images, labels = images[self.d.rank::self.d.world], labels[self.d.rank::self.d.world]
        loss = torch.zeros((), dtype=torch.float64, device=self.d.device)
        correct = torch.zeros((), dtype=torch.long, device=self.d.device)
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            with self.autocast:
                logits = model(self.inputs(x)).float()
            loss += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        loss, correct, count = self.d.sum([loss.item(), correct.item(), labels.numel()])
        return loss / count, correct / count


def train(args, d, data):
    torch.manual_seed(args.seed)
    model = prepare(build_model(args.pool), args, d)
    d.print(summary(model, device=d.device) + f"\npooling: {args.pool} | device: {d.device}"
            f" | processes: {d.world} | amp: {args.amp} | channels_last: {args.channels_last}"
            f"\ntrain images: {len(data['train_y'])} | test images: {len(data['test_y'])}"
            f" | batch: {args.batch_size}{' per process' if d.enabled else ''}")
    trainer = Trainer(wrap(model, d), args, d)
    sampler = DistributedSampler(range(len(data["train_y"])), num_replicas=d.world,
                                 rank=d.rank, shuffle=True, seed=args.seed)
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; train without it
        tqdm = None

    metrics = {"config": {**vars(args), "world_size": d.world, "device": str(d.device),
                          "torch": torch.__version__, "train_images": len(data["train_y"]),
                          "test_images": len(data["test_y"])},
               "epochs": [], "curve": []}
    if d.main:
        os.makedirs(args.out, exist_ok=True)
    log_every = 50  # steps per point of the training curve
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        steps = batches(sampler, args.batch_size, d.device)
        show = d.main and not args.no_progress and tqdm is not None
        bar = tqdm(total=len(steps), desc=f"epoch {epoch}/{args.epochs}", unit="batch",
                   dynamic_ncols=True, mininterval=0.5, leave=True) if show else None
        _sync(d.device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        correct = torch.zeros((), dtype=torch.long, device=d.device)
        seen = 0
        win = [0.0, 0, 0]  # loss, correct, count since the last curve point
        for i, idx in enumerate(steps, 1):
            l, c = trainer.step(data["train_x"][idx], data["train_y"][idx])
            loss_sum += l
            correct += c
            seen += idx.numel()
            if i % log_every == 0 or i == len(steps):  # syncs the device only here
                ls, cs = loss_sum.item(), correct.item()
                metrics["curve"].append({
                    "epoch": epoch - 1 + i / len(steps),
                    "loss": (ls - win[0]) / (seen - win[2]),
                    "acc": (cs - win[1]) / (seen - win[2])})
                win = [ls, cs, seen]
                if bar is not None:
                    bar.set_postfix(loss=f"{ls / seen:.4f}", acc=f"{cs / seen:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
        _sync(d.device)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        tr_loss, tr_correct, tr_seen = d.sum([loss_sum.item(), correct.item(), seen])
        t1 = time.perf_counter()
        te_loss, te_acc = trainer.evaluate(data["test_x"], data["test_y"])
        eval_seconds = time.perf_counter() - t1
        record = {"epoch": epoch, "train_loss": tr_loss / tr_seen,
                  "train_acc": tr_correct / tr_seen,
                  "test_loss": te_loss, "test_acc": te_acc, "train_images": int(tr_seen),
                  "train_seconds": seconds,
                  "eval_seconds": eval_seconds, "images_per_s": tr_seen / seconds}
        metrics["epochs"].append(record)
        d.print(f"epoch {epoch}/{args.epochs}: loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.2%} | test loss {te_loss:.4f} acc {te_acc:.2%} | "
                f"{seconds:.1f} s ({record['images_per_s']:.0f} images/s), "
                f"eval {eval_seconds:.1f} s")
        if d.main:
            torch.save({"model": model.state_dict(), "optimizer": trainer.opt.state_dict(),
                        "epoch": epoch, "test_acc": te_acc, "args": vars(args)},
                       os.path.join(args.out, "checkpoint.pt"))
            metrics["final_test_acc"] = te_acc
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    if d.main:
        plot(metrics, os.path.join(args.out, "curves.png"))
        d.print(f"wrote {os.path.join(args.out, 'checkpoint.pt')}, metrics.json, curves.png")
    return metrics


def plot(metrics, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path}")
        return
    ep = [r["epoch"] for r in metrics["epochs"]]
    cx = [p["epoch"] for p in metrics["curve"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    window = "train (50-batch windows" + (", rank 0)" if metrics["config"]["world_size"] > 1
                                          else ")")
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(cx, [p[key] for p in metrics["curve"]], lw=1, alpha=0.5, label=window)
        ax.plot(ep, [r[f"train_{key}"] for r in metrics["epochs"]], "o-", label="train (epoch)")
        ax.plot(ep, [r[f"test_{key}"] for r in metrics["epochs"]], "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    c = metrics["config"]
    fig.suptitle(f"MNIST seed CNN, {c['pool']} pooling, {c['device']} x{c['world_size']}, "
                 f"batch {c['batch_size']}, {c['train_images']} training images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------- benchmark
def benchmark(args, d, data):
    """Training images/s (all processes together) of each pooling backend, same batches."""
    g = torch.Generator().manual_seed(args.seed)
    n = len(data["train_y"])
    total = args.bench_warmup + args.bench_steps
    order = torch.randint(0, n, (total, args.batch_size), generator=g).to(d.device)
    trainers, errors = {}, {}
    for backend in BACKENDS:
        torch.manual_seed(args.seed)
        try:
            trainers[backend] = Trainer(wrap(prepare(build_model(backend), args, d), d), args, d)
        except SetupError as e:
            errors[backend] = str(e)
            d.print(f"{backend}: skipped: {e}")

    def measure(trainer):
        for i in range(total):
            if i == args.bench_warmup:
                _sync(d.device)
                t0 = time.perf_counter()
            trainer.step(data["train_x"][order[i]], data["train_y"][order[i]])
        _sync(d.device)
        return args.bench_steps * args.batch_size * d.world / (time.perf_counter() - t0)

    runs = {b: [] for b in trainers}
    for _ in range(args.bench_rounds):
        for backend, trainer in trainers.items():
            runs[backend].append(measure(trainer))
    result = {"config": {**vars(args), "world_size": d.world, "device": str(d.device),
                         "torch": torch.__version__},
              "images_per_s": {b: sorted(r)[len(r) // 2] for b, r in runs.items()},
              "runs": runs, "skipped": errors}
    d.print(f"training images/s, batch {args.batch_size} x {d.world} process(es) on {d.device}, "
            f"amp {args.amp}, channels_last {args.channels_last}, median of {args.bench_rounds} x "
            f"{args.bench_steps} steps:")
    for b, v in result["images_per_s"].items():
        d.print(f"  {b:<10} {v:>10.0f}   (runs: {', '.join(f'{x:.0f}' for x in runs[b])})")
    if len(result["images_per_s"]) == 2:
        ips = result["images_per_s"]
        result["speedup"] = ips["torchpool"] / ips["torch"]
        d.print(f"  torchpool / torch: {result['speedup']:.3f}x")
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "benchmark.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


# -------------------------------------------------------------------------------------- main
def load(args, d):
    """Both splits as normalised float tensors (N, 1, 28, 28) and int64 labels on the device."""
    if args.download and d.main:
        mnist_data.download_mnist(args.data_dir)
    if args.download and d.enabled:
        dist.barrier()
    m = mnist_data.load_mnist(args.data_dir)
    for split, images in (("train", m.train_images), ("test", m.test_images)):
        if tuple(images.shape[1:]) != (28, 28):
            raise mnist_data.MNISTError(
                f"{args.data_dir}: {split} images are {tuple(images.shape[1:])}, the model "
                "takes 28 x 28")
    tr, te = slice(0, args.limit_train), slice(0, args.limit_test)
    return {"train_x": mnist_data.to_float(m.train_images[tr]).to(d.device),
            "train_y": m.train_labels[tr].to(d.device),
            "test_x": mnist_data.to_float(m.test_images[te]).to(d.device),
            "test_y": m.test_labels[te].to(d.device)}


def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    ok = False
    try:
        data = load(args, d)
        result = benchmark(args, d, data) if args.benchmark else train(args, d, data)
        ok = True
        return result
    finally:
        d.close(ok)


if __name__ == "__main__":
    try:
        main()
    except (mnist_data.MNISTError, SetupError) as e:
        sys.exit(f"error: {e}")
