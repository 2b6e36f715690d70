import atexit
import logging
import os
import shutil
import tempfile

# Tests run on CPU; keep XLA from grabbing all cores' threads for tiny shapes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests (and the CLI subprocesses they start) compile the same tiny-model programs again; one
# compilation cache for the whole run cuts the suite's CPU time by about a fifth (tests/test_resume.py:
# 187 s -> 149 s user time). The cache starts empty, so every program is still compiled in this run.
# The controller sets it before the xdist workers start and they inherit it; subprocesses inherit it
# through the environment. A size limit turns on JAX's file lock, so processes do not read half-written
# entries. A caller's own JAX_COMPILATION_CACHE_DIR is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="replaceme_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    _owner = os.getpid()
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache, ignore_errors=True))

logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
