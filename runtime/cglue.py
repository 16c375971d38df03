"""The fused CPU glue of a float32 decode step: `decode_glue.c`, compiled on first use and called through ctypes.

Called by `kaito.runtime.fastpath.FastDecoder` (`load()` once when it is built, then a few calls per layer of a
decode step) and by `kaito.runtime.cstep` (the whole step in one call). The runtime only. Why: a batch-1 decode step of the 88M bench model spent 12.2 ms in its linears
and 4.2 ms in the ~60 small torch ops per layer between them (RMSNorm, rotary, KV writes, attention, SiLU), each
several times slower right after a linear has streamed its weight through the caches than on its own (1.7 ms
for all of them without the linears). One C pass per piece of math, the attention on torch's own OpenMP team,
brings that to ~1-1.5 ms.

The library is built with the system C compiler (`$CC`, else `cc`, `gcc`, `clang`) with `-march=native` and,
when the process's only OpenMP runtime is a `libgomp.so.1` (torch's, which the loader then reuses), with
`-fopenmp`; into a cache directory keyed by the source, the flags and this CPU's feature flags, written to a
temporary name and renamed, so concurrent servers and a killed build never load a half-written file. Without
a compiler the library is taken from the prebuilt ones (`prebuild`, run by Dockerfiles/base in its build stage,
which has a compiler, for the runtime image, which has none): one per x86-64 level (v4 = AVX-512, v3 = AVX2 + FMA,
v2) with and without OpenMP, named by the source's digest, the best this CPU runs chosen. With neither, or with
`KAITO_CPU_GLUE=0`, `load()` returns None and the decoder keeps its torch ops (same math, to float rounding).

`python -m kaito.runtime.cglue --prebuild [DIR]` writes the prebuilt libraries (default: next to this module).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("kaito.runtime.cglue")
SOURCE = Path(__file__).with_name("decode_glue.c")
FLAGS = ["-O3", "-fno-math-errno", "-shared", "-fPIC"]
MAX_HEAD_DIM = 256  # the attention's per-head accumulator (decode_glue.c)

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_lock = threading.Lock()
_loaded: dict[str, CpuGlue | None] = {}


class CpuGlue:
    """The loaded library's functions, over float32 CPU tensors (callers check dtype, device, layout).

    `threaded`: built with OpenMP and sharing this process's one libgomp (torch's), so the attention splits its
    work over the calling thread's torch team; a second OpenMP runtime would keep a second team of spinning
    workers beside torch's, so then it stays on one thread."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self.threaded = bool(lib.kaito_glue_threaded()) and len(_gomp_paths()) == 1
        self._rms = lib.kaito_rmsnorm
        self._rms.argtypes, self._rms.restype = [_P, _P, _P, _I, _I, _F], None
        self._silu = lib.kaito_silu_mul
        self._silu.argtypes, self._silu.restype = [_P, _P, _I, _P, _I, _I], None
        self._attn = lib.kaito_decode_attention
        self._attn.argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _I, _P, _P, _I, _I, _I, _P, _P, _I, _I, _I, _I, _F, _I]
        self._attn.restype = ctypes.c_int
        self._rope_kv = lib.kaito_rope_kv
        self._rope_kv.argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _I, _P, _P, _I, _I, _I, _P, _I, _I, _I, _I]
        self._rope_kv.restype = None
        self._step = lib.kaito_decode_step
        self._step.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _I, _I, _P, _P, _P, _I, _P,
                               _I]
        self._step.restype = ctypes.c_int
        self._run = lib.kaito_decode_run
        self._run.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _I, _I, _P, _I, _P, _P, _I,
                              _P, _P, _P, _I, _P, _I, _P, ctypes.c_double, _P, _I]
        self._run.restype = ctypes.c_int64

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
        """out [n, d] = weight * (x * rsqrt(mean(x^2) + eps)), x contiguous [n, d]."""
        n, d = x.shape
        self._rms(x.data_ptr(), weight.data_ptr(), out.data_ptr(), n, d, eps)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [n, m] = up * silu(gate); gate and up [n, m] with unit column stride and one row stride."""
        n, m = out.shape
        self._silu(gate.data_ptr(), up.data_ptr(), gate.stride(0), out.data_ptr(), n, m)
        return out

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kb: torch.Tensor, vb: torch.Tensor, width: int, mask: torch.Tensor | None, heads: int,
                  kv_heads: int, head_dim: int, scaling: float, out: torch.Tensor) -> torch.Tensor:
        """RoPE on q and k, k and v written to column `width` of the cache views kb/vb [n, kv_heads, >width,
        head_dim] (unit stride over head_dim, head_dim over columns), and attention of each row's query over
        its columns 0..width where `mask` [n, width + 1] (bool, contiguous; None = all) is set; out [n, H*D].
        Threaded (see the class), on torch's intra-op thread count."""
        n = q.shape[0]
        rc = self._attn(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
                        cos.data_ptr(), sin.data_ptr(), cos.shape[1], kb.data_ptr(), vb.data_ptr(), kb.stride(0),
                        kb.stride(1), width, None if mask is None else mask.data_ptr(), out.data_ptr(), n, heads,
                        kv_heads, head_dim, scaling, torch.get_num_threads() if self.threaded else 1)
        if rc == -1:
            raise MemoryError(f"decode attention over {width + 1} columns: no memory for the score row")
        if rc:
            raise ValueError(f"decode attention: head_dim {head_dim} is over the glue's {MAX_HEAD_DIM}")
        return out

    def rope_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kb: torch.Tensor, vb: torch.Tensor, width: int, heads: int, kv_heads: int, head_dim: int,
                q_out: torch.Tensor) -> torch.Tensor:
        """`attention` without the attention: k and v written to the cache, the rotated queries to q_out
        [n, H*D] (for a context long enough that torch's threaded attention is faster)."""
        self._rope_kv(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
                      cos.data_ptr(), sin.data_ptr(), cos.shape[1], kb.data_ptr(), vb.data_ptr(), kb.stride(0),
                      kb.stride(1), width, q_out.data_ptr(), q.shape[0], heads, kv_heads, head_dim)
        return q_out


    def decode_step(self, h: torch.Tensor, table: ctypes.Array[ctypes.c_void_p], eps: ctypes.Array[ctypes.c_float],
                    scaling: ctypes.Array[ctypes.c_float], layers: int, heads: int, kv_heads: int, head_dim: int,
                    inter: int, cos: torch.Tensor, sin: torch.Tensor, rs: int, hs: int, width: int,
                    mask: torch.Tensor | None, final_norm: torch.Tensor, lm_head: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor:
        """The whole decode step (`kaito.runtime.cstep` builds the table): h [n, d] embedded tokens, updated in
        place; logits [n, V] written. Threaded as `attention`."""
        n, d = h.shape
        rc = self._step(h.data_ptr(), n, layers, table, eps, scaling, d, heads, kv_heads, head_dim, inter,
                        cos.data_ptr(), sin.data_ptr(), cos.shape[1], rs, hs, width,
                        None if mask is None else mask.data_ptr(), final_norm.data_ptr(), lm_head.data_ptr(),
                        lm_head.shape[0], logits.data_ptr(), torch.get_num_threads() if self.threaded else 1)
        _check_step(rc, n, width, head_dim)
        return logits

    def decode_run(self, h: torch.Tensor, table: ctypes.Array[ctypes.c_void_p], eps: ctypes.Array[ctypes.c_float],
                   scaling: ctypes.Array[ctypes.c_float], layers: int, heads: int, kv_heads: int, head_dim: int,
                   inter: int, cos: torch.Tensor, sin: torch.Tensor, rs: int, hs: int, width: int,
                   mask: torch.Tensor | None, final_norm: torch.Tensor, lm_head: torch.Tensor, logits: torch.Tensor,
                   embed: torch.Tensor, tokens: torch.Tensor, eos: torch.Tensor, eos_stops: torch.Tensor,
                   budget_s: float, interrupt: ctypes.c_int) -> int:
        """Up to k greedy decode steps in one call (`kaito_decode_run`): tokens int64 [k + 1, n], row 0 the
        pending tokens, row j + 1 step j's picks; cos/sin [k, n, drot]; mask uint8/bool [n, >= width + k] (row
        stride its own) or None; eos int64 ids and eos_stops [n] (1: that row ends at EOS). Returns the steps run."""
        n, d = h.shape
        k = tokens.shape[0] - 1
        rc = self._run(h.data_ptr(), n, layers, table, eps, scaling, d, heads, kv_heads, head_dim, inter,
                       cos.data_ptr(), sin.data_ptr(), cos.shape[2], rs, hs, width,
                       None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
                       final_norm.data_ptr(), lm_head.data_ptr(), lm_head.shape[0], logits.data_ptr(),
                       embed.data_ptr(), tokens.data_ptr(), k, eos.data_ptr(), eos.numel(), eos_stops.data_ptr(),
                       budget_s, ctypes.addressof(interrupt), torch.get_num_threads() if self.threaded else 1)
        _check_step(rc, n, width, head_dim)
        return int(rc)


def _check_step(rc: int, n: int, width: int, head_dim: int) -> None:
    if rc == -1:
        raise MemoryError(f"decode step of {n} rows over {width + 1} columns: no memory for its buffers")
    if rc == -3:
        raise ValueError(f"decode step of {n} rows: over the C step's row limit (kaito.runtime.cstep.MAX_ROWS)")
    if rc == -2:
        raise ValueError(f"decode step: head_dim {head_dim} is over the glue's {MAX_HEAD_DIM}")


def load() -> CpuGlue | None:
    """The compiled glue (built on first use), or None when it is turned off or cannot be built."""
    if os.environ.get("KAITO_CPU_GLUE", "1") == "0":
        return None
    with _lock:
        key = str(SOURCE)
        if key not in _loaded:
            _loaded[key] = _build() or load_prebuilt()
        return _loaded[key]


# x86-64 micro-architecture levels (gcc's -march names), best first, and the /proc/cpuinfo flags each needs.
_V2 = {"cx16", "popcnt", "sse4_1", "sse4_2", "ssse3"}
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
LEVELS = [("x86-64-v4", _V4), ("x86-64-v3", _V3), ("x86-64-v2", _V2)]


def _levels() -> list[tuple[str, set[str]]]:
    """The levels prebuilt for this machine type: x86-64's, or one generic build elsewhere."""
    return LEVELS if platform.machine() in ("x86_64", "AMD64") else [("generic", set())]


def prebuilt_dir() -> Path:
    return Path(os.environ.get("KAITO_PREBUILT_KERNELS") or SOURCE.with_name("kernels"))


def _prebuilt_name(level: str, omp: bool, source: bytes) -> str:
    return f"decode_glue-{level}-{'omp' if omp else 'serial'}-{hashlib.sha256(source).hexdigest()[:16]}.so"


def prebuild(dest: Path | None = None, cc: str | None = None) -> list[Path]:
    """Compiles the library for every level of this machine type, with and without OpenMP, into `dest` (each
    written to a temporary name and renamed). Raises RuntimeError naming the compiler and its message."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("prebuilding the decode glue: no C compiler ($CC, cc, gcc, clang)")
    dest = dest or prebuilt_dir()
    dest.mkdir(parents=True, exist_ok=True)
    source, built = SOURCE.read_bytes(), []
    for level, _ in _levels():
        for omp in (True, False):
            flags = FLAGS + ([] if level == "generic" else [f"-march={level}"]) + (["-fopenmp"] if omp else [])
            path = dest / _prebuilt_name(level, omp, source)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=dest)
            os.close(fd)
            try:
                done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                      timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"prebuilding {path.name} with {cc} {' '.join(flags)}: {done.stderr[-2000:]}")
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            built.append(path)
    return built


def load_prebuilt() -> CpuGlue | None:
    """The best prebuilt library this CPU runs for the current source (OpenMP only where this process's one
    OpenMP runtime is torch's libgomp.so.1, as `_build`), or None when there is none."""
    directory = prebuilt_dir()
    try:
        source = SOURCE.read_bytes()
    except OSError:
        return None
    flags = set(_cpu_flags().split(":", 1)[-1].split())
    omp_ok = [Path(p).name for p in _gomp_paths()] == ["libgomp.so.1"]
    for level, needs in _levels():
        if not needs <= flags:
            continue
        for omp in ((True, False) if omp_ok else (False,)):
            path = directory / _prebuilt_name(level, omp, source)
            if not path.is_file():
                continue
            try:
                glue = CpuGlue(ctypes.CDLL(str(path)), path)
            except (OSError, AttributeError) as e:
                log.debug("loading prebuilt %s: %s", path, e)
                continue
            log.info("decode glue (prebuilt, no compiler here): %s", path)
            return glue
    log.info("no prebuilt decode glue for this CPU in %s: decode steps keep the torch glue ops", directory)
    return None


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _gomp_paths() -> set[str]:
    """The GNU OpenMP libraries mapped into this process (torch's, once torch has started)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return set()


def _cache_dir() -> Path:
    base = os.environ.get("KAITO_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kaito", "kernels")
    return Path(base)


def _build() -> CpuGlue | None:
    cc = _compiler()
    if cc is None:
        log.info("no C compiler ($CC, cc, gcc, clang): looking for a prebuilt decode glue")
        return None
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        log.warning("reading %s: %s; decode steps keep the torch glue ops", SOURCE, e)
        return None
    variants = [FLAGS + ["-march=native"], FLAGS]
    if [Path(p).name for p in _gomp_paths()] == ["libgomp.so.1"]:
        # torch's libgomp answers to the soname our library asks for: the loader reuses it (one runtime).
        variants.insert(0, FLAGS + ["-march=native", "-fopenmp"])
    for flags in variants:
        digest = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_flags().encode(),
                                            platform.machine().encode()])).hexdigest()[:16]
        private = Path(tempfile.gettempdir()) / f"kaito-kernels-{os.getuid()}"
        for directory in (_cache_dir(), private):
            if directory == private and not _private_dir(private):
                continue
            lib = _compile_into(directory, f"decode_glue-{digest}.so", cc, flags)
            if lib is not None:
                return lib
    log.warning("could not build %s with %s: decode steps keep the torch glue ops", SOURCE.name, cc)
    return None


def _private_dir(path: Path) -> bool:
    """Whether the shared temporary directory's fallback is ours alone: a directory (not a link) owned by this
    user that nobody else may write, since a library someone else put there would be loaded into the server."""
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    ok = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
    if not ok:
        log.warning("not building the decode glue in %s: not a directory of this user's alone", path)
    return ok


def _compile_into(directory: Path, name: str, cc: str, flags: list[str]) -> CpuGlue | None:
    path = directory / name
    try:
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=directory)
            os.close(fd)
            try:
                done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode != 0:
                    log.debug("compiling %s with %s %s: %s", SOURCE.name, cc, " ".join(flags), done.stderr[-2000:])
                    return None
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        glue = CpuGlue(ctypes.CDLL(str(path)), path)
        log.info("decode glue: %s", path)
        return glue
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        log.debug("building or loading %s in %s: %s", name, directory, e)
        return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kaito.runtime.cglue", description=__doc__.split("\n")[0])
    parser.add_argument("--prebuild", nargs="?", const="", metavar="DIR",
                        help="compile the library for every x86-64 level into DIR (default: next to this module)")
    args = parser.parse_args(argv)
    if args.prebuild is None:
        glue = load()
        print(f"decode glue: {glue.path if glue else None} (threaded: {bool(glue and glue.threaded)})")
        return 0
    try:
        paths = prebuild(Path(args.prebuild) if args.prebuild else None)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"kaito.runtime.cglue: {e}")
        return 1
    for path in paths:
        print(f"prebuilt {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
