"""The tasks' data (ground layer): task files, splits and invalid records (:mod:`.tasks`), and the
TeleQnA reader (:mod:`.teleqna`)."""


def __getattr__(name: str):
    # `llm_energy.data` was one module before the folders: its names resolve to .tasks
    import importlib

    return getattr(importlib.import_module(f"{__name__}.tasks"), name)
