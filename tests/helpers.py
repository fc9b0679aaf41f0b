"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "en-ro"


def write_corpus(folder: Path, n_train: int = 300, n_dev: int = 40) -> Path:
    """The first lines of the bundled train and dev sets as a small corpus: train.{en,ro} and
    dev.{en,ro} in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source, n in (("train", "train/train", n_train), ("dev", "dev/newsdev2016", n_dev)):
        for lang in ("en", "ro"):
            with open(DATA / f"{source}.{lang}", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            (folder / f"{name}.{lang}").write_text("".join(lines), encoding="utf-8")
    return folder
