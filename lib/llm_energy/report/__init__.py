"""What a person reads (plumbing layer): the paper's figures (:mod:`.figures`) and the HTML report
(:mod:`.html`)."""


def __getattr__(name: str):
    # `llm_energy.report` was one module before the folders: its names resolve to .html
    import importlib

    return getattr(importlib.import_module(f"{__name__}.html"), name)
