#!/usr/bin/env python3
"""Relative error ||a - b|| / ||b|| between a tensor in two safetensors files.

usage: compare_safetensors.py OURS.safetensors NAME REF.safetensors REF_NAME [TOLERANCE]
Exits 1 when the error exceeds TOLERANCE. Needs torch and safetensors (the GPU machines have both).
"""
import sys

from safetensors.torch import load_file


def main() -> int:
    ours, name, ref, ref_name = sys.argv[1:5]
    tol = float(sys.argv[5]) if len(sys.argv) > 5 else None
    a = load_file(ours)[name].double()
    b = load_file(ref)[ref_name].double()
    err = ((a - b).norm() / b.norm()).item()
    verdict = "" if tol is None else (" ok" if err <= tol else f" FAIL (> {tol})")
    print(f"{ours}:{name} vs {ref_name}: rel err {err:.3e}{verdict}")
    return 0 if tol is None or err <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
