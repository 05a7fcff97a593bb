"""Building the model + loss head from an arch config, and the ONE place where device, precision,
compilation and seeding are applied (outside the model code)."""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import numpy as np
import torch

from utils.config import model_config_dict, validate_arch
from utils.cpu import cpuinfo_field


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, rank, purpose): distinct streams that never collide."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


# glibc malloc hands a freed block above its mmap threshold (dynamic, from 128 KiB) straight back to the
# kernel and trims the top of its heap above the trim threshold, so a training step, which frees and
# re-allocates the same activation sizes every step, gets fresh pages each time that the kernel faults in
# and zeroes: ~12,000 minor page faults (~50 MB) per step of the CPU demo, ~1/6 of its step time at one
# thread (docs/benchmarks.md). Blocks up to 32 MiB (glibc's largest allowed threshold) from the heap, and
# freed memory kept up to 1 GiB, make the steady state fault-free. The process keeps at most the peak it
# once used; a process-wide allocator setting, so it is applied here, once, not in model code.
_MALLOC_MMAP_THRESHOLD, _MALLOC_TRIM_THRESHOLD = 32 * 2 ** 20, 2 ** 30
_malloc_tuned: Optional[bool] = None


def retain_freed_host_memory() -> bool:
    """Keep freed host memory in the process (glibc's mallopt); True if applied. Other C libraries
    (macOS, musl) keep their own behaviour and this returns False. Idempotent."""
    global _malloc_tuned
    if _malloc_tuned is None:
        import ctypes
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _malloc_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, _MALLOC_MMAP_THRESHOLD)) and \
                bool(mallopt(M_TRIM_THRESHOLD, _MALLOC_TRIM_THRESHOLD))
    return _malloc_tuned


def build_head(arch: dict, injected: dict, seed: int = 0) -> torch.nn.Module:
    """Model + loss head on CPU, initialised from a generator seeded with `seed` (same on every rank).
    Every entry point builds its model here (training, evaluate.py, solve.py, generate.py), so the host
    allocator is set up here too (retain_freed_host_memory)."""
    retain_freed_host_memory()
    model_cls, loss_cls = validate_arch(arch)
    config = model_config_dict(arch, injected)
    init_gen = torch.Generator().manual_seed(derive_seed(seed, 0x1417))
    if "generator" in inspect.signature(model_cls.__init__).parameters:
        model = model_cls(config, generator=init_gen)
    else:
        # A model without a generator hook initialises from the global RNG: fork it so the caller's
        # global state is untouched and the init is still a function of `seed`.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0x1417))
            model = model_cls(config)
    loss_kwargs = {k: v for k, v in arch["loss"].items() if k != "name"}
    return loss_cls(model, **loss_kwargs)


def inner_model(head: torch.nn.Module) -> torch.nn.Module:
    return getattr(head, "model", head)


def puzzle_embedding(head: torch.nn.Module):
    """The CastedSparseEmbedding of the model, or None."""
    return getattr(inner_model(head), "puzzle_emb", None)


def set_exploration_generator(head: torch.nn.Module, seed: int, rank: int, device: torch.device) -> Optional[torch.Generator]:
    """Give the model its halting-exploration generator, seeded from (seed, rank). Returns it (or None)."""
    model = inner_model(head)
    if not hasattr(model, "set_generator"):
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, rank, 0xAC7))
    model.set_generator(gen)
    return gen


def autocast_context(device: torch.device, mixed_precision: str):
    if mixed_precision == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# compile=auto compiles when the run has at least this many optimizer steps. Measured (docs/benchmarks.md,
# bench/bench_step.py): compiling the blocks costs ~20-70 s of wall clock once on the 2 shared cores (much
# less on a warm on-disk cache) and saves ~25-50 % of a tiny-shape CPU step (~0.1-0.5 s), so it pays for
# itself after a few hundred steps; 1000 leaves a margin for slower compiles and smaller models.
COMPILE_AUTO_MIN_STEPS = 1000


