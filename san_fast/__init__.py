"""san_fast: the Semantic Attention Network for unsupervised semantic segmentation."""

import importlib.util
import pathlib
import sys

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    # Installed, kernels/ is the subpackage san_fast.kernels (see pyproject.toml). In a source
    # checkout used without installing, map the top-level folder to the same name so that
    # `import san_fast.kernels` means one thing everywhere and no top-level `kernels` is imported.
    if "san_fast.kernels" in sys.modules:
        return
    if importlib.util.find_spec("san_fast.kernels") is not None:
        return
    folder = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "san_fast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["san_fast.kernels"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "kernels", module)


_map_source_kernels()


def __getattr__(name: str):
    # `san_fast.load` imports the model on first use, so `import san_fast` (done by every
    # submodule and by the kernels) stays cheap.
    if name == "load":
        from san_fast.api import load

        return load
    raise AttributeError(f"module 'san_fast' has no attribute {name!r}")
