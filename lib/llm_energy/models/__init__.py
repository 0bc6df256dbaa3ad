"""Models (middle layer): loading at every precision (:mod:`.loading`), the CPU-native W8A8 layer
(:mod:`.quant8`) and the cuSPARSELt 2:4 layers (:mod:`.sparse_kernels`)."""


def __getattr__(name: str):
    # `llm_energy.models` was one module before the folders: its names resolve to .loading
    import importlib

    return getattr(importlib.import_module(f"{__name__}.loading"), name)
