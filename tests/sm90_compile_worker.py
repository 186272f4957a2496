"""Compiles every Triton kernel variant of genkernels for sm_90 on the CPU; run by test_sm90_compile.py in a
subprocess without TRITON_INTERPRET. Prints one JSON line per variant."""
import concurrent.futures
import importlib
import json
import pkgutil
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import genkernels.kernels as package

HOPPER = GPUTarget("cuda", 90, 32)


def all_variants():
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for index, variant in enumerate(getattr(module, "compile_variants", lambda: [])()):
            yield info.name, index, variant


def compile_one(module_name, index):
    variant = dict(((m, i), v) for m, i, v in all_variants())[(module_name, index)]
    source = ASTSource(variant.kernel, variant.signature(), constexprs=dict(variant.constexprs))
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": variant.num_warps})
    return {"module": module_name, "kernel": variant.kernel.__name__, "constexprs": variant.constexprs,
            "num_warps": variant.num_warps, "shared": compiled.metadata.shared,
            "cubin_bytes": len(compiled.asm["cubin"])}


if __name__ == "__main__":
    jobs = [(m, i) for m, i, _ in all_variants()]
    with concurrent.futures.ProcessPoolExecutor(max_workers=int(sys.argv[1])) as pool:
        for result in pool.map(compile_one, *zip(*jobs)):
            print(json.dumps(result), flush=True)
