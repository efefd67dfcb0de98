"""Shared helpers of the Hugging Face client tests (tests/hf_clients).

The real libraries (transformers, peft, huggingface_hub, safetensors) judge the files Strata
writes and write the files Strata reads. Nothing touches the network or the user's caches:
`setup()` runs the test in a fresh temporary directory with HF_HOME inside it and every Hub
client offline (the Hub test points HF_ENDPOINT at the fake Hub itself). Import this module
and call `setup()` before importing any Hugging Face library: they read the environment at
import time.

Every comparison prints its figure and its tolerance; `Checks.done()` exits 1 if any failed.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

STRATA = os.environ.get("STRATA_BIN")
SOURCE = os.environ.get("STRATA_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FORTUNES = "/usr/share/games/fortunes/fortunes"
RTOL_FP32 = 1e-5  # relative loss difference allowed in fp32


def setup():
    """A fresh working directory (removed at exit unless STRATA_KEEP_WORK=1) and an offline,
    private Hugging Face environment."""
    if not STRATA:
        sys.exit("set STRATA_BIN to the strata binary")
    work = tempfile.mkdtemp(prefix="strata-hf-clients-")
    if os.environ.get("STRATA_KEEP_WORK") != "1":
        atexit.register(shutil.rmtree, work, True)
    else:
        print(f"work directory: {work}")
    os.chdir(work)
    env = {
        "HF_HOME": os.path.join(work, "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_DISABLE_XET": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }
    os.environ.update(env)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of the libraries
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                 "HF_ENDPOINT", "XDG_CACHE_HOME", "HF_HUB_DISABLE_SYMLINKS"):
        os.environ.pop(name, None)
    return work


def require_libraries(*names):
    """Import the named libraries, failing with a hint when the environment lacks them."""
    import importlib
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            sys.exit(f"FAIL: cannot import {name} ({e}); the test environment is third_party/pyenv with "
                     "the pins of third_party/requirements.txt (scripts/setup.sh installs them)")
    versions = ", ".join(f"{n} {getattr(m, '__version__', '?')}" for n, m in zip(names, modules))
    print(f"libraries: {versions}")
    return modules


class Checks:
    """Records every comparison, prints it, and fails the test at the end if one failed."""

    def __init__(self):
        self.failures = []

    def record(self, ok, text):
        print(("ok    " if ok else "FAIL  ") + text, flush=True)
        if not ok:
            self.failures.append(text)
        return ok

    def close(self, what, a, b, rtol=RTOL_FP32):
        """|a - b| / |b| <= rtol."""
        rel = abs(a - b) / max(abs(b), 1e-300)
        return self.record(rel <= rtol, f"{what}: {a!r} vs {b!r}, relative difference {rel:.3e} (tolerance {rtol:g})")

    def max_abs(self, what, diff, tol):
        return self.record(diff <= tol, f"{what}: max abs difference {diff:.3e} (tolerance {tol:g})")

    def apart(self, what, a, b, at_least):
        """A sensitivity check: a wrong model must be further than `at_least` (relative)."""
        rel = abs(a - b) / max(abs(b), 1e-300)
        return self.record(rel > at_least, f"{what}: {a!r} vs {b!r}, relative difference {rel:.3e} "
                                           f"(must exceed {at_least:g})")

    def equal(self, what, a, b, show=None):
        ok = a == b
        text = f"{what}: {'equal' if ok else 'DIFFERENT'}"
        if show is not None:
            text += f" ({show})"
        if not ok:
            text += f"\n      got:      {a!r}\n      expected: {b!r}"
        return self.record(ok, text)

    def true(self, what, ok, detail=""):
        return self.record(bool(ok), what + (f" ({detail})" if detail else ""))

    def done(self):
        if self.failures:
            print(f"\n{len(self.failures)} check(s) failed:")
            for f in self.failures:
                print("  " + f.splitlines()[0])
            sys.exit(1)
        print("all checks passed")


def strata(*args, check=True, env=None):
    """Runs the strata binary; returns (returncode, combined output)."""
    cmd = [STRATA] + [str(a) for a in args]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        print(p.stdout)
        raise SystemExit(f"FAIL: strata {' '.join(cmd[1:])} exited {p.returncode}")
    return p.returncode, p.stdout


def strata_stdout(*args, env=None):
    """Runs strata and returns its stdout only (stderr is shown when it fails)."""
    cmd = [STRATA] + [str(a) for a in args]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=None if env is None else {**os.environ, **env})
    if p.returncode != 0:
        print(p.stdout, p.stderr)
        raise SystemExit(f"FAIL: strata {' '.join(cmd[1:])} exited {p.returncode}")
    return p.stdout


def strata_eval(source, data, seq_len, max_tokens=0, env=None):
    """The loss `strata eval` prints (its last line is JSON)."""
    args = ["eval", "--from", source, "--data", data, "--seq-len", seq_len]
    if max_tokens:
        args += ["--max-tokens", max_tokens]
    out = strata_stdout(*args, env=env)
    return json.loads(out.strip().splitlines()[-1])["loss"]


def train(config_text, name, *sets, env=None):
    """Writes `name`.yaml and runs `strata train` on it; returns its output."""
    with open(f"{name}.yaml", "w") as f:
        f.write(config_text)
    args = ["train", "--config", f"{name}.yaml"]
    for s in sets:
        args += ["--set", s]
    return strata(*args, env=env)[1]


def prepare_data(out="data", vocab=400):
    """Tokenizes the fortunes corpus (a SentencePiece BPE of `vocab` pieces) into out/."""
    strata("prepare-data", "--input", FORTUNES, "--out", out, "--vocab-size", vocab, "--separator", "%")
    return out


def read_tokens(path):
    """The tokens of one llm.c shard as int64."""
    import numpy as np
    header = np.fromfile(path, dtype=np.int32, count=256)
    dtype = np.uint16 if header[0] == 20240520 else np.uint32
    return np.fromfile(path, dtype=dtype, offset=1024)[: int(header[2])].astype(np.int64)


def window_loss(model, tokens, seq_len, max_tokens=0):
    """`strata eval`'s figure for a PyTorch causal LM: consecutive windows from the start,
    inputs t[kT:(k+1)T], targets shifted by one, mean token cross-entropy in fp64."""
    import torch
    windows = (len(tokens) - 1) // seq_len
    if max_tokens:
        windows = min(windows, max_tokens // seq_len)
    t = torch.as_tensor(tokens[: windows * seq_len + 1])
    inputs = t[: windows * seq_len].view(windows, seq_len)
    targets = t[1: windows * seq_len + 1].view(windows, seq_len)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten(),
                                             reduction="mean").item()


def randomize(model, seed):
    """Re-draws every weight at a scale where the loss depends on all of them (the libraries'
    0.02 init gives nearly uniform logits, where a wrong weight layout hardly shows)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (and biases)
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:  # also the output projection of a tied model: moderate logits
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def safetensors_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def load_safetensors_dir(d):
    """Every tensor of a directory's safetensors files, read with safetensors.safe_open."""
    from safetensors import safe_open
    out = {}
    for f in safetensors_files(d):
        with safe_open(os.path.join(d, f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
