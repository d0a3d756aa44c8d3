"""The runtime must work without the converter: a Mac user who only generates installs no more."""
import pkgutil
import subprocess
import sys

import coreml_sd.runtime


def test_no_runtime_module_imports_the_converter():
    modules = [m.name for m in pkgutil.walk_packages(coreml_sd.runtime.__path__, "coreml_sd.runtime.")]
    assert "coreml_sd.runtime.cli" in modules and "coreml_sd.runtime.executor" in modules
    program = (
        "import importlib, sys\n"
        "sys.modules['coreml_sd.converter'] = None  # any import of it now fails\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
