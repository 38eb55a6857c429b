#!/usr/bin/env python3
"""Static SASS figures of a kernel's loops, for comparing kernel variants without a GPU.

Compiles one kernels/*.cu for one architecture with the project's nvcc (./.venv, as build.rs
finds it), disassembles the kernel with cuobjdump, and prints every loop (a backward branch)
of more than --min instructions with its size and opcode histogram. The size of a tile loop is
an upper bound on the instructions one tile issues (branches inside it may skip parts): the
figure BENCHMARKS.md quotes for the prefill and decode tile loops, and the first thing to look
at when a change makes a kernel slower.

    scripts/sass-loops.py kernels/attention_fwd.cu attention_fwd_wide_d128_bf16 [--arch sm_90] [--min 150] [-D NAME=V]

-D passes a macro to nvcc. Two are honoured by the kernels, to count one path of a loop whose
paths are picked at run time: RA_PROBE_SOFTMAX=0|1|2|3 (attention_fwd.cu: generic, plain, linear
ALiBi, edge (causal diagonal or last tile) softmax for every tile) and RA_PROBE_DECODE=0|1|2 (attention_decode_mma.cu: keys not
rotated, rotate_half or interleaved in registers; no ReRoPE; every tile unmasked), and
RA_PROBE_COPY=1 (attention_fwd.cu: every K/V tile copied on the whole-tile path, so that the
loop holds one copy path, fully unrolled).

A loop that contains a smaller loop is counted with the inner one once: a rolled copy loop that
runs four times issues three more bodies than the count shows (the reason the prefill's
whole-tile copies are unrolled).

Needs cuobjdump and nvdisasm, which nvcc's PyPI set does not include; any CUDA 13 version
disassembles 13.0 cubins:
    .venv/bin/pip install nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name: str) -> str:
    for d in glob.glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages/nvidia/cu13/bin")):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: see this script's docstring for how to install it")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("kernel")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--min", type=int, default=150, help="smallest loop to print (instructions)")
    ap.add_argument("-D", action="append", default=[], help="macro for nvcc (NAME=VALUE)")
    a = ap.parse_args()
    nvcc, cuobjdump = tool("nvcc"), tool("cuobjdump")
    env = dict(os.environ, PATH=os.path.dirname(tool("nvdisasm")) + os.pathsep + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        ptxas = subprocess.run([nvcc, "-cubin", "-O3", "-std=c++17", f"-arch={a.arch}", "-Xptxas", "-v",
                                "-I", os.path.join(ROOT, "kernels"), "-o", cubin, a.source] + [f"-D{d}" for d in a.D],
                               capture_output=True, text=True)
        if ptxas.returncode != 0:
            sys.exit(ptxas.stderr)
        log = ptxas.stderr.splitlines()
        for i, line in enumerate(log):
            if f"Compiling entry function '{a.kernel}'" in line:
                print(" ".join(" ".join(log[i + 1:i + 3]).split()))
        sass = subprocess.run([cuobjdump, "-sass", "-fun", a.kernel, cubin], capture_output=True, text=True, env=env)
        if sass.returncode != 0 or "Function" not in sass.stdout:
            sys.exit(f"cuobjdump found no {a.kernel}:\n{sass.stderr}")
    ins = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass.stdout):
        text = m.group(2).strip()
        op = (text.split(None, 1)[1] if text.startswith("@") else text).split()[0]
        ins.append((int(m.group(1), 16), op.split(".")[0], text))
    print(f"{a.kernel} ({a.arch}): {len(ins)} instructions")
    for addr, op, text in ins:
        if op not in ("BRA", "BRX"):
            continue
        target = re.search(r"0x([0-9a-f]+)", text.split(op, 1)[1])
        if not target or int(target.group(1), 16) > addr:
            continue
        start = int(target.group(1), 16)
        body = [o for x, o, _ in ins if start <= x <= addr]
        if len(body) < a.min:
            continue
        hist = collections.Counter(body).most_common(16)
        print(f"loop {start:#x}-{addr:#x}: {len(body)} instructions")
        print("   " + ", ".join(f"{k} {v}" for k, v in hist))
    return 0


if __name__ == "__main__":
    sys.exit(main())
