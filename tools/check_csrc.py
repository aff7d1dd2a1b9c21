#!/usr/bin/env python
"""Compile every CUDA kernel family of csrc/ on any machine with nvcc, GPU or not (docs/DESIGN.md §6).

    python tools/check_csrc.py [--jobs 2] [--out DIR] [--family rope ...] [--csrc DIR]

For each csrc/<family>/ holding .cu files: every .cu with `nvcc -c -std=c++17 -arch=sm_90a`, every
binding .cpp with `g++ -std=c++20` against the installed torch's headers, then one shared library
`_<family>` linked from them (the same sources setup.py builds into megatron_jp.ops._<family>).
It fails loudly on a compiler error and on a launcher the binding calls but no .cu defines (an
undefined `mjp::` symbol), which would otherwise surface only at import time on a GPU machine.
The libraries link against the CPU torch and the toolkit's libcudart, so they import on a CPU-only
machine and the bindings' argument checks can be tested there (tests/unit/test_csrc_compiles.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    """One compiler invocation: `cmd` writes `output` from `source`."""

    source: Path
    output: Path
    cmd: list[str]
    cost: float  # rough seconds, to start the slow ones first


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> Path:
    """The toolkit root, as nvcc itself reports it (nvcc on PATH may be a wrapper script)."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(nvcc).resolve().parent.parent


def cudart_dir(nvcc: str) -> Path:
    """The toolkit folder holding libcudart.so (lib64, or targets/<arch>/lib on newer layouts)."""
    home = cuda_home(nvcc)
    candidates = [home / "lib64", home / "lib", *sorted(home.glob("targets/*/lib"))]
    for folder in candidates:
        if (folder / "libcudart.so").exists():
            return folder
    raise SystemExit(f"check_csrc: no libcudart.so under {home} (looked in {[str(c) for c in candidates]})")


def families(csrc: Path, selected: list[str] | None) -> dict[str, Path]:
    """csrc/<family>/ folders with .cu files: the ones setup.py turns into extensions."""
    found = {d.name: d for d in sorted(csrc.iterdir()) if d.is_dir() and any(d.glob("*.cu"))}
    if selected:
        missing = sorted(set(selected) - set(found))
        if missing:
            raise SystemExit(f"check_csrc: no kernel family {missing}; have {sorted(found)}")
        found = {name: found[name] for name in selected}
    return found


def torch_flags() -> tuple[list[str], Path]:
    """g++ include and define flags for a torch extension binding, and torch's lib folder."""
    import torch
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    return flags, Path(torch.__file__).parent / "lib"


def compile_jobs(family: str, folder: Path, out: Path, nvcc: str, torch_includes: list[str]) -> list[Job]:
    csrc = folder.parent  # the include root, as in setup.py
    jobs = []
    for cu in sorted(folder.glob("*.cu")):
        cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_90a", "-Xcompiler", "-fPIC", f"-I{csrc}",
               str(cu), "-o", str(out / f"{cu.stem}.cu.o")]
        jobs.append(Job(cu, out / f"{cu.stem}.cu.o", cmd, cost=10.0))
    for cpp in sorted(folder.glob("*.cpp")):
        # -O0: this checks that the binding compiles; the real build optimises. torch/extension.h
        # alone takes ~30 s to parse, so each binding is the slow part of the check.
        cmd = ["g++", "-c", "-std=c++20", "-fPIC", "-O0", "-Wall", f"-I{csrc}", *torch_includes,
               f"-DTORCH_EXTENSION_NAME=_{family}", str(cpp), "-o", str(out / f"{cpp.stem}.cpp.o")]
        jobs.append(Job(cpp, out / f"{cpp.stem}.cpp.o", cmd, cost=35.0))
    return jobs


def run(job: Job) -> tuple[Job, float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(job.cmd, capture_output=True, text=True)
    return job, time.perf_counter() - start, result


def link(family: str, objects: list[Path], out: Path, torch_lib: Path, cuda_lib: Path) -> Path:
    """One importable extension per family; fails on any undefined symbol of ours."""
    target = out / f"_{family}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    cmd = ["g++", "-shared", "-o", str(target), *map(str, objects), f"-L{torch_lib}", "-lc10", "-ltorch",
           "-ltorch_cpu", "-ltorch_python", f"-L{cuda_lib}", "-lcudart",
           f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cuda_lib}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"link _{family}", cmd, result)
    undefined = subprocess.run(["nm", "-C", "--undefined-only", str(target)], capture_output=True, text=True)
    ours = [line.strip() for line in undefined.stdout.splitlines() if "mjp::" in line]
    if ours:
        raise SystemExit(f"check_csrc: _{family} calls launchers no .cu defines:\n  " + "\n  ".join(ours))
    return target


def fail(what: str, cmd: list[str], result: subprocess.CompletedProcess):
    print(f"check_csrc: FAILED {what}\n$ {' '.join(cmd)}\n{result.stdout}{result.stderr}", file=sys.stderr)
    raise SystemExit(1)


def check(csrc: Path, out: Path, jobs_n: int, selected: list[str] | None) -> list[Path]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("check_csrc: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    torch_includes, torch_lib = torch_flags()
    cuda_lib = cudart_dir(nvcc)
    plan = {}
    for family, folder in families(csrc, selected).items():
        (out / family).mkdir(parents=True, exist_ok=True)
        plan[family] = compile_jobs(family, folder, out / family, nvcc, torch_includes)
    todo = sorted((job for jobs in plan.values() for job in jobs), key=lambda j: -j.cost)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs_n) as pool:
        futures = [pool.submit(run, job) for job in todo]
        for future in concurrent.futures.as_completed(futures):
            job, seconds, result = future.result()
            if result.returncode != 0:
                pool.shutdown(wait=False, cancel_futures=True)
                fail(str(job.source.relative_to(csrc.parent)), job.cmd, result)
            warnings = result.stderr.strip()
            name = job.source.relative_to(csrc.parent)
            print(f"  ok {seconds:5.1f}s  {name}" + (f"\n{warnings}" if warnings else ""))
    return [link(family, [job.output for job in jobs], out, torch_lib, cuda_lib) for family, jobs in plan.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", 2)), help="parallel compiles")
    p.add_argument("--out", type=Path, help="keep objects and the linked _<family> libraries here")
    p.add_argument("--family", nargs="*", help="only these csrc/ folders (default: all with .cu files)")
    p.add_argument("--csrc", type=Path, default=ROOT / "csrc", help="the kernel source tree (default: csrc/)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check_csrc_") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        libraries = check(args.csrc.resolve(), out, args.jobs, args.family)
    names = ", ".join(lib.name for lib in libraries)
    print(f"check_csrc: {len(libraries)} kernel families compiled and linked ({names}) "
          f"in {time.perf_counter() - start:.1f}s with {args.jobs} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
