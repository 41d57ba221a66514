"""Find a torchvision dataset on disk, or download it when asked; a clear error otherwise."""

from __future__ import annotations

import contextlib
import os
import socket
import tarfile
from urllib.error import URLError

from torchvision.datasets.utils import check_integrity

from mfcli.errors import MFError

DOWNLOAD_TIMEOUT_S = 20  # urllib waits forever by default; a firewalled machine would hang silently


@contextlib.contextmanager
def _network_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def local_archives(cls, root: str) -> list[tuple[str, str]]:
    """(path, md5) of the archives torchvision would download for ``cls``, where it would put them."""
    if hasattr(cls, "tgz_md5"):  # CIFAR-10/100: one tarball in ROOT
        return [(os.path.join(root, cls.filename), cls.tgz_md5)]
    if hasattr(cls, "resources"):  # MNIST family: gzipped idx files in ROOT/<Class>/raw
        return [(os.path.join(root, cls.__name__, "raw", name), md5) for name, md5 in cls.resources]
    return []


def load_torchvision(cls, *, root: str, train: bool, download: bool, what: str, layout: str):
    """``cls(root, train=train)`` from local files, downloading only when allowed and needed.

    Archives already in place (checked against torchvision's md5s) are extracted even with
    ``download=False``: nothing is fetched then, and users can copy the archives they have.

    Args:
        what: the dataset's name for messages.
        layout: where the files go, in terms of ROOT, for the error message.
    """
    root = os.path.abspath(os.path.expanduser(root))
    split = "train" if train else "test"
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        pass
    archives = local_archives(cls, root)
    archives_in_place = bool(archives) and all(check_integrity(path, md5) for path, md5 in archives)
    message = (
        f"{what} ({split} split) was not found under {root}. Put the files at {layout}, "
        f"where ROOT is data.root (now {root})"
    )
    if not (download or archives_in_place):
        raise MFError(message + ", or set data.download=true on a machine with internet access.")
    try:
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            return cls(root, train=train, download=True)
    except (RuntimeError, OSError, URLError, tarfile.TarError, EOFError) as err:
        cause = " ".join(str(err).split())
        raise MFError(f"{message}. Fetching it failed ({type(err).__name__}: {cause}).") from err
