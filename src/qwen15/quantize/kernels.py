"""Our CPU kernels (int8/int4/dense products: cpu_kernels.c; AMX bf16 products: cpu_amx.c; the small operations of
a decode step: cpu_decode_ops.c): built once with the system C compiler, loaded with ctypes, called on torch tensors.

Why our own kernel: PyTorch's weight-only CPU kernels dequantize each weight to fp32 and multiply in fp32, which is
compute-bound on two cores, so a batch-1 decode step cannot reach the bandwidth that int8 or int4 weights would
allow; these multiply int8 by int8 (VNNI), with the activations quantized per block of 64 columns on the fly
(bench/RESULTS.md has the comparison of candidates).

Build: `cc -O3 -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni` on the C files, which include only
the compiler's own headers and cpu_bf16.h, into a cache folder (QWEN15_KERNEL_CACHE, default ~/.cache/qwen15/kernels), keyed by a
hash of the source, flags and compiler version; built beside the target and renamed, so concurrent first runs are
safe. Needs only a C compiler (gcc >= 8 or clang >= 6) on Linux x86-64 with AVX-512 VNNI (Intel Ice Lake / Sapphire
Rapids and later, AMD Zen 4 and later); the AMX product also needs AMX tiles (Sapphire Rapids and later) and gcc >=
11 or clang >= 12, else bf16 decode keeps the AVX-512 kernel. Without either, or with QWEN15_CPU_KERNELS=0,
`library()` returns None and the quantized modules fall back to torch's kernels; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("cpu_kernels.c", "cpu_decode_ops.c", "cpu_amx.c")]
HEADERS = [Path(__file__).with_name("cpu_bf16.h")]  # included by the sources: part of the build's key
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11", "-ffp-contract=off"]
ISA = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma")

# PackedLinear runs amx_linear up to this many rows; longer inputs (prompts) keep oneDNN's product
AMX_ROWS = 64

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False
_amx: bool | None = None


def cache_folder() -> Path:
    base = os.environ.get("QWEN15_KERNEL_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qwen15" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _missing_cpu_flags() -> list[str]:
    have = _cpu_flags()
    return [f for f in CPU_FLAGS if f not in have]


def dense_kernel(dtype: torch.dtype) -> bool:
    """Whether dense_linear runs for weights of this dtype here (bf16 also needs AVX-512 bf16)."""
    if dtype not in (torch.bfloat16, torch.float32) or library() is None:
        return False
    return dtype == torch.float32 or "avx512_bf16" in _cpu_flags()


def amx_bf16() -> bool:
    """Whether amx_linear runs here: a CPU with AMX bf16 tiles, a compiler that knows them, and the kernel granting
    this process the tile state (QWEN15_AMX=0 turns it off, leaving the AVX-512 kernel)."""
    global _amx
    if _amx is None:
        _amx = (
            os.environ.get("QWEN15_AMX", "1") != "0"
            and dense_kernel(torch.bfloat16)
            and {"amx_tile", "amx_bf16"} <= _cpu_flags()
            and _lib.q15_amx_init() == 0
        )
    return _amx


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*texts, *FLAGS, *ISA, version]).encode()).hexdigest()[:16]
    folder = cache_folder()
    target = folder / f"qwen15_cpu_{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=target.name + ".", suffix=".partial")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, *ISA, *map(str, SOURCES), "-lm", "-o", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.q15_int8_linear.argtypes = [p, i, p, p, p, p, i, i64, i64, i64]
    lib.q15_int8_linear.restype = i
    lib.q15_int4_linear.argtypes = [p, i, p, p, p, i64, p, p, i, i64, i64, i64]
    lib.q15_int4_linear.restype = i
    lib.q15_int8_dequantize.argtypes = [p, p, p, i, i64, i64]
    lib.q15_int8_dequantize.restype = None
    lib.q15_int4_dequantize.argtypes = [p, p, p, i64, p, i, i64, i64]
    lib.q15_int4_dequantize.restype = None
    lib.q15_dense_linear.argtypes = [p, p, i, p, p, i64, i64, i64]
    lib.q15_dense_linear.restype = None
    lib.q15_dense_wide_linear.argtypes = [p, p, i, p, p, i64, i64, i64]
    lib.q15_dense_wide_linear.restype = i
    lib.q15_amx_init.argtypes = []
    lib.q15_amx_init.restype = i
    lib.q15_amx_bf16_linear.argtypes = [p, p, p, p, i64, i64, i64]
    lib.q15_amx_bf16_linear.restype = i
    lib.q15_read_bytes.argtypes = [p, i64]
    lib.q15_read_bytes.restype = ctypes.c_double
    f = ctypes.c_float
    lib.q15_rms_norm.argtypes = [p, p, p, p, p, i, i64, i64, f]
    lib.q15_rms_norm.restype = None
    lib.q15_rope_store.argtypes = [p, p, p, p, p, p, p, i, i64, i64, i64, i64, i64, i64]
    lib.q15_rope_store.restype = None
    lib.q15_decode_attention.argtypes = [p, p, p, p, i64, p, i, i64, i64, i64, i64, i64, i64, i64, f]
    lib.q15_decode_attention.restype = i
    lib.q15_silu_mul.argtypes = [p, p, i, i64, i64]
    lib.q15_silu_mul.restype = None
    lib.q15_argmax_rows.argtypes = [p, i, i64, i64, i64, p]
    lib.q15_argmax_rows.restype = None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot run (see unavailable_reason)."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("QWEN15_CPU_KERNELS", "1") == "0":
        _reason = "disabled by QWEN15_CPU_KERNELS=0"
    elif platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _reason = f"needs Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    elif missing := _missing_cpu_flags():
        _reason = f"this CPU lacks {', '.join(missing)}"
    elif (cc := _compiler()) is None:
        _reason = "no C compiler found (install gcc, or set CC)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _reason = f"building the kernels failed ({e})"
    return _lib


def unavailable_reason() -> str | None:
    library()
    return _reason


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as the kernels read it (a model cast with .to(dtype) after quantizing casts its scales too)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _flag(t: torch.Tensor) -> int:
    return 1 if t.dtype == torch.bfloat16 else 0


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [M, K] (bf16/fp32, contiguous; K a multiple of 64) @ (q int8 [N, K] * scale fp32 [N]).T + bias fp32
    -> [M, N] out_dtype."""
    m, k = x.shape
    n = q.shape[0]
    scale = _as(scale, torch.float32)
    y = torch.empty(m, n, dtype=out_dtype)
    rc = _lib.q15_int8_linear(_ptr(x), _flag(x), _ptr(q), _ptr(scale), _ptr(bias), _ptr(y), _flag(y), m, n, k)
    if rc != 0:
        raise MemoryError("int8 kernel: out of memory")
    return y


