"""Speed side by side with the peers: our DIFF model, our standard twin, HF MarianMT, CTranslate2.

All engines get the same dimensions (random weights), the same batch of random source sentences
and exactly the same number of output tokens (eos banned before, forced at ``--out-len``), and
run interleaved: medians over ``--repeats`` timed runs after a warm-up. Ours and HF share this
process; each CTranslate2 engine runs in a child process that this one drives in turn (its
bundled OpenMP and oneDNN, run beside torch, changed our engines' speed). Printed: training
tokens/s (source + target, forward + backward + a fused AdamW step, what HF's Trainer and ours
run; ours through oneDNN where ``cpu_gemm: auto`` takes it, and then with torch's GEMM beside,
"mkl" rows) and decoding output tokens/s (greedy and beam), each with its ratio to HF. Peers
come with ``pip install -e .[bench]`` (transformers, ctranslate2); an engine whose package is
missing is skipped.

Our SwiGLU feed-forward has three matrices, HF's ReLU/SiLU two: ``--ffn-dim`` is HF's width and
ours is 2/3 of it (rounded up to 8), so the parameters and FLOPs match.

    python benchmarks/peers.py                       # d_model 256, 3+3 (ANCHORS.md)
    python benchmarks/peers.py --d-model 512 --layers 6 --heads 8 --ffn-dim 2048 --repeats 5
    python benchmarks/peers.py --device cuda --dtype bfloat16 --batch 128
    python benchmarks/peers.py --memory --batch 64  # peak RSS, training and beam 5, per engine

On the CPU our models decode as ``translate`` does (``translator.inference_model``): in float32
with oneDNN-packed linear weights where packing pays on this CPU, else with the weights stored
input-major (``seq2seq_diff.packed``; "as trained" rows: the training model itself, unfused and
row-major, on torch's default GEMM); with int8 dynamic quantisation (``translate --int8``);
on CPUs with AVX512-BF16/AMX in bf16 (``translate --bf16``; HF's ``model.to(bfloat16)`` beside
it); and with compiled decoding steps in float32 and bf16 (``translate --compile``; compiled
during the untimed warm-up round) and with searches compiled ahead of time (``translate --aot``
in float32, bf16 and int8 with activations quantised per row; built during the warm-up of a
first run, loaded by later ones).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from seq2seq_diff.loss import smoothed_cross_entropy  # noqa: E402
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer  # noqa: E402
from seq2seq_diff.onednn import pays, use_onednn  # noqa: E402
from seq2seq_diff.quantize import cpu_bf16_native, precision_context  # noqa: E402
from seq2seq_diff.search import beam_search, greedy_search  # noqa: E402
from seq2seq_diff.translator import inference_model  # noqa: E402

PAD, UNK, BOS, EOS = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def ours(kind: str, args) -> Seq2SeqTransformer:
    ffn = -(-2 * args.ffn_dim // 3 // 8) * 8
    config = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_heads=args.heads,
                         num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                         ffn_dim=ffn, dropout=0.1, attention=kind)
    return Seq2SeqTransformer(config)


def marian(args):
    from transformers import MarianConfig, MarianMTModel

    # Laid out as real Marian models: <pad> appended as the last id (CTranslate2 expects it).
    config = MarianConfig(
        vocab_size=args.vocab + 1, decoder_vocab_size=args.vocab + 1, d_model=args.d_model,
        encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn_dim, decoder_ffn_dim=args.ffn_dim, dropout=0.1,
        max_position_embeddings=512, pad_token_id=args.vocab, eos_token_id=EOS,
        decoder_start_token_id=args.vocab, forced_eos_token_id=None, bad_words_ids=None,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    return MarianMTModel(config)


def ctranslate2_dir(model, args, out: Path) -> Path:
    """Convert the HF model with CTranslate2's own converter (a Marian tokenizer is needed)."""
    import json

    import sentencepiece as spm
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianTokenizer

    hf_dir = out / "hf"
    model.save_pretrained(hf_dir)
    spm_path = out / "spm.model"
    text = out / "corpus.txt"
    text.write_text((ROOT / "data/en-ro/train/train.en").read_text(encoding="utf-8"))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spm"),
                                   vocab_size=args.vocab, pad_id=PAD, unk_id=UNK, bos_id=BOS,
                                   eos_id=EOS, minloglevel=2, input_sentence_size=100000)
    processor = spm.SentencePieceProcessor(model_file=str(spm_path))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    vocab = {("<pad0>" if piece == "<pad>" else piece): i for piece, i in vocab.items()}
    vocab["<pad>"] = args.vocab
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(str(spm_path), str(spm_path), str(out / "vocab.json"),
                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(hf_dir)
    ct2_dir = out / "ct2"
    TransformersConverter(str(hf_dir)).convert(str(ct2_dir), force=True)
    return ct2_dir


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


def make_batch(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab, (args.batch, args.src_len), generator=generator)
    src[:, -1] = EOS
    tgt = torch.randint(4, args.vocab, (args.batch, args.out_len + 1), generator=generator)
    tgt[:, 0], tgt[:, -1] = BOS, EOS
    return src, tgt[:, :-1], tgt[:, 1:]


def train_step_fn(name: str, model, args) -> Callable[[], None]:
    src, tgt_in, tgt_out = (t.to(args.device) for t in make_batch(args))
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as both trainers
    if args.compile == "all" or (args.compile == "ours" and name != "hf"):
        model = torch.compile(model)
    autocast = (torch.autocast(args.device, dtype=getattr(torch, args.dtype))
                if args.dtype != "float32" else contextlib.nullcontext())
    if name == "hf":
        mask = torch.ones_like(src, dtype=torch.bool)

        def loss() -> torch.Tensor:  # as HF's trainer: label-smoothed cross-entropy
            out = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
            return F.cross_entropy(out.float().flatten(0, 1), tgt_out.flatten(),
                                   label_smoothing=0.1)
    else:
        def loss() -> torch.Tensor:  # as our trainer (lit_module.TranslationModule._loss)
            out = model(src, tgt_in)
            return smoothed_cross_entropy(out.float().flatten(0, 1), tgt_out.flatten(),
                                          0.1)[0].mean()

    def step() -> None:
        with autocast:
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def decode_fn(name: str, model, args, beam: int, precision: str = "none") -> Callable[[], list]:
    """Decode the batch with ``model``; ``precision`` 'bf16' runs ours under bf16 autocast.
    The function returns the tokens: HF's output rows, ours each sentence's (best) tokens."""
    if precision != "none":
        run = decode_fn(name, model, args, beam)

        def in_precision() -> list:
            with precision_context(precision, torch.device(args.device)):
                return run()
        return in_precision
    src = make_batch(args)[0].to(args.device)
    mask = torch.ones_like(src, dtype=torch.bool)
    model.to(args.device).eval()
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    n = args.out_len
    if name == "hf":
        def run() -> list:
            with torch.inference_mode():
                out = model.generate(input_ids=src, attention_mask=mask, num_beams=beam,
                                     do_sample=False, min_new_tokens=n, max_new_tokens=n,
                                     length_penalty=1.0,
                                     **({"early_stopping": True} if beam > 1 else {}))
            assert out.shape[1] >= n, out.shape
            return out.tolist()
    elif beam == 1:
        def run() -> list:
            out = greedy_search(model, src, mask, max_len_a=0.0, max_len_b=n, min_len=n)
            assert all(len(o) == n for o in out)
            return out
    else:
        def run() -> list:
            out = beam_search(model, src, mask, beam_size=beam, max_len_a=0.0, max_len_b=n,
                              min_len=n)
            assert all(len(h[0].tokens) == n for h in out)
            return [h[0].tokens for h in out]
    return run


def ct2_decode_fn(translator, args, beam: int, max_batch_size: int) -> Callable[[], None]:
    src = make_batch(args)[0]
    tokens = [[translator.pieces[i] for i in row] for row in src.tolist()]
    n = args.out_len

    def run() -> None:
        out = translator.engine.translate_batch(
            tokens, beam_size=beam, min_decoding_length=n, max_decoding_length=n,
            max_batch_size=max_batch_size, length_penalty=1.0)
        assert all(len(o.hypotheses[0]) == n for o in out), [len(o.hypotheses[0]) for o in out]
    return run


def timed(fn: Callable[[], None], sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def race(label: str, fns: dict[str, Callable[[], None]], work: float, unit: str, args) -> None:
    """Time ``fns`` interleaved: a warm-up, then ``args.repeats`` rounds; print medians."""
    sync = args.device.startswith("cuda")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(args.repeats + args.warmup):
        for name, fn in fns.items():
            seconds = timed(fn, sync)
            if round_ >= args.warmup:
                times[name].append(seconds)
    base = statistics.median(times["hf"]) if "hf" in times else None
    print(f"\n{label} ({unit}; median of {args.repeats}, min..max in brackets)")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{base / median:5.2f}x HF" if base else ""
        print(f"  {name:<26} {work / median:>9,.0f}  [{work / max(values):,.0f}.."
              f"{work / min(values):,.0f}]  {ratio}", flush=True)


class CT2:
    def __init__(self, path: Path, args, compute_type: str, inter: int, intra: int) -> None:
        import ctranslate2

        self.engine = ctranslate2.Translator(str(path), device=args.device.split(":")[0],
                                             compute_type=compute_type,
                                             inter_threads=inter, intra_threads=intra)
        vocab = (path / "shared_vocabulary.json")
        import json

        self.pieces = json.loads(vocab.read_text()) if vocab.exists() else [
            line.rstrip("\n") for line in (path / "shared_vocabulary.txt").open()]


class CT2Process:
    """A CTranslate2 engine loaded and run in a child process, driven from this one.

    CTranslate2 bundles its own OpenMP runtime and oneDNN. Loaded beside torch, it changed our
    engines' speed: our oneDNN-packed beam 5 fell from 1.31× to 0.86× torch's GEMM, and torch's
    GEMM got faster, with or without a pause between engines. In a child process it cannot touch
    ours. The race stays interleaved: each run is a round trip that waits for the child.
    """

    def __init__(self, path: Path, args, compute_type: str, inter: int, intra: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_ct2_child, daemon=True,
                                       args=(child, str(path), args.device, args.batch,
                                             args.src_len, args.vocab, args.out_len,
                                             compute_type, inter, intra))
        self.process.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the CTranslate2 child process failed to start")

    def decode_fn(self, beam: int, max_batch_size: int) -> Callable[[], None]:
        def run() -> None:
            self.conn.send((beam, max_batch_size))
            reply = self.conn.recv()
            if reply != "done":
                raise RuntimeError(f"CTranslate2 child: {reply}")
        return run

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=10)


def _ct2_child(conn, path: str, device: str, batch: int, src_len: int, vocab: int, out_len: int,
               compute_type: str, inter: int, intra: int) -> None:
    args = argparse.Namespace(device=device, batch=batch, src_len=src_len, vocab=vocab,
                              out_len=out_len)
    engine = CT2(Path(path), args, compute_type, inter, intra)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        try:
            ct2_decode_fn(engine, args, *job)()
            conn.send("done")
        except Exception as error:  # reported in the parent, which stops the benchmark
            conn.send(repr(error))


# ---------------------------------------------------------------------------------------------
# memory: each engine and workload in a fresh process
# ---------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def memory_child(args) -> None:
    """Run one engine's workload three times; print its RSS before and at peak (JSON)."""
    import json
    import resource

    engine, workload = args.memory_child
    if engine.startswith("ct2"):
        compute = engine.split()[1]
        inter = args.threads if "inter" in engine else 1
        runner = CT2(Path(args.ct2_dir), args, compute, inter, 1 if inter > 1 else args.threads)
        base = _rss_mib()
        fn = ct2_decode_fn(runner, args, 5, args.batch // inter)
    else:
        model = marian(args) if engine == "hf" else ours(engine.split()[1], args)
        precision = engine.split()[2] if len(engine.split()) > 2 else "none"  # ours ... int8/bf16
        if workload != "training" and engine != "hf":  # as translate decodes on a CPU
            model = inference_model(model, "cpu", precision)
        base = _rss_mib()
        name = "hf" if engine == "hf" else "ours"
        fn = train_step_fn(name, model, args) if workload == "training" else decode_fn(
            name, model, args, 5, "bf16" if precision == "bf16" else "none")
    for _ in range(3):
        fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"base": base, "peak": peak}))