def compile_decision(setting, device: torch.device, steps: int) -> tuple[bool, str]:
    """(compile?, why) for `compile` = true | false | auto. auto: compile iff the run has
    >= COMPILE_AUTO_MIN_STEPS optimizer steps and inductor can build kernels here (a C++ compiler on CPU,
    triton on CUDA)."""
    if setting is True or setting is False:
        return setting, f"compile={str(setting).lower()}"
    if device.type == "cpu":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return False, "compile=auto: no C++ compiler on PATH for inductor's CPU kernels"
    elif device.type == "cuda":
        import importlib.util
        if importlib.util.find_spec("triton") is None:
            return False, "compile=auto: triton is not importable"
    if steps < COMPILE_AUTO_MIN_STEPS:
        return False, f"compile=auto: {steps} steps < {COMPILE_AUTO_MIN_STEPS}, too short to pay for compiling"
    return True, f"compile=auto: {steps} steps >= {COMPILE_AUTO_MIN_STEPS}"


def compile_blocks(module: torch.nn.Module) -> int:
    """torch.compile every recursion block (PostNormBlock) of `module` in place; returns how many.

    Why the block: it is the whole hot loop (every L/H update is a stack of them) and a pure function of
    (hidden states, RoPE tables), so one graph with no breaks serves every block and every update (the
    parameters are graph inputs), plus one more for the no_grad updates; the ACT bookkeeping around it
    stays eager. Batch sizes are dynamic from the start, so eval's batch (or a short last batch) does not
    recompile. nn.Module.compile keeps the state-dict names. Compiled kernels and autograd graphs are cached
    on disk (inductor's FX-graph and AOT-autograd caches, under torch's cache dir, by default
    /tmp/torchinductor_$USER), so a second run with the same shapes skips most of the compile."""
    from models.layers import PostNormBlock
    import torch.fx.experimental._config as fx_config
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # Without this, dynamo gives input dims of equal size one symbol ("duck shaping"): the CPU demo's batch
    # 64 equals its hidden size 64 (a static weight dim), which pinned the batch to 64 and made eval's
    # batch recompile (seen with TORCH_LOGS=recompiles; tests/test_compile.py has batch == hidden).
    fx_config.use_duck_shape = False
    n = 0
    for m in module.modules():
        if isinstance(m, PostNormBlock):
            m.compile(dynamic=True)
            n += 1
    return n


def set_linear_backend(head: torch.nn.Module, setting: str, device: torch.device | str) -> tuple[str, str]:
    """Resolve config `linear_backend` (models/layers.py resolve_linear_backend) for `device` and set it on
    every CastedLinear of `head`; -> (backend, why). Before compiling: the compiled graph calls what the
    layer dispatches to."""
    from models.layers import CastedLinear, resolve_linear_backend
    backend, why = resolve_linear_backend(setting, device)
    for m in head.modules():
        if isinstance(m, CastedLinear):
            m.backend = backend
    return backend, why


def prepare_for_training(head: torch.nn.Module, device: torch.device, compile_model) -> torch.nn.Module:
    """Move to the device and optionally compile (True/False; "auto" is resolved by the caller with
    compile_decision). Returns the module to call in the step; `head` keeps the original state-dict names.
    Models built from the shared blocks get their blocks compiled in place (eval uses them too); any other
    model is compiled whole."""
    head.to(device)
    if compile_model is True and compile_blocks(head) == 0:
        return torch.compile(head, dynamic=False)
    return head


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX-BF16). Without either, PyTorch emulates
    bf16 matmuls through fp32 conversions, ~4-8x slower than fp32 (measured on a 2-core EPYC, issue 15)."""
    flags = cpuinfo_field("flags", cpuinfo)
    if flags is not None:
        return bool(set(flags.split()) & {"avx512_bf16", "amx_bf16"})
    # no /proc (not Linux): torch's own CPU feature probe
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_cpu_warning(device: torch.device, mixed_precision: str, forward_dtype: Optional[str],
                     cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """One line to print when bf16 is chosen on a CPU without native bf16, else None."""
    chosen = [k for k, on in (("mixed_precision=bf16", mixed_precision == "bf16"),
                              ("arch.forward_dtype=bfloat16", forward_dtype == "bfloat16")) if on]
    if device.type != "cpu" or not chosen or native_bf16_cpu(cpuinfo):
        return None
    return (f"warning: {' and '.join(chosen)} on a CPU without native bf16 (no AVX-512-BF16/AMX): bf16 is emulated "
            "here and runs ~4-8x slower than float32; use arch.forward_dtype=float32 mixed_precision=none on this CPU")
