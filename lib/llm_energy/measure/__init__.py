"""Measurement (middle layer, beside models/: the probe times the W8A8 layer): the energy meter and its
sources, CodeCarbon, RAPL, NVML (:mod:`.meter`), the device throughput probe (:mod:`.throughput`), and the
machine's description for provenance (:mod:`.hardware`)."""