def memory_table(args, ct2_dir: Path | None) -> None:
    """Peak RSS of training and beam-5 decoding per engine, each in a fresh process."""
    import json
    import subprocess

    dims = ["--d-model", str(args.d_model), "--layers", str(args.layers), "--heads",
            str(args.heads), "--ffn-dim", str(args.ffn_dim), "--vocab", str(args.vocab),
            "--batch", str(args.batch), "--src-len", str(args.src_len), "--out-len",
            str(args.out_len), "--threads", str(args.threads)]
    engines = {"training": ["ours diff", "ours standard", "hf"],
               "beam 5": ["ours diff", "ours standard", "ours diff int8", "ours diff bf16", "hf"]}
    if ct2_dir is not None:
        engines["beam 5"] += [f"ct2 {c} {layout}{args.threads}" for c in ("float32", "int8")
                              for layout in ("intra", "inter")]
    print(f"\npeak RSS, MiB (fresh process per engine, 3 runs; growth over the process with its "
          f"model loaded in brackets); batch {args.batch} x {args.src_len}")
    for workload, names in engines.items():
        for name in names:
            command = [sys.executable, __file__, *dims, "--memory-child", name, workload]
            if ct2_dir is not None:
                command += ["--ct2-dir", str(ct2_dir)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  {workload:<9} {name:<22} {result['peak']:7,.0f}  "
                  f"[+{result['peak'] - result['base']:,.0f}]", flush=True)


