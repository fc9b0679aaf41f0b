"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from pathlib import Path

import torch

from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer

DATA = Path(__file__).resolve().parents[1] / "data" / "en-ro"

PAD, BOS, EOS = 0, 2, 3
VOCAB = 40  # of the random search models


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


def random_model(attention: str = "diff", seed: int = 0, vocab: int = VOCAB) -> Seq2SeqTransformer:
    """A float64 random model whose hypotheses end at varied lengths."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=2, ffn_dim=64, dropout=0.0, attention=attention,
                      tie_embeddings=False)
    model = Seq2SeqTransformer(cfg).double().eval()
    with torch.no_grad():
        model.embed.weight.mul_(0.5)  # let attention matter next to the token embedding
        model.output_proj.weight[EOS] *= 3.0  # make eos likely somewhere
    return model


def random_batch(batch: int = 8, vocab: int = VOCAB, seed: int = 1, min_len: int = 2,
                 max_len: int = 9) -> torch.Tensor:
    """(B, S) sources of different lengths: pieces + [eos], right-padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    src = torch.full((batch, int(lengths.max()) + 1), PAD, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        src[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        src[i, n] = EOS
    return src


def cli_translations(model_dir: Path, folder: Path, lines: list[str], beam_size: int,
                     *variants: list[str]) -> list[str]:
    """``cli.py translate`` of ``lines`` and two blank lines, once per list of extra flags in
    ``variants``: each run's output file."""
    from seq2seq_diff.cli import main

    src = folder / "in.en"
    src.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    outputs = []
    for i, flags in enumerate(variants):
        out = folder / f"out{i}.ro"
        assert main(["translate", "--model", str(model_dir), "--input", str(src), "--output",
                     str(out), "--beam-size", str(beam_size), "--max-tokens", "64", "--quiet",
                     *flags]) == 0
        outputs.append(out.read_text(encoding="utf-8"))
    return outputs
