"""CodeCarbon is told the CPU's brand from /proc/cpuinfo instead of starting py-cpuinfo's interpreter."""

from __future__ import annotations

import importlib

import pytest

from llm_energy.measure.meter import proc_cpu_model, quicken_codecarbon_cpu_model

MODULES = ("codecarbon.core.util", "codecarbon.core.cpu", "codecarbon.core.resource_tracker",
           "codecarbon.external.hardware")


def test_codecarbon_reads_the_model_name_line(tmp_path, monkeypatch):
    pytest.importorskip("codecarbon")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                       "model name\t: AMD EPYC 9R14 96-Core Processor\n")
    for name in MODULES:  # restored after the test
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "detect_cpu_model", module.detect_cpu_model)
    import cpuinfo as py_cpuinfo

    def no_interpreter():
        raise AssertionError("py-cpuinfo was asked")

    monkeypatch.setattr(py_cpuinfo, "get_cpu_info", no_interpreter)
    assert quicken_codecarbon_cpu_model(cpuinfo)
    from codecarbon.core import cpu

    assert cpu.detect_cpu_model() == "AMD EPYC 9R14 96-Core Processor"
    assert cpu.TDP().model  # CodeCarbon's TDP lookup runs on that string, without py-cpuinfo


def test_without_a_model_name_codecarbon_keeps_its_own_detection(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nHardware\t: BCM2835\n")
    assert proc_cpu_model(cpuinfo) is None
    assert not quicken_codecarbon_cpu_model(cpuinfo)
    assert proc_cpu_model(tmp_path / "missing") is None