def add_size_arguments(parser: argparse.ArgumentParser, batch: int = 32) -> None:
    """The model dimensions and the batch that ``ours``, ``marian`` and ``make_batch`` read
    (defaults: ANCHORS.md's d_model 256, 3+3 layers, batch 32 x 30 tokens, 30 output tokens)."""
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4, help="HF heads = our DIFF heads")
    parser.add_argument("--ffn-dim", type=int, default=1024, help="HF width (ours: 2/3 of it)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--src-len", type=int, default=30)
    parser.add_argument("--out-len", type=int, default=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(parser)
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-decode", dest="decode", action="store_false")
    parser.add_argument("--no-ct2", dest="ct2", action="store_false")
    parser.add_argument("--compile", choices=["none", "ours", "all"], default="none",
                        help="torch.compile our models (or all) for training; warm-up untimed")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="CPU float32: leave out our compiled decoders (translate --compile, "
                             "tens of seconds of compiling per model and search in the warm-up)")
    parser.add_argument("--no-aot", dest="aot", action="store_false",
                        help="CPU float32: leave out our ahead-of-time compiled decoders "
                             "(translate --aot; built in the warm-up of a first run, a minute a "
                             "graph, then loaded from $SEQ2SEQ_DIFF_AOT_CACHE)")
    parser.add_argument("--memory", action="store_true",
                        help="only peak RSS per engine (training, beam 5), fresh processes")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ct2-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_child:
        memory_child(args)
        return
    if args.memory:
        ct2_dir = None
        if args.ct2:
            try:
                import ctranslate2  # noqa: F401

                ct2_dir = ctranslate2_dir(marian(args), args, Path(tempfile.mkdtemp(prefix="ct2-")))
            except ImportError:
                print("ctranslate2 is not installed: no CTranslate2 (pip install -e .[bench])")
        memory_table(args, ct2_dir)
        return
    models: dict[str, torch.nn.Module] = {"ours diff": ours("diff", args),
                                          "ours standard": ours("standard", args)}
    try:
        models["hf"] = marian(args)
    except ImportError:
        print("transformers is not installed: no HF MarianMT (pip install -e .[bench])")
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(f"d_model {args.d_model}, {args.layers}+{args.layers} layers, {args.heads} heads, "
          f"FFN {args.ffn_dim}, vocab {args.vocab}; batch {args.batch} x {args.src_len} source "
          f"tokens, {args.out_len} output tokens; {args.threads} threads, {args.device} "
          f"{args.dtype}; torch {torch.__version__}")
    print("parameters: " + ", ".join(f"{n} {p / 1e6:.2f}M" for n, p in params.items()))
    if args.train:  # ours as the trainer runs it: through oneDNN where it pays (model.cpu_gemm)
        fns = {name: train_step_fn("hf", m, args) if name == "hf" else
               train_step_fn("ours", use_onednn(copy.deepcopy(m), pays()), args)
               for name, m in models.items()}
        if pays() and args.device == "cpu":  # and with torch's GEMM (model.cpu_gemm: mkl)
            fns.update({f"{name} mkl": train_step_fn("ours", copy.deepcopy(m), args)
                        for name, m in models.items() if name != "hf"})
        race("training", fns, args.batch * (args.src_len + args.out_len), "tokens/s", args)
    if not args.decode:
        return
    engines: dict[str, CT2Process] = {}
    if args.ct2 and "hf" in models:
        try:
            import ctranslate2  # noqa: F401

            tmp = Path(tempfile.mkdtemp(prefix="ct2-"))
            path = ctranslate2_dir(models["hf"], args, tmp)
            threads = args.threads
            for compute in ("float32", "int8"):
                engines[f"ct2 {compute} intra{threads}"] = CT2Process(path, args, compute, 1,
                                                                      threads)
                if threads > 1:
                    engines[f"ct2 {compute} inter{threads}"] = CT2Process(path, args, compute,
                                                                          threads, 1)
        except ImportError:
            print("ctranslate2 is not installed: no CTranslate2 (pip install -e .[bench])")
    decoders = dict(models)
    if args.device == "cpu" and args.dtype == "float32":
        bf16 = cpu_bf16_native()  # translate --bf16; HF's model.to(torch.bfloat16) beside it
        for kind in ("diff", "standard"):  # as translate runs each setting
            model = models[f"ours {kind}"]
            decoders[f"ours {kind} as trained"] = model
            decoders[f"ours {kind}"] = inference_model(model, "cpu")
            decoders[f"ours {kind} int8"] = inference_model(model, "cpu", "int8")
            if bf16:
                decoders[f"ours {kind} bf16"] = inference_model(model, "cpu", "bf16")
            if args.compiled:  # translate --compile [--bf16]; compiled in the untimed warm-up
                decoders[f"ours {kind} compiled"] = inference_model(model, "cpu", compile=True)
                if bf16:
                    decoders[f"ours {kind} bf16 compiled"] = inference_model(
                        model, "cpu", "bf16", compile=True)
            if args.aot:  # translate --aot [--bf16|--int8]; built or loaded in the warm-up
                decoders[f"ours {kind} aot"] = inference_model(model, "cpu", aot=True)
                decoders[f"ours {kind} int8 aot"] = inference_model(model, "cpu", "int8",
                                                                    aot=True)
                if bf16:
                    decoders[f"ours {kind} bf16 aot"] = inference_model(model, "cpu", "bf16",
                                                                         aot=True)
        if bf16 and "hf" in models:
            decoders["hf bf16"] = copy.deepcopy(models["hf"]).to(torch.bfloat16)
    for beam in args.beams:
        fns = {name: decode_fn("hf" if name.startswith("hf") else "ours", m, args, beam,
                               "bf16" if name.startswith("ours") and "bf16" in name else "none")
               for name, m in decoders.items()}
        for name, engine in engines.items():
            split = args.batch // args.threads if "inter" in name else args.batch
            fns[name] = engine.decode_fn(beam, split)
        label = "greedy" if beam == 1 else f"beam {beam}"
        race(f"decoding, {label}", fns, args.batch * args.out_len, "output tokens/s", args)
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