def int4_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    mins: torch.Tensor,
    group: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """x [M, K] (K a multiple of group) @ dequant(q uint8 [N, K/2], scale and mins bf16 [N, K/group]).T + bias
    -> [M, N] out_dtype; group 32, 64 or 128."""
    m, k = x.shape
    n = q.shape[0]
    scale, mins = _as(scale, torch.bfloat16), _as(mins, torch.bfloat16)
    y = torch.empty(m, n, dtype=out_dtype)
    rc = _lib.q15_int4_linear(
        _ptr(x), _flag(x), _ptr(q), _ptr(scale), _ptr(mins), group, _ptr(bias), _ptr(y), _flag(y), m, n, k
    )
    if rc != 0:
        raise MemoryError("int4 kernel: out of memory")
    return y


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T + bias fp32 [N] -> [M, N], x and w both bf16 (needs AVX-512 bf16) or both fp32."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    _lib.q15_dense_linear(_ptr(x), _ptr(w), _flag(x), _ptr(bias), _ptr(y), m, n, k)
    return y


WIDE_ROWS = 64  # dense_wide_linear takes up to this many rows


def dense_wide_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """dense_linear for 1 to WIDE_ROWS rows (bf16: K even), faster from ~24 rows on: the activations transposed
    once, each weight element broadcast against 16 rows at a time."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    rc = _lib.q15_dense_wide_linear(_ptr(x), _ptr(w), _flag(x), _ptr(bias), _ptr(y), m, n, k)
    if rc == -1:
        raise MemoryError("dense kernel: out of memory")
    if rc != 0:
        raise ValueError(
            f"dense_wide_linear takes 1 to {WIDE_ROWS} rows (bf16: an even width), got {m} x {k}"
        )
    return y


def amx_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T + bias fp32 [N] -> [M, N] on AMX tiles: bf16, M >= 1, N a multiple of 16,
    K of 32 (see amx_fits); needs amx_bf16()."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if _lib.q15_amx_bf16_linear(_ptr(x), _ptr(w), _ptr(bias), _ptr(y), m, n, k) != 0:
        raise MemoryError("AMX kernel: out of memory")
    return y


def amx_fits(w: torch.Tensor) -> bool:
    """Whether amx_linear takes this weight: bf16 [N, K] with N a multiple of 16 and K of 32 (every Qwen1.5 matrix)."""
    return w.dtype == torch.bfloat16 and w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0 and amx_bf16()


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale = _as(scale, torch.float32)
    w = torch.empty(q.shape, dtype=dtype)
    _lib.q15_int8_dequantize(_ptr(q), _ptr(scale), _ptr(w), _flag(w), *q.shape)
    return w


def int4_dequantize(
    q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    n, k = q.shape[0], q.shape[1] * 2
    scale, mins = _as(scale, torch.bfloat16), _as(mins, torch.bfloat16)
    w = torch.empty(n, k, dtype=dtype)
    _lib.q15_int4_dequantize(_ptr(q), _ptr(scale), _ptr(mins), group, _ptr(w), _flag(w), n, k)
    return w


# ---------------------------------------------------------------- the small operations of a decode step
# (cpu_decode_ops.c; qwen15.cpu_decode calls them): tensors contiguous, of one dtype (bf16 or fp32), on CPU;
# widths in whole 16-lane vectors (hidden and feed-forward sizes multiples of 16, head_dim of 32).


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + residual (x itself without one) and y = RMSNorm(s) * weight, as the model's RMSNorm."""
    d = x.shape[-1]
    y = torch.empty_like(x)
    s = x if residual is None else torch.empty_like(x)
    _lib.q15_rms_norm(
        _ptr(x), _ptr(residual), _ptr(s), _ptr(weight), _ptr(y), _flag(x), x.numel() // d, d, eps
    )
    return s, y


