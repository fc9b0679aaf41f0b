import sys, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
from seq2seq_diff.malloc import tune_malloc
tune_malloc()
from layout import race_variants, variant_parser
from peers import ours
from seq2seq_diff import exported
from seq2seq_diff.exported import aot_decoding
from seq2seq_diff.translator import inference_model
from seq2seq_diff.compiled import FROZEN

parser = variant_parser("frozen probe")
parser.add_argument("--which", nargs="+", default=["eager", "unfrozen", "frozen"])
args = parser.parse_args()
scratch = Path(tempfile.mkdtemp(prefix="aot-", dir="/tmp/s20"))

def variants(kind, precision):
    q = "bf16" if precision == "bf16" else "none"
    model = ours(kind, args)
    plain = inference_model(model, "cpu", q, pack=False)
    out = {}
    for w in args.which:
        if w == "eager":
            out[w] = inference_model(model, "cpu", q)
        elif w == "unfrozen":
            out[w] = aot_decoding(plain, q, scratch / w, frozen=False)
        elif w == "frozen":  # freezing only (float32), FROZEN (bf16)
            out[w] = aot_decoding(plain, q, scratch / w, frozen=True, onednn=False)
        elif w == "frozen-tuned":  # float32 with max_autotune
            exported._FROZEN_FLOAT32 = FROZEN
            out[w] = aot_decoding(plain, q, scratch / w, frozen=True, onednn=False)
    for name, m in out.items():  # build now, each with its own settings
        if name == "frozen-tuned": exported._FROZEN_FLOAT32 = FROZEN
        from peers import decode_fn
        for b in args.beams:
            decode_fn("ours", m, args, b, precision)()
        exported._FROZEN_FLOAT32 = {"freezing": True}
        print("   built", name, flush=True)
    return out

race_variants(args, variants, args.which[0], 14)
