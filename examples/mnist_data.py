"""MNIST from the standard IDX files (gzip-compressed or not), with an optional download.

The counts come from the file headers, never assumed: a subset of the training set (for example
the first 22,699 images) loads like the full 60,000. Every problem (a missing file, a truncated
file, a bad magic number, images and labels that disagree) raises MNISTError naming the file and
the problem.

    from mnist_data import load_mnist
    data = load_mnist("data/mnist")          # or load_mnist("data/mnist", download=True)
    data.train_images   # uint8 tensor (N, 28, 28)
    data.train_labels   # int64 tensor (N,)
"""
import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass

import torch

# Public mirrors of the original files (the first is the one torchvision uses).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# split -> (images file, labels file); md5 of the official gzip files.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses

# Keras's usual normalisation is /255; these are MNIST's mean and std after it.
MEAN, STD = 0.1307, 0.3081


class MNISTError(RuntimeError):
    """A missing, truncated or malformed MNIST file."""


@dataclass
class MNIST:
    train_images: torch.Tensor  # uint8 (N, 28, 28)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor


def default_data_dir():
    """$MNIST_DIR when set, else ./data/mnist."""
    return os.environ.get("MNIST_DIR") or os.path.join("data", "mnist")


def _read_bytes(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise MNISTError(f"{path}: corrupt or truncated gzip data ({e})") from None
    except OSError as e:
        raise MNISTError(f"{path}: cannot read ({e.strerror or e})") from None


def read_idx(path, ndim):
    """Reads an unsigned-byte IDX file with `ndim` dimensions into a uint8 tensor.

    The header is: two zero bytes, the type code (0x08 = unsigned byte), the number of
    dimensions, then each dimension as a big-endian int32; the data follows, one byte per
    element, and must be exactly as long as the dimensions say.
    """
    data = _read_bytes(path)
    expected_magic = (IDX_UBYTE << 8) | ndim
    if len(data) < 4:
        raise MNISTError(f"{path}: truncated: {len(data)} bytes, not even an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise MNISTError(
            f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(an IDX file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''}); "
            "is this an MNIST file, and is it decompressed if it has no .gz suffix?")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTError(f"{path}: truncated: {len(data)} bytes, the header alone is {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for d in dims:
        count *= d
    body = len(data) - header
    if body < count:
        raise MNISTError(
            f"{path}: truncated: the header says {' x '.join(map(str, dims))} = {count} bytes "
            f"of data, the file has {body}")
    if body > count:
        raise MNISTError(
            f"{path}: {body - count} unexpected bytes after the {count} bytes of data that the "
            f"header ({' x '.join(map(str, dims))}) announces")
    if count == 0:
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def find_file(data_dir, name):
    """The path of `name` (e.g. 'train-images-idx3-ubyte.gz') in data_dir, gzip or not, or None.

    Also looks in torchvision's layout (data_dir/MNIST/raw) so an existing copy is reused.
    """
    stem = name[:-3] if name.endswith(".gz") else name
    for folder in (data_dir, os.path.join(data_dir, "MNIST", "raw")):
        for candidate in (stem + ".gz", stem):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def _missing_message(data_dir, missing, suggest_download=True):
    return (
        f"MNIST files not found in {os.path.abspath(data_dir)}: {', '.join(missing)}. Put the "
        f"four standard IDX files ({', '.join(n for pair in FILES.values() for n in pair)}; "
        "gzip-compressed or not) in that folder, or point --data-dir / $MNIST_DIR at the folder "
        "that has them" + (", or pass --download where a network exists." if suggest_download
                           else "."))


def load_split(data_dir, split):
    """(images uint8 (N, H, W), labels int64 (N,)) of 'train' or 'test'."""
    image_name, label_name = FILES[split]
    paths = [find_file(data_dir, n) for n in (image_name, label_name)]
    missing = [n for n, p in zip((image_name, label_name), paths) if p is None]
    if missing:
        raise MNISTError(_missing_message(data_dir, missing))
    images = read_idx(paths[0], 3)
    labels = read_idx(paths[1], 1)
    if images.shape[0] != labels.shape[0]:
        raise MNISTError(
            f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) > 9:
        raise MNISTError(f"{paths[1]}: label {int(labels.max())} out of range 0..9")
    return images, labels.long()


def load_mnist(data_dir=None, download=False):
    """Loads both splits from data_dir (default: $MNIST_DIR, else ./data/mnist)."""
    data_dir = data_dir or default_data_dir()
    if download:
        download_mnist(data_dir)
    missing = [n for pair in FILES.values() for n in pair if find_file(data_dir, n) is None]
    if missing:
        raise MNISTError(_missing_message(data_dir, missing))
    train = load_split(data_dir, "train")
    test = load_split(data_dir, "test")
    return MNIST(train[0], train[1], test[0], test[1])


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url, dest, md5, timeout):
    """Downloads url to dest through a temporary file; only a file with the right md5 lands."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        got = _md5(tmp)
        if got != md5:
            raise MNISTError(f"md5 mismatch: got {got}, expected {md5}")
        os.chmod(tmp, 0o644)  # mkstemp made it private
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_mnist(data_dir=None, mirrors=MIRRORS, timeout=30):
    """Downloads the files missing from data_dir, trying each mirror in turn; checks md5.

    Files already present (gzip or not) are kept as they are, whatever their size: a local
    subset is a valid dataset. Raises MNISTError, saying where to put the files, when a file can
    be fetched from no mirror (for example without a network).
    """
    data_dir = data_dir or default_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    failed = {}
    for name, md5 in MD5.items():
        if find_file(data_dir, name) is not None:
            continue
        errors = []
        for mirror in mirrors:
            try:
                _fetch(mirror + name, os.path.join(data_dir, name), md5, timeout)
                print(f"downloaded {mirror + name}")
                break
            except Exception as e:  # network errors come in many types; report them all
                errors.append(f"  {mirror + name}: {getattr(e, 'reason', None) or e}")
        else:
            failed[name] = errors
    if failed:
        raise MNISTError(
            "could not download from any mirror:\n"
            + "\n".join(line for errors in failed.values() for line in errors) + "\n"
            + _missing_message(data_dir, list(failed), suggest_download=False))


def to_float(images):
    """uint8 (N, H, W) -> normalised float32 (N, 1, H, W)."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
