#!/usr/bin/env bash
# Tokenization throughput of Strata's tokenizer.json tokenizer against the `tokenizers` library
# (the Python environment's, third_party/pyenv) on the same text and the same tokenizer.json:
# a Llama-3 style byte-level BPE (Split regex + ByteLevel, 16k vocabulary) trained here on the
# corpus: the fortune files repeated plus multilingual text (~4 MB; CORPUS_MB to change).
#   scripts/bench/tokenizer.sh [ROUNDS]      (default 5)
# Each round runs every contender once in a fresh process, in alternation; only the encoding
# is timed (not loading or printing). Contenders: Strata encoding the whole text on one
# thread, Strata encoding chunks of lines on 1 and on all threads (`strata tokenize --threads`),
# tokenizers' encode of the whole text, and its encode_batch of the same chunks with
# RAYON_NUM_THREADS=1 and with the default thread pool. Prints medians in MB/s and ratios.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
rounds=${1:-5}
strata="${STRATA_BUILD_DIR:-$root/build}/strata"
python="$root/third_party/pyenv/bin/python"
threads=$(nproc)
out=$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-tokenizer-XXXXXX")
trap 'rm -rf "$out"' EXIT

"$python" - "$out" "${CORPUS_MB:-4}" <<'EOF'
import glob, os, sys
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
out, mb = sys.argv[1], float(sys.argv[2])
text = ""
for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
    if os.path.isfile(path) and not path.endswith(".dat") and not os.path.islink(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read()
multilingual = ("中文测试：你好，世界！这是一个句子。 日本語のテキスト、カタカナとひらがな。 "
                "Arabic: مرحبا بالعالم، هذا نص عربي. Devanagari: नमस्ते दुनिया, यह हिंदी है। "
                "Ελληνικά και Кириллица смешанные. emoji 😀 👨‍👩‍👧‍👦 Straße façade naïve 12345\n")
text += multilingual * 200
target = int(mb * 1e6)
text = (text * (target // max(1, len(text.encode())) + 1))[:target]
with open(f"{out}/corpus.txt", "w", encoding="utf-8") as f:
    f.write(text)
pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text.splitlines()[:200000], trainers.BpeTrainer(
    vocab_size=16000, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok.save(f"{out}/tokenizer.json")
EOF

# tokenizers: the chunks are those `strata tokenize --threads` encodes (whole lines, ~1/64 of
# the text per thread, at least 16 KiB).
cat >"$out/hf.py" <<'EOF'
import json, sys, time
from tokenizers import Tokenizer
path, corpus, mode, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer.from_file(path)
text = open(corpus, encoding="utf-8").read()
data = text.encode()
if mode == "whole":
    start = time.perf_counter()
    n = len(tok.encode(text).ids)
else:
    target = max(1 << 14, len(data) // (64 * threads) + 1)
    chunks, begin = [], 0
    while begin < len(data):
        end = data.find(b"\n", min(len(data), begin + target))
        end = len(data) if end < 0 else end + 1
        chunks.append(data[begin:end].decode())
        begin = end
    start = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(chunks))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": n, "bytes": len(data)}))
EOF

measure() {  # NAME CMD...: appends NAME MB/s tokens
  local name=$1 line
  shift
  line=$("$@")
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(sys.argv[2], d['bytes']/d['seconds']/1e6, d['tokens'])" \
    "$line" "$name" >>"$out/results"
}
for ((r = 0; r < rounds; ++r)); do
  measure strata_whole_1t "$strata" tokenize --tokenizer "$out/tokenizer.json" --input "$out/corpus.txt" --count
  measure hf_encode_whole_1t env RAYON_NUM_THREADS=1 "$python" "$out/hf.py" "$out/tokenizer.json" "$out/corpus.txt" whole 1
  measure strata_chunks_1t "$strata" tokenize --tokenizer "$out/tokenizer.json" --input "$out/corpus.txt" --count --threads 1
  measure hf_encode_batch_1t env RAYON_NUM_THREADS=1 "$python" "$out/hf.py" "$out/tokenizer.json" "$out/corpus.txt" batch 1
  measure "strata_chunks_${threads}t" "$strata" tokenize --tokenizer "$out/tokenizer.json" --input "$out/corpus.txt" --count --threads "$threads"
  measure "hf_encode_batch_${threads}t" env -u RAYON_NUM_THREADS "$python" "$out/hf.py" "$out/tokenizer.json" "$out/corpus.txt" batch "$threads"
done

python3 - "$out/results" "$threads" "$rounds" <<'EOF'
import statistics, sys
rows = {}
tokens = {}
for line in open(sys.argv[1]):
    name, mbs, n = line.split()
    rows.setdefault(name, []).append(float(mbs))
    tokens.setdefault(name, set()).add(int(n))
t = sys.argv[2]
med = {k: statistics.median(v) for k, v in rows.items()}
print(f"median of {sys.argv[3]} rounds, MB/s of UTF-8 input (tokens per run: "
      f"{', '.join(f'{k} {sorted(v)}' for k, v in tokens.items())})\n")
print("| contender | MB/s | Strata / tokenizers |")
print("|---|---:|---:|")
pairs = [("strata_whole_1t", "hf_encode_whole_1t", "whole text, 1 thread"),
         ("strata_chunks_1t", "hf_encode_batch_1t", "chunks, 1 thread"),
         (f"strata_chunks_{t}t", f"hf_encode_batch_{t}t", f"chunks, {t} threads")]
for s, h, what in pairs:
    print(f"| Strata, {what} | {med[s]:.2f} | {med[s] / med[h]:.2f}x |")
    print(f"| tokenizers, {what} | {med[h]:.2f} | |")
EOF
