"""scripts/gpu.sh's setup check, one interpreter start: every package the run needs imports, CUDA is there
(unless SMOKE=1), swinv2_fast imports from this checkout (ROOT); prints the versions and the device for
environment.txt. Exit 3: a package is missing; 4: no CUDA device; 5: swinv2_fast from elsewhere (lines
starting with SETUP: say which)."""

import importlib
import os
import platform
import sys

missing = []
for name in ("torch", "triton", "numpy", "transformers", "timm", "pytest", "matplotlib", "tqdm", "safetensors"):
    try:
        print(f"{name}: {importlib.import_module(name).__version__}")
    except Exception as error:  # any import failure is a setup failure, named
        missing.append(f"{name} ({type(error).__name__}: {error})")
print("python:", platform.python_version(), platform.python_implementation(), sys.executable)
if missing:
    print("SETUP: missing packages: " + "; ".join(missing))
    sys.exit(3)
import torch  # noqa: E402

print("cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
if os.environ.get("SMOKE") == "0" and not torch.cuda.is_available():
    print("SETUP: torch sees no CUDA device (torch.cuda.is_available() is False)")
    sys.exit(4)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
import swinv2_fast  # noqa: E402

where = os.path.dirname(os.path.abspath(swinv2_fast.__file__))
print("swinv2_fast:", where)
if where != os.path.join(os.environ["ROOT"], "swinv2_fast"):
    print(f"SETUP: swinv2_fast imports from {where}, not from this checkout {os.environ['ROOT']}")
    sys.exit(5)
