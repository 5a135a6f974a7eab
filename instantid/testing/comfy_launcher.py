"""Entry script of a ComfyUI server under test: ``python comfy_launcher.py COMFY_ROOT [main.py options...]``.

Runs ``COMFY_ROOT/main.py`` as ``python main.py`` would (``__main__``, its folder first on
``sys.path``, the options in ``sys.argv``), after one preparation: placeholders for the packages
that cannot be installed beside the CPU torch (``absent_modules.py``, loaded from this folder by
path). This script imports nothing of this repository as a package, so the server imports
``instantid`` and ``cow_model`` only from the copy of the pack in its ``custom_nodes`` folder.
"""

import importlib.util
import runpy
import sys
from pathlib import Path


def _load_absent_modules() -> object:
    path = Path(__file__).with_name("absent_modules.py")
    spec = importlib.util.spec_from_file_location("_comfy_test_absent_modules", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: comfy_launcher.py COMFY_ROOT [main.py options...]")
    root = Path(sys.argv[1]).resolve()
    absent = _load_absent_modules()
    absent.import_probing_libraries()  # type: ignore[attr-defined]
    absent.install_placeholders()  # type: ignore[attr-defined]
    sys.path[0] = str(root)
    sys.argv = [str(root / "main.py"), *sys.argv[2:]]
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
