"""Targets get only the fusion sets they declare; contrib ops never reach a portable graph."""

from gptkiln.graph import optimize
from gptkiln.targets import TARGETS


def test_portable_set_adds_no_contrib_ops(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    report = optimize(model, spec, ("portable",))
    assert {c.fusion_set for c in report.counts} == {"portable"}
    assert not [n for n in model.graph if n.domain == "com.microsoft"]


def test_onnxruntime_fusions_reach_every_expected_count(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    report = optimize(model, spec, TARGETS["onnxruntime"].fusion_sets)
    assert not report.short, report.short
    assert report.nodes_after < report.nodes_before / 2


def test_only_onnxruntime_takes_contrib_fusions():
    for name, target in TARGETS.items():
        assert ("onnxruntime" in target.fusion_sets) == (name == "onnxruntime")
