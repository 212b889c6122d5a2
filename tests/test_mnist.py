"""The MNIST example: IDX loader, training that learns, DDP, torchpool vs torch.nn layers."""
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import mnist_data  # noqa: E402
import train_mnist  # noqa: E402
from mnist_data import MNISTError  # noqa: E402

SHARED = ROOT.parent / "shared" / "mnist"  # real MNIST (a 22,699-image training prefix)
NAMES = [n for pair in mnist_data.FILES.values() for n in pair]


def torchpool_available():
    try:
        import torchpool.nn  # noqa: F401
        return True
    except ImportError:
        return False


needs_torchpool = pytest.mark.skipif(not torchpool_available(), reason="torchpool is not built")
POOLS = ["torch", pytest.param("torchpool", marks=needs_torchpool)]


# ------------------------------------------------------------------------------ synthetic IDX
def idx_bytes(array, magic=None):
    """An unsigned-byte IDX file holding `array` (a uint8 tensor)."""
    magic = (0x08 << 8 | array.dim()) if magic is None else magic
    return (struct.pack(">I", magic) + struct.pack(f">{array.dim()}I", *array.shape)
            + array.contiguous().numpy().tobytes())


def write(path, payload):
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def synthetic(n, seed, size=28):
    """Learnable fake digits: class c lights up its own row band, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, size, size), generator=g)
    for c in range(10):
        images[labels == c, 2 + 2 * c: 4 + 2 * c, 4:24] += 180
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_mnist(folder, n_train=37, n_test=11, gz=True, seed=0):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = synthetic(n, seed + (split == "test"))
        img_name, lbl_name = mnist_data.FILES[split]
        if not gz:
            img_name, lbl_name = img_name[:-3], lbl_name[:-3]
        write(folder / img_name, idx_bytes(images))
        write(folder / lbl_name, idx_bytes(labels))
        data[split] = (images, labels)
    return data


@pytest.fixture(scope="session")
def train_dir(tmp_path_factory):
    """Real MNIST when the shared copy exists, else learnable synthetic files."""
    if SHARED.is_dir():
        return str(SHARED)
    folder = tmp_path_factory.mktemp("synthetic_mnist")
    write_mnist(folder, n_train=6400, n_test=1000)
    return str(folder)


# ---------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("gz", [True, False])
def test_loader_reads_counts_from_headers(tmp_path, gz):
    written = write_mnist(tmp_path, n_train=37, n_test=11, gz=gz)
    m = mnist_data.load_mnist(str(tmp_path))
    assert m.train_images.shape == (37, 28, 28) and m.train_images.dtype == torch.uint8
    assert m.test_images.shape == (11, 28, 28)
    assert m.train_labels.dtype == torch.int64
    assert torch.equal(m.train_images, written["train"][0])
    assert torch.equal(m.train_labels, written["train"][1].long())
    assert torch.equal(m.test_images, written["test"][0])
    assert torch.equal(m.test_labels, written["test"][1].long())


def test_loader_default_dir_from_env(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    assert mnist_data.default_data_dir() == str(tmp_path)
    assert mnist_data.load_mnist().train_images.shape[0] == 37
    monkeypatch.delenv("MNIST_DIR")
    assert mnist_data.default_data_dir() == os.path.join("data", "mnist")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_loader_on_shared_mnist():
    m = mnist_data.load_mnist(str(SHARED))
    assert m.train_images.shape == (22699, 28, 28)  # the header's count, not 60,000
    assert m.train_labels.shape == (22699,)
    assert m.test_images.shape == (10000, 28, 28)
    assert m.test_labels.shape == (10000,)
    # the first labels of the official files; every class is present
    assert m.train_labels[:4].tolist() == [5, 0, 4, 1]
    assert m.test_labels[:4].tolist() == [7, 2, 1, 0]
    assert m.train_labels.bincount().min() > 1500
    assert m.test_labels.bincount().tolist()[:3] == [980, 1135, 1032]
    assert int(m.train_images.max()) == 255 and int(m.train_images.min()) == 0


def test_missing_files(tmp_path):
    with pytest.raises(MNISTError, match="not found in .*train-images-idx3-ubyte.gz.*--data-dir"):
        mnist_data.load_mnist(str(tmp_path / "nowhere"))
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MNISTError) as e:
        mnist_data.load_mnist(str(tmp_path))
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    assert "train-images-idx3-ubyte.gz," not in str(e.value).split("Put")[0]


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_data(tmp_path, gz):
    images, _ = synthetic(5, 0)
    path = write(tmp_path / ("x.idx.gz" if gz else "x.idx"), idx_bytes(images)[:-100])
    with pytest.raises(MNISTError, match=r"x\.idx.*truncated: the header says 5 x 28 x 28 = 3920 "
                                         r"bytes of data, the file has 3820"):
        mnist_data.read_idx(str(path), 3)


def test_truncated_header_and_gzip_stream(tmp_path):
    images, _ = synthetic(5, 0)
    path = write(tmp_path / "h.idx", idx_bytes(images)[:10])
    with pytest.raises(MNISTError, match=r"h\.idx: truncated: 10 bytes, the header alone is 16"):
        mnist_data.read_idx(str(path), 3)
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(images))[:-30])
    with pytest.raises(MNISTError, match=r"cut\.gz: corrupt or truncated gzip"):
        mnist_data.read_idx(str(path), 3)
    path = write(tmp_path / "empty", b"")
    with pytest.raises(MNISTError, match="empty: truncated: 0 bytes"):
        mnist_data.read_idx(str(path), 1)


def test_bad_magic(tmp_path):
    images, labels = synthetic(5, 0)
    path = write(tmp_path / "labels.gz", idx_bytes(labels, magic=0x00000803))
    with pytest.raises(MNISTError, match=r"labels\.gz: bad magic number 0x00000803, expected "
                                         r"0x00000801"):
        mnist_data.read_idx(str(path), 1)
    # a gzip file saved without its .gz suffix is not an IDX file either
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    with pytest.raises(MNISTError, match="bad magic number 0x1f8b"):
        mnist_data.read_idx(str(path), 3)


def test_inconsistent_files(tmp_path):
    write_mnist(tmp_path)
    images, labels = synthetic(5, 0)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels[:4]))
    with pytest.raises(MNISTError, match="has 11 images but .*t10k-labels.* has 4 labels"):
        mnist_data.load_mnist(str(tmp_path))
    bad = torch.full((11,), 12, dtype=torch.uint8)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(bad))
    with pytest.raises(MNISTError, match="label 12 out of range"):
        mnist_data.load_mnist(str(tmp_path))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels) + b"\0\0")
    with pytest.raises(MNISTError, match="2 unexpected bytes"):
        mnist_data.load_mnist(str(tmp_path))


def test_download_fails_cleanly_without_network(tmp_path):
    with pytest.raises(MNISTError) as e:
        mnist_data.download_mnist(str(tmp_path), mirrors=("http://127.0.0.1:9/",), timeout=2)
    message = str(e.value)
    assert "could not download" in message and "127.0.0.1:9/train-images-idx3-ubyte.gz" in message
    assert f"not found in {tmp_path}" in message and "Put the four standard IDX files" in message
    assert list(tmp_path.iterdir()) == []  # no partial files left behind


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_download_checks_md5(tmp_path):
    """file:// mirror = the shared folder: its t10k files are the official ones (md5 matches),
    its train files are a prefix (md5 differs, so they must not land)."""
    with pytest.raises(MNISTError, match="train-images-idx3-ubyte.gz: md5 mismatch"):
        mnist_data.download_mnist(str(tmp_path), mirrors=(SHARED.as_uri() + "/",))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_cli_reports_missing_data(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_mnist.py"), "--pool",
                        "torch", "--device", "cpu", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "error: MNIST files not found" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------- model
def test_summary():
    text = train_mnist.summary(train_mnist.build_model("torch"))
    for shape in ("(None, 32, 26, 26)", "(None, 32, 13, 13)", "(None, 32, 11, 11)",
                  "(None, 32, 5, 5)", "(None, 800)", "(None, 128)", "(None, 10)"):
        assert shape in text
    assert "Total params: 113,386" in text and "102,528" in text


def test_torchpool_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchpool.nn", None)  # makes the import fail
    with pytest.raises(train_mnist.SetupError, match="cannot import torchpool.nn.*--pool torch"):
        train_mnist.build_model("torchpool")


def test_unknown_pool_backend():
    with pytest.raises(ValueError, match="pool backend"):
        train_mnist.build_model("keras")


@needs_torchpool
@pytest.mark.parametrize("channels_last", [False, True])
def test_torchpool_model_matches_torch(channels_last):
    """Same weights, same batch: equal logits, loss, parameter and input gradients."""
    torch.manual_seed(0)
    ref = train_mnist.build_model("torch")
    tp = train_mnist.build_model("torchpool")
    tp.load_state_dict(ref.state_dict())
    assert type(tp.pool1).__module__.startswith("torchpool")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, tp = ref.to(memory_format=fmt), tp.to(memory_format=fmt)
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (16,))
    results = []
    for model in (ref, tp):
        xi = x.clone().requires_grad_()
        logits = model(xi)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        results.append((logits, xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0, p0), (l1, g1, p1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], rtol=0, atol=0, msg=name)


@needs_torchpool
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torchpool_layer_matches_torch(dtype, channels_last):
    """The seed model's pooling layer, with ties (post-ReLU zeros) in many windows."""
    import torchpool.nn as tpnn
    torch.manual_seed(0)
    x = torch.randn(8, 32, 26, 26).relu().to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 32, 13, 13).to(dtype)
    outs = []
    for layer in (torch.nn.MaxPool2d(2, 2), tpnn.MaxPool2d(2, 2)):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(grad)
        outs.append((out, xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert "kernel_size=2" in repr(tpnn.MaxPool2d(2, 2))


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("pool", POOLS)
def test_training_learns(train_dir, tmp_path, pool):
    out = tmp_path / "run"
    metrics = train_mnist.main([
        "--data-dir", train_dir, "--pool", pool, "--device", "cpu", "--epochs", "1",
        "--limit-train", "6400", "--limit-test", "1000", "--no-progress", "--out", str(out)])
    (epoch,) = metrics["epochs"]
    assert epoch["train_images"] == 6400
    assert metrics["final_test_acc"] > 0.8, metrics["epochs"]  # chance is 0.1
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["final_test_acc"] == metrics["final_test_acc"]
    assert saved["config"]["pool"] == pool and saved["curve"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    model = train_mnist.build_model("torch")  # pooling has no weights: checkpoints interchange
    model.load_state_dict(ckpt["model"])
    assert ckpt["epoch"] == 1


@pytest.mark.parametrize("pool", POOLS)
def test_amp_channels_last_runs(train_dir, tmp_path, pool):
    metrics = train_mnist.main([
        "--data-dir", train_dir, "--pool", pool, "--device", "cpu", "--epochs", "1", "--amp",
        "--channels-last", "--limit-train", "320", "--limit-test", "100", "--no-progress",
        "--out", str(tmp_path)])
    (epoch,) = metrics["epochs"]
    assert metrics["config"]["amp"] and metrics["config"]["channels_last"]
    assert torch.isfinite(torch.tensor(epoch["train_loss"])) and epoch["train_acc"] > 0.1


def test_benchmark_reports_both_backends(train_dir, tmp_path):
    result = train_mnist.main([
        "--data-dir", train_dir, "--device", "cpu", "--benchmark", "--bench-steps", "3",
        "--bench-warmup", "1", "--bench-rounds", "1", "--limit-train", "256",
        "--limit-test", "10", "--out", str(tmp_path)])
    expected = {"torch", "torchpool"} if torchpool_available() else {"torch"}
    assert set(result["images_per_s"]) == expected
    assert all(v > 0 for v in result["images_per_s"].values())
    assert json.loads((tmp_path / "benchmark.json").read_text())["images_per_s"]


def test_ddp_two_cpu_processes(train_dir, tmp_path):
    pool = "torchpool" if torchpool_available() else "torch"
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / "train_mnist.py"), "--data-dir", train_dir, "--pool", pool,
         "--device", "cpu", "--epochs", "1", "--limit-train", "1000", "--limit-test", "300",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("Total params") == 1  # rank 0 alone prints
    assert r.stdout.count("epoch 1/1:") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2
    (epoch,) = metrics["epochs"]
    assert epoch["train_images"] == 1000  # 500 per process, counted over both
    assert 0.0 <= epoch["test_acc"] <= 1.0
    assert (out / "checkpoint.pt").is_file()
