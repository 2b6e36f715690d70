import atexit
import logging
import os
import shutil
import tempfile

# Tests run on CPU; keep XLA from grabbing all cores' threads for tiny shapes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's time is mostly XLA compiling tiny programs, not running them. LLVM at -O0 compiles them about
# twice as fast (a tiny compress: pass 1 10.9 -> 5.9 s, held-out search 4.5 -> 1.6 s; the whole suite, -n 2
# on the quiet 2-core machine: 1,153 s -> 730 s) and changes only
# machine code, not the HLO the tests check: that run's T agreed to 1e-8. Subprocesses inherit it
# (tests.helpers.devices_env adds their device count). The main job in CI compiles at the default level.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# The CLI subprocesses many tests start each compile the same tiny-model programs from scratch; one
# compilation cache shared by them cuts that (tests/test_resume.py, -n 2: 87 s -> 72 s). The cache
# starts empty, so every program is still compiled once in this run. The controller creates it before
# the xdist workers start; they and their subprocesses inherit it through the environment. The size
# limit turns on JAX's file lock, so no process reads a half-written entry. The test processes
# themselves do not write to it: their own jit caches already hold what they compiled, and when they
# wrote every tiny program too the cache grew to ~5,000 entries, each write serialised a program and
# JAX rescans every entry under the lock on each write: the whole suite (-n 2, quiet 2-core machine)
# took 1,694 s with them and 670 s without (201 entries). A caller's own JAX_COMPILATION_CACHE_DIR
# is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="replaceme_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["REPLACEME_JAX_TEST_CACHE_DIR"] = _cache  # tells the xdist workers the cache is the run's
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    _owner = os.getpid()
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache, ignore_errors=True))
if os.environ.get("REPLACEME_JAX_TEST_CACHE_DIR") == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import jax

    jax.config.update("jax_enable_compilation_cache", False)

logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
