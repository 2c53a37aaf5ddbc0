"""The data sets protobench knows, what their raw files must look like, and where they live."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from protobench.errors import ConfigError

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
RAW_FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
# Each images file and the labels file that must hold as many entries.
RAW_PAIRS: tuple[tuple[str, str], ...] = ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS))


@dataclass(frozen=True)
class RawSpec:
    """A data set kept as the four uncompressed idx files that torchvision reads."""

    name: str
    folder: str  # torchvision's class name, which is also its folder under the data root
    md5: dict[str, str]  # uncompressed file name -> MD5 of its bytes
    image_shape: tuple[int, int] = (28, 28)
    n_classes: int = 10
    # Base URLs serving `<name>.gz`, tried in order: torchvision's `mirrors` for the same class,
    # copied here because importing torchvision only to read them costs seconds.
    mirrors: tuple[str, ...] = ()
    debian_dir: Path | None = None  # system folder of a Debian package shipping the .gz files
    debian_package: str | None = None

    def raw_dir(self, root: Path) -> Path:
        """Folder of the raw files under the data root, where torchvision looks for them."""
        return root / self.folder / "raw"


RAW_SPECS: dict[str, RawSpec] = {
    "mnist": RawSpec(
        name="mnist",
        folder="MNIST",
        md5={
            TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
            TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
            TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
            TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": RawSpec(
        name="fashion-mnist",
        folder="FashionMNIST",
        md5={
            TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
            TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
            TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        debian_dir=Path("/usr/share/datasets/fashion-mnist"),
        debian_package="dataset-fashion-mnist",
    ),
}


def check_name(name: object) -> str:
    """Return `name` if it is a known data set, else raise ConfigError listing the known ones."""
    if not isinstance(name, str) or name not in DATASET_NAMES:
        raise ConfigError(
            f"dataset name {name!r} is not known; allowed: {', '.join(DATASET_NAMES)}"
        )
    return name


def default_data_dir() -> Path:
    """Where data sets are kept: $PROTOBENCH_DATA_DIR, else the XDG cache folder."""
    explicit = os.environ.get("PROTOBENCH_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    if cache and Path(cache).is_absolute():
        return Path(cache) / "protobench" / "data"
    return Path.home() / ".cache" / "protobench" / "data"


def resolve_data_dir(data_dir: Path | str | None) -> Path:
    """The data root to use: the one given, else the default."""
    if data_dir is None:
        return default_data_dir()
    if not isinstance(data_dir, (str, os.PathLike)) or str(data_dir) == "":
        raise ConfigError(f"data_dir {data_dir!r} is not a folder path")
    return Path(data_dir).expanduser()