def rope_store(qkv, cos, sin, k_cache, v_cache, slots, heads: int, kv_heads: int, head_dim: int):
    """Rotated queries [B, heads, head_dim] of qkv [B, (heads + 2 kv_heads) * head_dim]; the rotated keys and
    the values go to the caches [B', kv_heads, length, head_dim] (rows of B' >= B contiguous from the second
    dimension) at [b, :, slots[b]]; cos, sin [B, head_dim]."""
    b = qkv.shape[0]
    q = torch.empty(b, heads, head_dim, dtype=qkv.dtype)
    _lib.q15_rope_store(
        _ptr(qkv), _ptr(cos), _ptr(sin), _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(slots), _flag(qkv),
        b, heads, kv_heads, head_dim, k_cache.stride(0), k_cache.stride(1),
    )  # fmt: skip
    return q


def decode_attention(q, k_cache, v_cache, mask, length: int, scale: float) -> torch.Tensor:
    """[B, heads * head_dim]: each row's query q [B, heads, head_dim] over its keys j < length where mask
    [B or 1, >= length] (bool, rows contiguous) holds; caches as rope_store's."""
    b, h, d = q.shape
    out = torch.empty(b, h * d, dtype=q.dtype)
    rc = _lib.q15_decode_attention(
        _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(mask), mask.stride(0) if mask.shape[0] > 1 else 0,
        _ptr(out), _flag(q), b, h, k_cache.shape[1], d, length, k_cache.stride(0), k_cache.stride(1), scale,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("decode attention kernel: out of memory")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up of gate_up [M, 2F] (gate, then up): [M, F]."""
    m, two_f = gate_up.shape
    y = torch.empty(m, two_f // 2, dtype=gate_up.dtype)
    _lib.q15_silu_mul(_ptr(gate_up), _ptr(y), _flag(gate_up), m, two_f // 2)
    return y


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [M, n] (bf16 or fp32, CPU, rows contiguous; a column slice is fine) -> x.argmax(-1): the first
    index of each row's largest value, a NaN counting as the largest (torch's single-threaded argmax takes ~6 ms
    for the 32 x 151936 logits of one batched decode step here; this reads them at the memory's speed)."""
    m, n = x.shape
    out = torch.empty(m, dtype=torch.long)
    _lib.q15_argmax_rows(_ptr(x), _flag(x), m, n, x.stride(0), _ptr(out))
    return out


def read_bandwidth(nbytes: int = 512 * 2**20, repeat: int = 5) -> float | None:
    """Bytes/s that all threads read from memory (summing a buffer larger than the caches); None without kernels."""
    import time

    if library() is None:
        return None
    buf = torch.ones(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _lib.q15_read_bytes(buf.data_ptr(), nbytes)
        best = min(best, time.perf_counter() - t)
    return nbytes / best
